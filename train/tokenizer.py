"""Train a byte-level BPE tokenizer on a dataset's text column.

    python -m train.tokenizer --config train/config.json --vocab-size 16000 --out tok16k
    # then in the config: "tokenizer_name": "tok16k" (and the model's vocab_size may be 16000)

The tokenizer is a GPT-2 style byte-level BPE (train/data/bpe.py) trained on the config's train
documents (held-out ones excluded), with EOS "<|endoftext|>" (id 0) and BOS "<|startoftext|>"
(id 1); --vocab-size counts them. `AutoTokenizer.from_pretrained(OUT)` loads it offline.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

from train.config import ConfigError, TrainConfig, add_set_argument
from train.errors import DataError


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

    ap = argparse.ArgumentParser(
        prog="python -m train.tokenizer", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--config", required=True, help="training config JSON (dataset, split, column)")
    ap.add_argument("--vocab-size", type=int, required=True, help="total tokens, specials included")
    ap.add_argument("--out", required=True, help="folder to write (tokenizer_name: OUT)")
    ap.add_argument("--max-docs", type=int, default=None, help="train on the first N documents")
    add_set_argument(ap)
    args = ap.parse_args(argv)
    # Lazy: train.data imports torch (seconds); --help and a bad argument answer before it.
    from train.data import train_source
    from train.data.bpe import train_tokenizer

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
