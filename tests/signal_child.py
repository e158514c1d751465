"""Child processes of tests/test_signals.py (run as a script; imports nothing heavy at the top).

python tests/signal_child.py pretok RUNS DATA TOKENIZER ROOT
    build the pre-tokenized cache of DATA RUNS times, each into a fresh folder under ROOT,
    with 2 pool processes and run()'s stop-signal handlers installed; fails (exit 1) when a
    pool worker outlives its build.
python tests/signal_child.py import MODULE SIGNAL WHEN [python -m train arguments...]
    `python -m train ARGS` that receives SIGNAL (SIGINT, SIGTERM) from itself as MODULE is
    first imported: WHEN "raise" sends it as the import starts; "swallow" sends it inside a
    __del__ method run there, where Python reports the KeyboardInterrupt as "Exception
    ignored in ..." and goes on (what happens when a real signal lands in import
    machinery's weakref callbacks).
"""

from __future__ import annotations

import importlib.abc
import os
import runpy
import signal
import sys
from pathlib import Path


def pretok(runs: int, data: str, tokenizer: str, root: str) -> int:
    import multiprocessing

    from train.data import load_tokenizer
    from train.data.pretok import ensure_token_cache
    from train.data.source import DocSource
    from train.signals import stop_signals_interrupt

    tok = load_tokenizer(tokenizer)
    with stop_signals_interrupt():  # what run() has in place while it pre-tokenizes
        for i in range(runs):
            src = DocSource(data, "train", "text", cache_dir=Path(root) / "hf")
            ensure_token_cache(src, tok, Path(root) / f"cache{i}", progress=False, processes=2)
            if multiprocessing.active_children():
                print(f"run {i}: pool workers still alive after the build", file=sys.stderr)
                return 1
    return 0


class _SignalOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, module: str, sig: signal.Signals, when: str) -> None:
        self.module, self.sig, self.when = module, sig, when

    def find_spec(self, name, path, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        if self.when == "raise":
            os.kill(os.getpid(), self.sig)
        else:
            _SignalInDel(self.sig)  # dropped at once: its __del__ runs here
        return None  # the real finders import the module


class _SignalInDel:
    def __init__(self, sig: signal.Signals) -> None:
        self.sig = sig

    def __del__(self) -> None:
        os.kill(os.getpid(), self.sig)
        for _ in range(1000):  # the handler runs in this loop: its exception is "ignored"
            pass


def import_signal(module: str, sig: str, when: str, args: list[str]) -> None:
    sys.meta_path.insert(0, _SignalOnImport(module, signal.Signals[sig], when))
    sys.argv = ["train", *args]
    runpy.run_module("train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if sys.argv[1] == "pretok":
        sys.exit(pretok(int(sys.argv[2]), *sys.argv[3:6]))
    import_signal(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
