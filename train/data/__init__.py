"""Everything between a dataset name and a batch of token ids (the trainer's data interface).

    tok = load_tokenizer(cfg.tokenizer_name, cache_dir=cfg.data_cache_dir)
    model_cfg = spec.resolve(tok)  # train.model_config.ModelSpec: vocab_size sized to tok
    train = build_train_data(cfg, tok, rank, world_size, pin_memory=rt.pin_memory)  # (B, T) int64
    evals = build_eval_batches(cfg, tok, rank, world_size)  # list of (B, T) int64 batches
    ckpt["data"] = train.state_dict(); ...; train.load_state_dict(ckpt["data"])

The labels are the ids themselves (the model shifts inside). Documents are tokenized without the
tokenizer's own special tokens, each followed by EOS, concatenated and cut into block_size blocks
with no padding (the last partial block and batch of an epoch are dropped). Two modes:

* streaming (pretokenize false, or null with max_steps set): tokenized on the fly in num_workers
  DataLoader processes with a seeded shuffle window of buffer_size blocks -- stream.py;
* pre-tokenized (pretokenize true, or null with max_steps null, as in the seed's config): tokenized
  once into memory-mapped shards under data_cache_dir, built automatically on first use or by
  `python -m train.prepare`; each epoch a full seeded permutation of the blocks -- pretok.py.

Both resume exactly: after load_state_dict the next batches equal an uninterrupted run's.
Evaluation reads the eval split, or the held-out part of train when eval_split is null and
eval_holdout_fraction > 0: its first eval_max_batches batches in order.

The modules, each importing only those before it:

    cache.py   build-once folders under data_cache_dir, their keys, the tokenizer's identity
    bpe.py     training a byte-level BPE tokenizer (python -m train.tokenizer, the demo's)
    demo.py    the generated demo corpus ("octo-demo") and its tokenizer
    hub.py     fail fast, in one line, when a Hub name is used and the Hub cannot be reached
    source.py  DocSource: where documents come from (Hub, local files, the demo), encode_docs
    forkpool.py  the pre-tokenizing worker pool: fails in one line when a worker is killed
    pretok.py  the pre-tokenized cache and its batches
    stream.py  the streamed batches
    build.py   this interface: from a config to the batches

This file only re-exports the interface; code outside train/data/ imports it from `train.data`
(anything else from the module that defines it), and a module inside imports the module it needs
(train.data.cache, ...), never the package.
"""

from train.data.build import (
    TrainData,
    build_eval_batches,
    build_train_data,
    eval_source,
    load_tokenizer,
    train_source,
    with_own_tokenizer,
)
from train.errors import DataError

__all__ = [
    "DataError",
    "TrainData",
    "build_eval_batches",
    "build_train_data",
    "eval_source",
    "load_tokenizer",
    "train_source",
    "with_own_tokenizer",
]
