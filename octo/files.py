"""Durable file writes and safetensors shards: the one copy of each, for every folder Octo saves.

    fsync(path)                       a written file, or a folder's list of names, onto the disk
    write_durable(path, data)         write str (UTF-8) or bytes, flush, fsync
    write_json(path, obj, ...)        JSON text, made whole before a byte is written, durably
    write_atomic(path, write)         write(tmp) beside path, fsync, rename over path, fsync the
                                      folder: path is the old file or the whole new one
    parse_size("2GB") -> 2_000_000_000           transformers' max_shard_size strings
    plan_shards({name: tensor}, max_bytes) -> [[name, ...], ...]
    save_safetensors({name: tensor}, path)       safetensors.torch.save_file, errors as OSError

Why fsync: a rename or a close is not on the disk until the kernel writes it back; after a
power cut a folder could hold a new name pointing at empty data. Every writer that promises a
complete file (a model folder, a checkpoint, an export) fsyncs the file and then its folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

# size suffixes as transformers reads them: KB = 10^3, KiB = 2^10
UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


# ----- durable writes -----------------------------------------------------------------------------


def fsync(path: Path) -> None:
    """Flush a written file (or a directory's list of names: a new file, a rename) to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: str | bytes) -> None:
    """Write `data` to path (str as UTF-8), flush and fsync it. The folder's entry is the
    caller's to fsync (once, after all of its files)."""
    mode, encoding = ("wb", None) if isinstance(data, bytes) else ("w", "utf-8")
    with open(path, mode, encoding=encoding) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """json.dumps(obj) plus a newline, written durably. The text is made first, so a value JSON
    cannot hold (a tensor, a set: TypeError, ValueError) fails before the file is touched. NaN and
    infinity are written as JSON's common extension (NaN, Infinity), as json.dumps does."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=True) + "\n"
    write_durable(path, text)


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Replace `path` as one step: write(tmp) fills a new file beside it (same folder, so the
    rename cannot cross disks), which is fsynced, renamed over path, and the folder fsynced.
    On any failure, an interrupt included, tmp is removed and path is as it was. Returns path."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


# ----- safetensors shards -------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like transformers': "2GB" (10^9), "500MB", "1GiB" (2^30),
    "50KB"; a lowercase trailing "b" as in "5Gb" means bits, as in transformers."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size must be an int or a string like '2GB', got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?I?B?)\s*", size, flags=re.IGNORECASE)
        if m is None or m.group(2).upper() not in UNITS:
            raise ValueError(
                f"max_shard_size {size!r} is not a size; use an int (bytes) or a string like "
                "'2GB', '500MB', '1GiB'"
            )
        n = int(m.group(1)) * UNITS[m.group(2).upper()]
        if size.strip().endswith("b") and m.group(2).upper() in ("KB", "MB", "GB", "TB"):
            n //= 8  # bits, transformers' convention
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names grouped into shards of at most max_bytes each (model weights and optimizer state).
    Greedy, in state-dict order (transformers' rule): a new shard starts when the next tensor
    would overflow the current one; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors.torch.save_file (metadata format "pt"), with a failed write raised as the
    OSError it is. The library reports a full disk as SafetensorError("... No space left on
    device (os error 28)"), which is no OSError and carries no errno, so a caller could neither
    tell it from a bug nor say what to do. Not fsynced: the caller fsyncs what it wrote."""
    try:
        # looked up at call time (not imported by name): tests replace it to simulate a full disk
        safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e
