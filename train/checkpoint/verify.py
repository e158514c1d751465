"""Is a checkpoint folder whole and usable? The names a checkpoint folder has, the check of a
finished one (verify_checkpoint: marker, sizes, checksums, headers, JSON, trainer state), and
whether a final model folder holds a checkpoint's weights (same_weights).

A verified folder is remembered by its files' (name, size, mtime, inode) in this process:
resolve_resume verifies the folder it picks and load_checkpoint verifies it again; while no file
changed in between, the second check skips re-reading every byte for the checksums.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from octo.files import read_header
from octo.hf_index import INDEX_NAME, read_weight_map
from octo.integrity import MARKER_NAME, check_checksums, checksum_mismatch, read_marker
from train.checkpoint.state import check_optimizer_meta, check_trainer_state, read_json
from train.errors import CheckpointError

STEP_FOLDER = re.compile(r"checkpoint_step_(\d+)")
TRANSIENT_FOLDER = re.compile(r"checkpoint_step_(\d+)\.(tmp|old)")  # a save or removal under way
REQUIRED_FILES = ("config.json", "trainer_state.json", "optimizer.json")

_verified: dict[Path, tuple] = {}


def _signature(path: Path, files: dict) -> tuple:
    stats = [(rel, os.stat(path / rel)) for rel in sorted(files)]
    return tuple((rel, st.st_size, st.st_mtime_ns, st.st_ino) for rel, st in stats)


def check_files(
    ckpt: Path, files: dict[str, int], crcs: dict[str, list[int]] | None = None, chunk: int = 0
) -> None:
    """Every file the completion marker lists exists with the recorded size and parses, and, when
    the marker records checksums (crcs: {path: chunk CRC-32s}, checkpoints since format 2), its
    bytes match them (octo.integrity.check_checksums)."""
    for rel, expected in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (corrupt checkpoint)")
        size = p.stat().st_size
        if size != expected:
            raise CheckpointError(f"{p} is {size} bytes, expected {expected} (truncated/changed)")
        if rel.endswith(".safetensors"):
            try:
                read_header(p)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        elif rel.endswith(".json"):
            read_json(p)
    if crcs is not None:
        try:
            check_checksums(ckpt, files, crcs, chunk)
        except ValueError as e:
            raise CheckpointError(str(e)) from None


def own_step(path: Path, meta: dict) -> int | None:
    """The step a checkpoint folder is of: its name's N (checkpoint_step_N, .old or .tmp) and
    its marker's "step", which must agree; None when neither says (a renamed format-1 copy)."""
    m = STEP_FOLDER.fullmatch(path.name) or TRANSIENT_FOLDER.fullmatch(path.name)
    named = int(m.group(1)) if m else None
    marked = meta.get("step")
    if named is not None and marked is not None and named != marked:
        raise CheckpointError(
            f"{path / MARKER_NAME}: field 'step' is {marked} but the folder is "
            f"checkpoint_step_{named} (corrupt checkpoint)"
        )
    return named if named is not None else marked


def verify_checkpoint(path: str | Path) -> None:
    """Integrity check of a checkpoint folder: marker present and parsed; every file it lists
    present with its size and (since format 2) its checksums, which reads every byte once (see
    the module docstring); safetensors headers consistent with their file sizes; JSON parses;
    trainer_state.json holds every field the trainer reads, its step the folder's own
    (train/checkpoint/state.py). Raises CheckpointError naming the first bad file (and field).
    A format-1 checkpoint (no checksums) gets the size, header and parse checks."""
    path = Path(path)
    marker = path / MARKER_NAME
    if not marker.is_file():
        raise CheckpointError(
            f"{path} has no {MARKER_NAME}: its save never finished; resume from an earlier "
            "checkpoint (or name the parent folder to pick the newest complete one)"
        )
    try:
        meta = read_marker(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if meta.get("kind", "checkpoint") != "checkpoint":
        raise CheckpointError(
            f"{path} is a model folder (weights only, no optimizer or trainer state), not a "
            "checkpoint; resume from a checkpoint_step_N folder"
        )
    files = meta["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{path / name} is not part of the checkpoint (corrupt)")
    if "model.safetensors.index.json" not in files and "model.safetensors" not in files:
        raise CheckpointError(f"{path} holds no model weights (model*.safetensors)")
    crcs, chunk = meta.get("crc32"), meta.get("crc32_chunk")
    step = own_step(path, meta)
    try:
        signature = _signature(path, files)
    except OSError:
        signature = None  # a file is missing: check_files names it
    if signature is not None and _verified.get(path.resolve()) == signature:
        return
    check_files(path, files, crcs, chunk or 0)
    check_trainer_state(path / "trainer_state.json", read_json(path / "trainer_state.json"), step)
    check_optimizer_meta(path / "optimizer.json", read_json(path / "optimizer.json"))
    if signature is not None:
        _verified[path.resolve()] = signature


def is_model_folder(path: Path) -> bool:
    """A final model folder (its marker says kind "model"): weights, no trainer state."""
    try:
        return (read_marker(path) or {}).get("kind") == "model"
    except ValueError:
        return False  # a damaged marker: verify_checkpoint names it


def same_weights(final: Path, checkpoint: Path) -> bool:
    """True when the model folder `final` holds `checkpoint`'s weights byte for byte: the same
    weight files (index and shards), matching the checksums the checkpoint's completion marker
    recorded. A run's final model is saved from the state of its last checkpoint, so this tells
    a finished run from one whose `final` is missing, damaged or an earlier step's."""
    try:
        marker = read_marker(checkpoint) or {}
        crcs, chunk = marker.get("crc32") or {}, marker.get("crc32_chunk")
        names = {INDEX_NAME, *read_weight_map(final).values()}
        if names != {INDEX_NAME, *read_weight_map(checkpoint).values()} or names - set(crcs):
            return False
        return checksum_mismatch(final, crcs, chunk, names=sorted(names)) is None
    except (OSError, ValueError):  # missing, unreadable, corrupt, format 1: not known
        return False
