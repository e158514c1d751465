"""How Octo's processes take SIGINT and SIGTERM (the stop signals).

The main process (`python -m train`):
* from the first line of main() until training starts, and again after it (the final model's
  save, sampling), a stop signal raises KeyboardInterrupt (`stop_signals_interrupt`): the run
  ends with one line naming what is saved, exit 130. During training the Trainer installs its
  own handlers (`finish_step_on_stop`: finish the step, save, exit 0).
* An interrupt can be swallowed: Python reports an exception raised inside a `__del__` method or
  a weakref callback (both run in the middle of imports) as "Exception ignored in ..." and goes
  on. So the handler also records the signal, and `raise_if_interrupted()` at the end of each
  start-up phase raises it again.

Worker processes (the pool that pre-tokenizes, the DataLoader workers of streamed data) are
forked inside `forking_workers()` and call `init_worker_signals()` first. They ignore SIGINT and
every SIGTERM not sent by their parent, leaving the stop to the main process, which ends them
itself; a SIGTERM from the parent (Pool.terminate, the DataLoader's shutdown, multiprocessing's
exit) ends a worker at once, with status 0. Why neither alternative:
* the handlers the fork copies from the main process: a Python handler runs only between
  bytecodes, so a SIGTERM that lands just before a blocking wait is never acted on and
  Pool.terminate() waits forever for that worker (seen, in pre-tokenizing); and the
  KeyboardInterrupt it raises prints a worker traceback;
* Python's default (die): a SIGTERM to the whole process group (what `timeout`, SLURM and
  systemd send, and torchrun to each rank's group) kills the DataLoader workers, the main
  process then fails inside its checkpoint save ("DataLoader worker ... is killed by signal"),
  and a pool worker killed while it holds its task queue's lock hangs Pool.terminate().
The parent's SIGTERM is told apart by its sender (`sigwaitinfo` in a thread of the worker, with
SIGTERM blocked in every thread), so a signal can never be lost between bytecodes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: str | None = None  # the stop signal received inside stop_signals_interrupt(), if any
_depth = 0  # nesting of stop_signals_interrupt() (python -m train's main(), then run())


def _interrupt(signum: int, frame: Any) -> None:
    global _received
    _received = signal.Signals(signum).name
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM raise KeyboardInterrupt and are recorded for
    raise_if_interrupted(); the handlers in place before are restored on exit. The record is
    cleared when the outermost of nested uses exits. Off the main thread (where handlers cannot
    be set) nothing changes."""
    global _depth, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _received = None  # a record left by a signal in the instant of an earlier exit
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if _depth == 0:
            _received = None


@contextlib.contextmanager
def finish_step_on_stop(
    stop: Callable[[str], None], stopping: Callable[[], bool]
) -> Iterator[None]:
    """Training's handlers (Trainer.fit): SIGINT/SIGTERM call stop(name) (the Trainer finishes the
    step, saves, exits 0). A second Ctrl-C (stopping() already true) aborts at once: a
    KeyboardInterrupt, so a save in progress is dropped whole, and run() names the last complete
    checkpoint, exit 130. The handlers in place before are restored on exit. Off the main thread
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: Any) -> None:
        if stopping() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt when a stop signal came inside stop_signals_interrupt() (one whose
    KeyboardInterrupt Python may have swallowed as "Exception ignored")."""
    if _received is not None:
        raise KeyboardInterrupt


def ignore_stop_signals() -> None:
    """SIGINT and SIGTERM ignored from now on: for a process whose exit code is decided."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def forking_workers() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread while worker processes (and helper threads) are
    started inside: a worker then starts with them blocked, so none reaches the main process's
    handlers before init_worker_signals() runs. Signals that arrive meanwhile are delivered
    when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def init_worker_signals() -> None:
    """In a forked worker process, first (its main thread, before it starts threads): ignore
    SIGINT, and end at once, status 0, on a SIGTERM from the parent (or any SIGTERM once the
    parent is gone); ignore any other SIGTERM. See the module docstring for why."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's Python handler
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(
        target=_end_on_parents_sigterm, args=(parent,), name="octo-sigterm", daemon=True
    ).start()


def _end_on_parents_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(0)
