"""Exclusive file locks: one process at a time in a folder (a run's checkpoint_dir, a data cache
being built), released by the kernel on any exit, kill -9 included, so a lock is never stale.

    lock = try_lock(path, owner="...")   # None when another process holds it (owner_of names it)
    with wait_lock(path): ...            # blocks until the holder lets go

Why POSIX record locks (fcntl.lockf) and not flock: an flock belongs to the open file, which a
forked child shares, so DataLoader or pool workers forked during a run would keep the run's lock
alive after the run itself was killed; a POSIX lock belongs to the process alone. Its trap, that
closing ANY descriptor of the file in the process drops the process's lock, is why this module
is the only one that opens these files, and why a path already held in this process is refused
from a table here before any descriptor is opened.

Why the lock file is removed on release, and checked after locking: a finished run leaves no
file behind, and a process that opened the file just before the holder removed it would lock a
name that no longer exists; so after locking, the descriptor's file must still be the one at
the path, or the lock is taken again on the new file. A run killed with SIGKILL leaves the file,
unlocked: the next one takes it over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

__all__ = ["HeldLock", "owner_of", "try_lock", "wait_lock"]

_held: dict[str, HeldLock] = {}  # resolved path -> the lock this process holds on it


class HeldLock:
    """A lock this process holds on `path`; release() (or leaving a `with`) removes the file and
    lets go. Releasing twice is harmless."""

    def __init__(self, path: Path, fd: int, owner: str = "") -> None:
        self.path, self._fd, self.owner = path, fd, owner

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):  # while still locked: nobody can lock it meanwhile
            os.unlink(self.path)
        os.close(self._fd)  # drops the lock
        self._fd = -1
        _held.pop(_key(self.path), None)

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _key(path: Path) -> str:
    return str(Path(path).resolve())


def _lock(path: Path, wait: bool) -> int | None:
    """A descriptor of `path` holding its lock, or None (wait=False) when another process holds
    it. Creates the file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if not wait and e.errno in (errno.EACCES, errno.EAGAIN):
                return None
            raise
        try:
            here, mine = os.stat(path), os.fstat(fd)
            if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as we opened it: lock the current one


def try_lock(path: str | Path, owner: str = "") -> HeldLock | None:
    """Lock `path` (created if missing) without waiting and write `owner` into it (who holds it,
    for owner_of); None when another process, or this one, already holds it."""
    path = Path(path)
    if _key(path) in _held:
        return None
    fd = _lock(path, wait=False)
    if fd is None:
        return None
    if owner:
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode(), 0)
    lock = _held[_key(path)] = HeldLock(path, fd, owner)
    return lock


def wait_lock(path: str | Path) -> HeldLock:
    """Lock `path` (created if missing), waiting for any other process holding it."""
    path = Path(path)
    if _key(path) in _held:
        raise RuntimeError(f"{path} is already locked by this process")
    lock = _held[_key(path)] = HeldLock(path, _lock(path, wait=True))
    return lock


def owner_of(path: str | Path) -> str:
    """What the holder of `path` wrote into it ("" when unknown: it has not written yet, or the
    file is gone). A lock of this process's own is answered from memory: opening and closing
    the file here would drop the lock (see the module docstring)."""
    held = _held.get(_key(Path(path)))
    if held is not None:  # this process's own: what it wrote (the file stays closed here)
        return held.owner
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return ""
