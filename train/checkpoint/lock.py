"""A run owns its checkpoint_dir: one lock file, checkpoint_dir/.octo.lock (train/locks.py),
taken before anything in the folder is written, restored or removed and held until the run
ends. A second run on the folder, fresh or resuming, is one CheckpointError line naming the
holder (PID and host, which the holder writes into the file) and exits 2.

Why: two runs in one folder remove each other's temporary folders and rotate each other's
checkpoints away, and a resume picks a checkpoint that the other run's rotation deletes while
it is read. The folder a run resumes from, when it is not its checkpoint_dir, is held too until
the checkpoint is loaded, so its own run cannot rotate it away meanwhile (a folder this process
cannot write, e.g. a read-only copy, has no writer to fear and is not locked).

Under torchrun only rank 0 takes the locks (checkpoint_dir is one shared folder; rank 0 is the
one that writes it) and the others learn the outcome from it, so every rank stops with the same
line instead of waiting in a collective for a rank that has gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from train.checkpoint.verify import STEP_FOLDER, TRANSIENT_FOLDER
from train.distributed import broadcast_object
from train.errors import CheckpointError
from train.locks import HeldLock, owner_of, try_lock

LOCK_NAME = ".octo.lock"


def _owner() -> str:
    """What a holder writes into its lock file: enough for another run to name it."""
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n"


def holder(lock_file: Path) -> str:
    """The holder of lock_file, in words: "PID 1234 on host h, since 2026-12-06 10:00:00"."""
    try:
        who = json.loads(owner_of(lock_file))
        return f"PID {who['pid']} on host {who['host']}, since {who['since']}"
    except (ValueError, TypeError, KeyError):  # not written yet, or gone
        return "a process that has not written its PID yet"


def lock_folder(folder: Path) -> HeldLock | None:
    """Hold folder/.octo.lock; None when another process holds it."""
    return try_lock(Path(folder) / LOCK_NAME, owner=_owner())


def resume_source(resume_from: str | Path) -> Path | None:
    """The checkpoint_dir that resume_from lies in: its parent when it names one checkpoint (a
    checkpoint_step_N folder, its seed spelling .pt, or any folder with a trainer_state.json),
    else resume_from itself (a folder of checkpoints). None when it does not exist."""
    p = Path(resume_from)
    if p.suffix == ".pt" and not p.exists():
        p = p.with_suffix("")
    named = STEP_FOLDER.fullmatch(p.name) or TRANSIENT_FOLDER.fullmatch(p.name)
    if named or (p / "trainer_state.json").is_file():
        p = p.parent
    return p if p.is_dir() else None


class RunLocks:
    """The locks a run holds (on rank 0; none on the other ranks)."""

    def __init__(self, own: HeldLock | None = None, source: HeldLock | None = None) -> None:
        self.own, self.source = own, source

    def release_source(self) -> None:
        """Let go of the folder resumed from, once its checkpoint is loaded."""
        if self.source is not None:
            self.source.release()

    def release(self) -> None:
        self.release_source()
        if self.own is not None:
            self.own.release()


def _take(checkpoint_dir: str, resume_from: str | None) -> RunLocks:
    root = Path(checkpoint_dir)
    try:
        own = lock_folder(root)
    except OSError as e:  # check_writable_folders wrote there: seldom, e.g. a full disk now
        raise CheckpointError(
            f"cannot create the lock file {root / LOCK_NAME} ({e.strerror or e}); set "
            "checkpoint_dir to a folder you can write to"
        ) from None
    if own is None:
        raise CheckpointError(
            f"checkpoint_dir {root} is in use by another run ({holder(root / LOCK_NAME)}); wait "
            "for that run to end or stop it, or set checkpoint_dir to another folder"
        )
    locks = RunLocks(own)
    source = resume_source(resume_from) if resume_from else None
    if source is None or source.resolve() == root.resolve():
        return locks
    try:
        locks.source = lock_folder(source)
    except OSError:  # a folder this process cannot write: no run writes it either
        return locks
    if locks.source is None:
        locks.release()
        raise CheckpointError(
            f"resume_from {resume_from} is in {source}, which another run is writing "
            f"({holder(source / LOCK_NAME)}); wait for that run to end, or resume from a copy "
            "of the checkpoint"
        )
    return locks


def own_run_folders(checkpoint_dir: str, resume_from: str | None, env: Any) -> RunLocks:
    """Take the run's locks (module docstring); call on every rank, after the process group is
    joined and before anything in checkpoint_dir is touched. Raises CheckpointError (one line,
    on every rank) when another run holds one."""
    locks, error = RunLocks(), None
    if env.is_main:
        try:
            locks = _take(checkpoint_dir, resume_from)
        except CheckpointError as e:
            error = str(e)
    error = broadcast_object(error, env)
    if error is not None:
        raise CheckpointError(error)
    return locks
