"""Completion markers and checksums of a saved folder: a training checkpoint and a final model
folder (train/checkpoint/folder.py) end with the same marker, written last by seal():

    checkpoint_complete.json   {"format": 2, "step": N, "files": {relative path: size in bytes},
                                "crc32": {relative path: [CRC-32 of each "crc32_chunk" bytes]},
                                "crc32_chunk": bytes, "kind": "model" (a final model folder; a
                                checkpoint has no "kind")}       (format 1: no checksums)

A folder with a marker is checked before it is used (verify_marked: every file it lists that
the reader needs is present, of its size and matches its checksums); a folder without one (a
transformers save, a final folder from before markers) loads unchecked. A marker that does not
parse is an error, not a reason to skip the check: a damaged folder must not pass as unmarked.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from octo.files import fsync, fsync_tree, write_json

MARKER_NAME = "checkpoint_complete.json"
CHECKSUM_CHUNK = 64 << 20  # bytes per CRC-32: chunks of one file are checked in parallel


def _crc32_chunk(path: Path, start: int, length: int) -> int:
    """CRC-32 of bytes [start, start + length) of path, read in 8 MiB pieces into an uninitialised
    buffer (no zeroing, no page fault per 4 KiB as through a memory map)."""
    buf = memoryview(np.empty(min(length, 8 << 20), dtype=np.uint8))
    crc, left = 0, length
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while left:
            n = f.readinto(buf[: min(left, len(buf))])
            if not n:
                break  # shorter than expected: the size check reports it
            crc = zlib.crc32(buf[:n], crc)
            left -= n
    return crc


def file_checksums(
    paths: dict[str, Path], chunk: int = CHECKSUM_CHUNK, extra: list | None = None
) -> dict[str, list[int]]:
    """{name: [CRC-32 of each `chunk` bytes of the file]} for paths {name: path}, computed on a
    few threads (zlib releases the GIL, so chunks hash in parallel with each other and with any
    `extra` callables, each on a thread of its own: e.g. the fsyncs, which wait on the disk).

    Why CRC-32 in chunks: it is in the standard library and catches every burst error of up to 32
    bits and any other change with probability 1 - 2^-32 per chunk; chunking lets one large shard
    use several cores (~1.5 GB/s per core here), which is what keeps a save's added cost small."""
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    out = {name: [0] * max(1, -(-size // chunk)) for name, size in sizes.items()}
    extra = list(extra or ())
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1) + len(extra)) as pool:
        pending = [pool.submit(fn) for fn in extra]
        futures = {}
        for name, crcs in out.items():
            for k in range(len(crcs)):
                n = min(chunk, sizes[name] - k * chunk)
                futures[pool.submit(_crc32_chunk, paths[name], k * chunk, n)] = (name, k)
        for fut, (name, k) in futures.items():
            out[name][k] = fut.result()
        for fut in pending:
            fut.result()
    return out


def checksum_mismatch(
    directory: Path, expected: dict[str, list[int]], chunk: int, names: list[str] | None = None
) -> str | None:
    """The first file (of `names`, default all of `expected`) whose chunk CRCs differ from the
    recorded ones, as an error text naming it and the byte range; None when all match."""
    names = list(expected) if names is None else [n for n in names if n in expected]
    got = file_checksums({n: directory / n for n in names}, chunk)
    for n in names:
        for k, (a, b) in enumerate(zip(got[n], expected[n])):
            if a != b:
                return (
                    f"{directory / n} does not match its checksum (bytes {k * chunk} to "
                    f"{min((k + 1) * chunk, (directory / n).stat().st_size)} changed after the "
                    "save: corrupt checkpoint)"
                )
        if len(got[n]) != len(expected[n]):
            return f"{directory / n} has {len(got[n])} checksum chunks, expected {len(expected[n])}"
    return None


def check_checksums(
    directory: Path, files: dict[str, int], crcs: dict[str, list[int]], chunk: int
) -> None:
    """ValueError naming the first of `files` (a marker's list) that has no checksum in `crcs`
    or whose bytes differ from them (reads every byte: a flipped bit inside tensor data, or a
    same-size edit of a JSON file, which size and header checks cannot see)."""
    unchecked = sorted(set(files) - set(crcs))
    if unchecked:
        raise ValueError(f"{directory / unchecked[0]} has no checksum in the marker (corrupt)")
    bad = checksum_mismatch(directory, crcs, chunk, names=list(files))
    if bad:
        raise ValueError(bad)


def fsync_and_checksum(root: Path, chunk: int) -> tuple[dict[str, int], dict[str, list[int]]]:
    """octo.files.fsync_tree(root), and the chunk CRC-32s of every file (file_checksums)
    computed meanwhile: the files were just written, so they are read back from the page cache
    while the fsyncs wait on the disk. Returns ({relative path: size}, {relative path:
    [CRC-32s]})."""
    paths = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
    sizes: dict[str, int] = {}
    crcs = file_checksums(paths, chunk, extra=[lambda: sizes.update(fsync_tree(root))])
    return sizes, crcs


def seal(
    folder: Path,
    step: int | None = None,
    kind: str | None = None,
    before_marker: Callable[[], Any] | None = None,
) -> None:
    """Mark `folder` complete: fsync every file in it, checksum each, then write the completion
    marker, listing every file present now, and fsync the folder. Call it last, after every
    file of the folder is written: a file added later is not covered (a reader that asks for
    it is told so). step: a checkpoint's (None: not recorded); kind: None for a checkpoint,
    "model" for a final model folder (never resumed from); before_marker: called between the
    checksums and the marker (a test hook's crash point)."""
    files, crcs = fsync_and_checksum(folder, CHECKSUM_CHUNK)
    if before_marker is not None:
        before_marker()
    marker: dict[str, Any] = {"format": 2}
    marker.update({"step": step} if step is not None else {})
    marker.update({"files": files, "crc32": crcs, "crc32_chunk": CHECKSUM_CHUNK})
    marker.update({"kind": kind} if kind else {})
    write_json(folder / MARKER_NAME, marker)  # positional only: tests replace it (a full disk)
    fsync(folder)


def inside_folder(name: object) -> bool:
    """A marker's file name: a relative path inside the folder (no "..", not absolute)."""
    if not isinstance(name, str) or not name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts


def read_marker(directory: Path) -> dict | None:
    """directory's completion marker, its shape checked: None when there is none; ValueError
    naming it when it does not parse or lists its files, sizes or checksums malformed."""
    path = Path(directory) / MARKER_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({e}) (corrupt folder)") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(
        inside_folder(k) and type(v) is int and v >= 0 for k, v in files.items()
    ):
        raise ValueError(f"{path} lists no files (corrupt folder)")
    crcs, chunk = meta.get("crc32"), meta.get("crc32_chunk")
    if crcs is not None and not (
        isinstance(crcs, dict)
        and all(isinstance(v, list) and all(type(c) is int for c in v) for v in crcs.values())
        and type(chunk) is int
        and chunk > 0
    ):
        raise ValueError(f"{path} has malformed checksums (corrupt folder)")
    if "step" in meta and (type(meta["step"]) is not int or meta["step"] < 0):
        raise ValueError(f"{path}: field 'step' is {meta['step']!r:.40}, not int >= 0 (corrupt)")
    return meta


def check_listed(directory: Path, files: dict[str, int], names: list[str]) -> None:
    """ValueError naming the first of `names` that is missing or not of the size `files` (a
    marker's list) records."""
    for rel in names:
        p = Path(directory) / rel
        if not p.is_file():
            raise ValueError(f"{p} is missing (the save listed it in {MARKER_NAME})")
        size = p.stat().st_size
        if size != files[rel]:
            raise ValueError(f"{p} is {size} bytes, expected {files[rel]} (truncated/changed)")


def verify_marked(directory: Path, names: list[str] | None = None) -> None:
    """For a folder with a completion marker: ValueError naming the first of `names` (default:
    every file it lists) that the marker does not list, that is missing or resized, or whose
    bytes differ from its checksums. Reading costs ~1 s per 1.5 GB per core, little beside
    building a model. A folder without a marker is not checked."""
    directory = Path(directory)
    meta = read_marker(directory)
    if meta is None:
        return
    files = meta["files"]
    names = list(files) if names is None else names
    for name in names:
        if name not in files:
            raise ValueError(
                f"{directory / name} is not listed in {directory / MARKER_NAME}: it was added or "
                "replaced after the save; restore the folder"
            )
    check_listed(directory, files, names)
    if meta.get("crc32") is not None:
        check_checksums(directory, {n: files[n] for n in names}, meta["crc32"], meta["crc32_chunk"])
