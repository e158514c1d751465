"""A pool of forked worker processes that fails, instead of hanging, when a worker dies.

    pool = ForkPool(processes, initializer)   # the workers are forked here
    future = pool.submit(fn, arg)             # fn and its result travel by pickle
    result = pool.result(future)              # fn's result, or WorkerDied
    pool.close()                              # every result is in: the workers exit, joined
    pool.terminate()                          # on an error or an interrupt: ended at once

A worker can die under its task: the kernel's out-of-memory killer sends SIGKILL. With
multiprocessing.Pool that hangs the run: the pool forks a replacement but never completes the
dead worker's task, so its AsyncResult waits forever; and a worker killed while it holds the
task queue's lock (an idle worker waits for the next task holding it) leaves the lock taken, so
every other worker and Pool.terminate() wait forever too. concurrent.futures'
ProcessPoolExecutor watches each worker's sentinel instead: a death fails every pending future
with BrokenProcessPool, and the executor ends the other workers itself (terminating, not waiting
on, the queue). ForkPool is that executor with the fork start method (the workers inherit the
parent's memory, e.g. a tokenizer, without pickling it), workers that leave stop signals to
the parent (train/signals.py), and a terminate() that ends busy workers at once where the
executor's shutdown() would wait for their tasks.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from train.signals import forking_workers, init_worker_signals


class WorkerDied(RuntimeError):
    """A worker process died under the pool (the message says how: "killed by SIGKILL")."""


def _init(initializer: Callable[[], None] | None) -> None:
    init_worker_signals()  # first: a stop signal must not reach the parent's handlers here
    if initializer is not None:
        initializer()


class ForkPool:
    """`processes` forked workers, each running initializer() first (see the module docstring)."""

    def __init__(self, processes: int, initializer: Callable[[], None] | None = None) -> None:
        before = set(multiprocessing.active_children())
        with forking_workers():
            self._executor = ProcessPoolExecutor(
                processes,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_init,
                initargs=(initializer,),
            )
            # With fork, the first submit forks every worker and starts the thread that watches
            # them: here, inside forking_workers().
            self._executor.submit(int)
        # this pool's workers: the executor forks no replacement, so the list is final
        self.workers = [p for p in multiprocessing.active_children() if p not in before]

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._executor.submit(fn, *args)

    def result(self, future: Future) -> Any:
        """future's result (blocking); WorkerDied when a worker died (the pool is then ended)."""
        try:
            return future.result()
        except BrokenProcessPool:
            raise WorkerDied(self._how_a_worker_died()) from None

    def close(self) -> None:
        """After the last result: the workers exit when the queue runs dry, and are joined."""
        self._executor.shutdown(wait=True)

    def terminate(self) -> None:
        """End every worker now (a SIGTERM from its parent ends it at once) and join them."""
        for p in self.workers:
            if p.exitcode is None:
                p.terminate()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _how_a_worker_died(self) -> str:
        for p in self.workers:
            p.join(5)  # the dead one is a zombie until joined; the others are being ended
        for p in self.workers:
            code = p.exitcode
            if code is not None and code < 0:
                try:
                    return f"killed by {signal.Signals(-code).name}"
                except ValueError:
                    return f"killed by signal {-code}"
        codes = sorted({p.exitcode for p in self.workers if p.exitcode})
        return f"ended with exit code {codes[0]}" if codes else "ended unexpectedly"
