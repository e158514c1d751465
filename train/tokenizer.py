"""Train a byte-level BPE tokenizer on a dataset's text column.

    python -m train.tokenizer --config train/config.json --vocab-size 16000 --out tok16k
    # then in the config: "tokenizer_name": "tok16k" (and the model's vocab_size may be 16000)

The tokenizer is GPT-2 style: bytes are the base alphabet (every text encodes, nothing is ever
unknown), pre-tokenized on spaces/punctuation, merges learned by `tokenizers`' BpeTrainer on the
train documents (held-out ones excluded). Special tokens: EOS "<|endoftext|>" (id 0, ends every
document) and BOS "<|startoftext|>" (id 1). The total size, special tokens included, is
--vocab-size (fewer only when the text has fewer distinct merges). The folder is saved with
tokenizer_class PreTrainedTokenizerFast, so `AutoTokenizer.from_pretrained(DIR)` loads it offline
on transformers 4.x and 5.x alike.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from train.data_source import DataError

EOS, BOS = "<|endoftext|>", "<|startoftext|>"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out: str | Path, *, show_progress: bool = False
):
    """Train on texts, save to out, and return the loaded transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from octo.tokenizer_files import save_tokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise DataError(
            f"--vocab-size {vocab_size} is below the {len(alphabet) + 2} a byte-level BPE needs "
            "(256 bytes + EOS + BOS); choose a larger one"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, BOS],
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS)
    try:
        save_tokenizer(fast, out, model_max_length=None)  # a class transformers 4.x loads too
    except OSError as e:  # disk full, no permission, a path under a regular file
        raise DataError(
            f"cannot write the tokenizer to {out} ({e}); name a writable folder"
        ) from None
    return AutoTokenizer.from_pretrained(out, trust_remote_code=False)


def _make_out_folder(out: Path) -> None:
    """Create --out before training (minutes, on a large corpus), so a path that cannot be a
    folder fails at once as a DataError instead of a NotADirectoryError after the work."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; name a folder for the tokenizer")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"--out {out}: cannot create that folder ({e.strerror or e}); name a folder in a "
            "writable place"
        ) from None


def main(argv: list[str] | None = None) -> int:
    from train.config import ConfigError, TrainConfig, add_set_argument
    from train.data import train_source

    ap = argparse.ArgumentParser(
        prog="python -m train.tokenizer", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--config", required=True, help="training config JSON (dataset, split, column)")
    ap.add_argument("--vocab-size", type=int, required=True, help="total tokens, specials included")
    ap.add_argument("--out", required=True, help="folder to write (tokenizer_name: OUT)")
    ap.add_argument("--max-docs", type=int, default=None, help="train on the first N documents")
    add_set_argument(ap)
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        if args.max_docs is not None and args.max_docs < 1:
            raise ConfigError(f"--max-docs must be a positive number of documents, got "
                              f"{args.max_docs}; leave it out to use them all")  # fmt: skip
        cfg = TrainConfig.load(args.config, args.set)
        src = train_source(cfg).open()
        _make_out_folder(out)
        docs = 0

        def texts():
            nonlocal docs
            all_texts = itertools.chain.from_iterable(src.iter_texts())
            for text in itertools.islice(all_texts, args.max_docs):
                docs += 1
                yield text

        t0 = time.perf_counter()
        tok = train_tokenizer(texts(), args.vocab_size, args.out, show_progress=sys.stderr.isatty())
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"trained a {len(tok)}-token byte-level BPE on {docs} documents of {src.describe()} in "
        f"{time.perf_counter() - t0:.1f} s -> {args.out}; set tokenizer_name to {args.out!r}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
