"""Child processes of tests/test_signals.py (run as a script; imports nothing heavy at the top).

python tests/signal_child.py pretok RUNS DATA TOKENIZER ROOT
    build the pre-tokenized cache of DATA RUNS times, each into a fresh folder under ROOT,
    with 2 pool processes and run()'s stop-signal handlers installed; fails (exit 1) when a
    pool worker outlives its build.
python tests/signal_child.py stall DATA TOKENIZER ROOT PIDFILE
    build the pre-tokenized cache of DATA under ROOT/cache with 2 pool processes and run()'s
    stop-signal handlers in place, with a stand-in tokenizer that makes the worker given the
    first batch write its pid to PIDFILE and sleep (a worker busy with a long batch: the test
    kills it or interrupts the build). Prints `error: ...` and exits 2 on a DataError, prints
    "interrupted" and exits 130 on KeyboardInterrupt, like python -m train.
python tests/signal_child.py import MODULE SIGNAL WHEN [python -m train arguments...]
    `python -m train ARGS` that receives SIGNAL (SIGINT, SIGTERM) from itself as MODULE is
    first imported: WHEN "raise" sends it as the import starts; "swallow" sends it inside a
    __del__ method run there, where Python reports the KeyboardInterrupt as "Exception
    ignored in ..." and goes on (what happens when a real signal lands in import
    machinery's weakref callbacks). `import-prepare` instead of `import`: the same for
    `python -m train.prepare ARGS`.
"""

from __future__ import annotations

import importlib.abc
import os
import runpy
import signal
import sys
import time
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


class _StallingTokenizer:
    """A tokenizer that is `tok`, except that its backend stalls in any process but this one."""

    def __init__(self, tok, pidfile: Path) -> None:
        self._tok, self._backend = tok, _StallingBackend(tok.backend_tokenizer, pidfile)

    def __len__(self) -> int:
        return len(self._tok)

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    @property
    def backend_tokenizer(self):
        return self._backend


class _StallingBackend:
    def __init__(self, backend, pidfile: Path) -> None:
        self._backend, self._pidfile, self._pid = backend, pidfile, os.getpid()

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def encode_batch_fast(self, *args, **kw):
        return self.encode_batch(*args, **kw)

    def encode_batch(self, *args, **kw):
        if os.getpid() != self._pid:  # a pool worker
            tmp = self._pidfile.with_suffix(".tmp")
            tmp.write_text(str(os.getpid()))
            tmp.rename(self._pidfile)
            time.sleep(600)
        return self._backend.encode_batch(*args, **kw)


def stall(data: str, tokenizer: str, root: str, pidfile: str) -> int:
    from train.data import load_tokenizer
    from train.data.pretok import ensure_token_cache
    from train.data.source import DocSource
    from train.errors import DataError
    from train.signals import stop_signals_interrupt

    tok = _StallingTokenizer(load_tokenizer(tokenizer), Path(pidfile))
    with stop_signals_interrupt():  # what run() has in place while it pre-tokenizes
        try:
            src = DocSource(data, "train", "text", cache_dir=Path(root) / "hf")
            ensure_token_cache(src, tok, Path(root) / "cache", progress=False, processes=2)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
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


def import_signal(main: str, module: str, sig: str, when: str, args: list[str]) -> None:
    sys.meta_path.insert(0, _SignalOnImport(module, signal.Signals[sig], when))
    sys.argv = [main, *args]
    runpy.run_module(main, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if sys.argv[1] == "pretok":
        sys.exit(pretok(int(sys.argv[2]), *sys.argv[3:6]))
    if sys.argv[1] == "stall":
        sys.exit(stall(*sys.argv[2:6]))
    main = {"import": "train", "import-prepare": "train.prepare"}[sys.argv[1]]
    import_signal(main, sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
