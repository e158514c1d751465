"""Tokenize a config's data once into the pre-tokenized cache: python -m train.prepare --config C.

Builds (on all cores, with a progress bar) the memory-mapped token shards of the train split --
and of the eval split, when the config names one -- under data_cache_dir/pretok/, keyed on
dataset, split, text column, holdout and tokenizer (train/data/pretok.py). A run with
`pretokenize: true` then reads them; it also builds them itself on first use, so this command
is for doing it ahead of time (say, on a CPU machine before a GPU run). Already complete caches
are left as they are. A Ctrl-C or SIGTERM stops it with one line and exit 130, as it stops
`python -m train` before training (train/signals.py); a cache being built is then removed whole.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Light (no torch): the stop-signal handlers are in place before the seconds of heavy imports.
from train.config import ConfigError, TrainConfig, add_set_argument
from train.errors import DataError
from train.signals import raise_if_interrupted, stop_signals_interrupt

STOPPED = "interrupted; nothing half-written was left (a cache printed above is complete)"


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0, 2 after a ConfigError's or DataError's line, 130 after a stop signal's
    (SIGINT, SIGTERM: from the first line on, while torch imports and while pre-tokenizing)."""
    with stop_signals_interrupt():
        try:
            return _main(argv)
        except KeyboardInterrupt:
            print(STOPPED, file=sys.stderr)
            return 130


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="training config JSON")
    add_set_argument(ap)
    ap.add_argument("--processes", type=int, default=None, help="tokenizer processes (all cores)")
    args = ap.parse_args(argv)
    # Lazy: train.data imports torch (seconds); --help and a bad argument answer before it.
    from train.data import eval_source, load_tokenizer, train_source
    from train.data.cache import COMPLETE
    from train.data.pretok import cache_path, ensure_token_cache

    try:
        cfg = TrainConfig.load(args.config, args.set)
        tok = load_tokenizer(cfg.tokenizer_name, cache_dir=cfg.data_cache_dir)
        raise_if_interrupted()  # one that an import swallowed ("Exception ignored in ...")
        sources = [train_source(cfg)]
        ev = eval_source(cfg)
        if ev is not None and ev.part == "kept":  # a held-out part lives in the train cache
            sources.append(ev)
        for src in sources:
            t0 = time.perf_counter()
            was = (cache_path(src, tok, cfg.data_cache_dir) / COMPLETE).is_file()
            folder = ensure_token_cache(src, tok, cfg.data_cache_dir, processes=args.processes)
            meta = json.loads((Path(folder) / "meta.json").read_text())
            parts = ", ".join(
                f"{p}: {v['tokens']:,} tokens of {v['docs']:,} docs in {len(v['shards'])} shards"
                for p, v in meta["parts"].items()
                if v["docs"]
            )
            how = "already complete" if was else f"built in {time.perf_counter() - t0:.1f} s"
            print(f"{src.describe()}: {folder} ({meta['dtype']}; {parts}; {how})")
            raise_if_interrupted()  # one that an import inside the build swallowed
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfg.pretokenized:
        print("note: this config streams its data (pretokenize false, or null with max_steps set); "
              "set pretokenize true to train from this cache")  # fmt: skip
    return 0


if __name__ == "__main__":
    from train.__main__ import entry

    entry(main)
