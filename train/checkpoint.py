"""Checkpoints: atomic saves of everything a run needs to continue bit-exactly, and the choice of
which checkpoint to resume from.

    checkpoints/checkpoint_step_5000/
      config.json, model.safetensors.index.json, model-0000K-of-0000N.safetensors  (save_pretrained:
                                                  the folder loads as a Llama model)
      optimizer.json, optimizer-0000K-of-0000N.safetensors   (train/checkpoint_io.py)
      trainer_state.json    step, epoch, tokens_seen, scheduler, scaler, data position, RNG states
                            (train/checkpoint_state.py: each field is checked before a resume)
      train_config.json     the resolved TrainConfig (a local tokenizer named as this folder's copy)
      tokenizer files, generation_config.json   (when a tokenizer is given: octo.tokenizer_files)
      checkpoint_complete.json   written last: {"format": 2, "step", "files": {relative path:
                                 size in bytes}, "crc32": {relative path: [CRC-32 of each
                                 "crc32_chunk" bytes]}} (format 1, before checksums: no "crc32");
                                 octo/integrity.py reads it (final/ has one too: seal_folder)

Atomic: everything goes to the sibling `checkpoint_step_5000.tmp`, each file is fsynced, the
completion marker is written last, the folder is renamed into place and the parent fsynced. A crash
at any point leaves the previous checkpoints untouched and, at worst, a `.tmp` folder that is never
resumed from and is removed (with a warning) by the next save. Older complete checkpoints are
removed only after the new one is in place, keeping `keep_last`.

Nothing is ever unpickled: tensors are safetensors, everything else JSON.

Test hook: OCTO_CRASH_AT=<point>[:<step>] makes the process SIGKILL itself at that point of a save
(of that step only, when given), which is how the crash tests reproduce a kill -9 mid-save.
Points, in order: after_model (model shards written), after_first_shard (plus the first optimizer
shard), before_marker (all files written and fsynced), before_rename (marker written),
before_rotate (renamed into place, older checkpoints not yet removed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

from octo.hf_io import _read_weight_map, parse_size, unwrap_model
from octo.integrity import CHECKSUM_CHUNK, MARKER_NAME, read_marker
from octo.tokenizer_files import save_tokenizer, special_token_ids
from train.checkpoint_io import (
    CheckpointError,
    check_files,
    fsync_and_checksum,
    fsync_dir,
    load_optimizer,
    param_names,
    read_header,
    read_json,
    read_tensors,
    save_optimizer,
    write_json,
)
from train.checkpoint_state import (
    capture_rng_state,
    check_optimizer_meta,
    check_trainer_state,
    restore_rng_state,
)
from train.config import TrainConfig
from train.data import with_own_tokenizer
from train.data.stream import batch_size_change_effect
from train.errors import write_error_fix

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "complete_checkpoints",
    "load_checkpoint",
    "resolve_resume",
    "restore_rng_state",
    "resume_warnings",
    "save_checkpoint",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

MARKER = MARKER_NAME
_FINAL = re.compile(r"checkpoint_step_(\d+)")
_TRANSIENT = re.compile(r"checkpoint_step_(\d+)\.(tmp|old)")  # a save or a removal in progress
_REQUIRED = ("config.json", "trainer_state.json", "optimizer.json")


def _crash_point(point: str, step: int) -> None:
    """Test hook (see the module docstring): SIGKILL this process at `point` of a save."""
    want = os.environ.get("OCTO_CRASH_AT")
    if not want:
        return
    name, _, at_step = want.partition(":")
    if name == point and (not at_step or int(at_step) == step):
        os.kill(os.getpid(), signal.SIGKILL)


# ----- save ---------------------------------------------------------------------------------------


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the complete folder `tmp` at `final` (renames on one file system). A folder already
    at `final` is renamed aside first and removed only once `tmp` stands in its place, so a crash
    at any point leaves a complete copy under one of the two names."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)  # an earlier crash's, when final is missing
    if final.exists():
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def seal_folder(
    folder: Path, step: int | None = None, kind: str | None = None, before_marker: Any = None
) -> None:
    """Mark `folder` complete (octo/integrity.py's marker): fsync every file in it, checksum
    each, then write the completion marker, listing every file present now, and fsync the
    folder. Call it last, after every file of the folder is written: a file added later is not
    covered (a reader that asks for it is told so). step: a checkpoint's (None: not recorded);
    kind: None for a checkpoint, "model" for a final model folder (never resumed from)."""
    files, crcs = fsync_and_checksum(folder, CHECKSUM_CHUNK)
    if before_marker is not None:
        before_marker()
    marker: dict[str, Any] = {"format": 2}
    marker.update({"step": step} if step is not None else {})
    marker.update({"files": files, "crc32": crcs, "crc32_chunk": CHECKSUM_CHUNK})
    marker.update({"kind": kind} if kind else {})
    write_json(folder / MARKER, marker)
    fsync_dir(folder)


def what_stands(root: Path) -> str:
    """After a failed save into root: the complete checkpoints left there, in words."""
    found = complete_checkpoints(root)
    if not found:
        return "no checkpoint was saved before this one"
    return f"the earlier checkpoints are intact (newest: {found[-1][1]})"


def checkpoint_write_fix(e: OSError) -> str:
    """What to do about a failed checkpoint write, by its errno."""
    return write_error_fix(e, "checkpoint_dir", too_big="lower max_shard_size",
                           other="check that checkpoint_dir is writable")  # fmt: skip


def _remove(path: Path) -> None:
    """Remove a checkpoint folder: rename it to a transient name first, so a crash half-way
    leaves something the next save cleans up, never a half-deleted folder that looks complete."""
    doomed = path.with_name(path.name + ".old")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def _restore_old(old: Path, final: Path) -> None:
    """Rename the verified `old` (checkpoint_step_N.old) back to `final` (checkpoint_step_N),
    with a warning. Raises CheckpointError (from verify_checkpoint) when `old` is not intact."""
    verify_checkpoint(old)
    log.warning("restoring %s as %s: a save replacing it was interrupted", old.name, final.name)
    with contextlib.suppress(FileNotFoundError):  # another process restored it first
        os.rename(old, final)
    fsync_dir(final.parent)


def _recover_replaced(root: Path) -> None:
    """Undo the one crash that could lose a complete checkpoint: replace_folder renamed
    checkpoint_step_N aside to .old and died before the new one took its place. A verified .old
    with no checkpoint_step_N beside it is renamed back (a partly removed one fails verification
    and is left for _clean_stale)."""
    for p in sorted(root.iterdir()):
        m = _TRANSIENT.fullmatch(p.name)
        final = root / f"checkpoint_step_{m.group(1)}" if m else None
        if m is None or m.group(2) != "old" or not p.is_dir() or final.exists():
            continue
        with contextlib.suppress(CheckpointError):
            _restore_old(p, final)


def _recover_named(final: Path) -> None:
    """resume_from names checkpoint_step_N, which is missing, and checkpoint_step_N.old stands
    beside it: the crash _recover_replaced undoes, met through the folder's own name. A verified
    .old is restored; a damaged one is an error (it is not restored, and the name given does not
    exist), saying what is wrong and the way out."""
    old = final.with_name(final.name + ".old")
    if final.exists() or not _FINAL.fullmatch(final.name) or not old.is_dir():
        return
    try:
        _restore_old(old, final)
    except CheckpointError as e:
        raise CheckpointError(
            f"resume_from {final} does not exist, and {old.name} beside it (left by an "
            f"interrupted save that was replacing it) is damaged: {e}; resume from an earlier "
            f"checkpoint, or from the parent folder {final.parent} (its newest intact checkpoint)"
        ) from None


def _clean_stale(root: Path) -> None:
    _recover_replaced(root)
    for p in sorted(root.iterdir()):
        if _TRANSIENT.fullmatch(p.name) and p.is_dir():
            log.warning("removing %s, left by an interrupted checkpoint save", p)
            shutil.rmtree(p)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the finished checkpoints in root (those with the marker), by step."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _FINAL.fullmatch(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    train_config: TrainConfig,
    tokenizer: Any = None,
    keep_last: int = 3,
    max_shard_size: str | int = "2GB",
) -> Path:
    """Write root/checkpoint_step_{step}/ atomically and keep the newest keep_last checkpoints.

    Call it on one process (rank 0). trainer_state must be JSON (see the module docstring).
    A failed write (a full disk: ENOSPC) raises one CheckpointError; the partial folder is removed
    and the earlier checkpoints are untouched. Returns the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    final = root / f"checkpoint_step_{step}"
    tmp = root / f"checkpoint_step_{step}.tmp"
    shard_bytes = parse_size(max_shard_size)
    model = unwrap_model(model)
    what = "the model shards"
    t0 = time.perf_counter()
    try:
        tmp.mkdir()
        token_ids = special_token_ids(tokenizer) if tokenizer is not None else None
        model.save_pretrained(tmp, max_shard_size=shard_bytes, token_ids=token_ids)
        _crash_point("after_model", step)
        what = "the optimizer state"
        save_optimizer(
            tmp,
            optimizer,
            param_names(model),
            shard_bytes,
            after_shard=lambda k: k == 0 and _crash_point("after_first_shard", step),
        )
        what = "trainer_state.json"
        write_json(tmp / "trainer_state.json", trainer_state)
        what = "train_config.json"
        if tokenizer is not None:  # it names the tokenizer's copy in this folder
            train_config = with_own_tokenizer(train_config)
        write_json(tmp / "train_config.json", train_config.to_dict())
        if tokenizer is not None:
            what = "the tokenizer files"
            save_tokenizer(tokenizer, tmp, model.config.max_position_embeddings)
        what = f"the files (fsync) and {MARKER}"
        seal_folder(tmp, step, before_marker=lambda: _crash_point("before_marker", step))
        _crash_point("before_rename", step)
        what = "the checkpoint folder (rename)"
        if final.exists():  # saved this step before (e.g. a resumed run): replace it
            log.warning("%s exists; replacing it", final)
        replace_folder(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(
                f"saving checkpoint {final} failed while writing {what}: "
                f"{e.strerror or e}; {checkpoint_write_fix(e)}. The partial save was removed; "
                f"{what_stands(root)}"
            ) from e
        raise
    _crash_point("before_rotate", step)
    # The one just written stays, and so does every checkpoint with a higher step: after a resume
    # from an older checkpoint into the same folder, those belong to a later point of this or
    # another run, and removing them would lose that work (the person decides). Of the older
    # ones, the newest keep_last - 1 stay.
    found = complete_checkpoints(root)
    older = [p for s, p in found if s < step]
    for p in older[: max(0, len(older) - (keep_last - 1))]:
        _remove(p)
    newer = [p.name for s, p in found if s > step]
    if newer:
        log.info("keeping %s: newer than step %d, not this run's to rotate", ", ".join(newer), step)
    fsync_dir(root)
    log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - t0)
    return final


# ----- resume -------------------------------------------------------------------------------------


# Checkpoints verified in this process, by path: the files' (name, size, mtime, inode) then.
# resolve_resume verifies the folder it picks and load_checkpoint verifies it again; while no
# file changed in between, the second check skips re-reading every byte for the checksums.
_verified: dict[Path, tuple] = {}


def _signature(path: Path, files: dict) -> tuple:
    stats = [(rel, os.stat(path / rel)) for rel in sorted(files)]
    return tuple((rel, st.st_size, st.st_mtime_ns, st.st_ino) for rel, st in stats)


def _own_step(path: Path, meta: dict) -> int | None:
    """The step a checkpoint folder is of: its name's N (checkpoint_step_N, .old or .tmp) and
    its marker's "step", which must agree; None when neither says (a renamed format-1 copy)."""
    m = _FINAL.fullmatch(path.name) or _TRANSIENT.fullmatch(path.name)
    named = int(m.group(1)) if m else None
    marked = meta.get("step")
    if named is not None and marked is not None and named != marked:
        raise CheckpointError(
            f"{path / MARKER}: field 'step' is {marked} but the folder is checkpoint_step_{named} "
            "(corrupt checkpoint)"
        )
    return named if named is not None else marked


def verify_checkpoint(path: str | Path) -> None:
    """Integrity check of a checkpoint folder: marker present and parsed; every file it lists
    present with its size and (since format 2) its checksums, which reads every byte once (see
    _verified); safetensors headers consistent with their file sizes; JSON parses;
    trainer_state.json holds every field the trainer reads, its step the folder's own
    (train/checkpoint_state.py). Raises CheckpointError naming the first bad file (and field).
    A format-1 checkpoint (no checksums) gets the size, header and parse checks."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{path} has no {MARKER}: its save never finished; resume from an earlier checkpoint "
            "(or name the parent folder to pick the newest complete one)"
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
    for name in _REQUIRED:
        if name not in files:
            raise CheckpointError(f"{path / name} is not part of the checkpoint (corrupt)")
    if "model.safetensors.index.json" not in files and "model.safetensors" not in files:
        raise CheckpointError(f"{path} holds no model weights (model*.safetensors)")
    crcs, chunk = meta.get("crc32"), meta.get("crc32_chunk")
    step = _own_step(path, meta)
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


def _is_model_folder(path: Path) -> bool:
    """A final model folder (its marker says kind "model"): weights, no trainer state."""
    try:
        return (read_marker(path) or {}).get("kind") == "model"
    except ValueError:
        return False  # a damaged marker: verify_checkpoint names it


def resolve_resume(resume_from: str | Path) -> Path:
    """The checkpoint folder to resume from.

    resume_from is a checkpoint folder (verified; a bad one is an error naming the file), or a
    folder of them (the newest complete one that verifies; temporary, incomplete and corrupt ones
    are skipped with a warning), or the seed's spelling `.../checkpoint_step_5000.pt`, which means
    the folder `.../checkpoint_step_5000`. Either way, a checkpoint_step_N that an interrupted
    save left only as a verified checkpoint_step_N.old is restored first (with a warning). Raises
    CheckpointError when nothing usable exists. Under torchrun only rank 0 calls it
    (train.run.agree_on_resume), since it may rename folders.
    """
    p = Path(resume_from)
    if p.suffix == ".pt" and not p.exists():
        _recover_named(p.with_suffix(""))
        if p.with_suffix("").is_dir():
            log.info("resume_from %s: using the checkpoint folder %s", p, p.with_suffix(""))
            p = p.with_suffix("")
    _recover_named(p)
    if p.is_file():
        raise CheckpointError(
            f"resume_from {p} is a file; Octo resumes from checkpoint folders (it never unpickles "
            "a .pt file): name a checkpoint_step_N folder or the folder holding them"
        )
    if not p.is_dir():
        raise CheckpointError(
            f"resume_from {p} does not exist; name a checkpoint_step_N folder or its parent folder"
        )
    if _TRANSIENT.fullmatch(p.name):
        raise CheckpointError(
            f"{p} is the temporary folder of an interrupted save; resume from its parent {p.parent}"
        )
    marked = (p / MARKER).exists() and not _is_model_folder(p)
    if _FINAL.fullmatch(p.name) or marked or (p / "trainer_state.json").exists():
        try:
            verify_checkpoint(p)
        except CheckpointError as e:  # named explicitly: an error, with the way out
            raise CheckpointError(
                f"{e}; resume from an earlier checkpoint, or from the parent folder {p.parent} "
                "(its newest intact checkpoint)"
            ) from None
        return p
    _recover_replaced(p)
    candidates = []
    for child in p.iterdir():
        m = _FINAL.fullmatch(child.name) or _TRANSIENT.fullmatch(child.name)
        if m and child.is_dir():
            candidates.append((int(m.group(1)), child))
    for _, child in sorted(candidates, reverse=True):
        if _TRANSIENT.fullmatch(child.name):
            log.warning("skipping %s: temporary folder of an interrupted save", child)
            continue
        try:
            verify_checkpoint(child)
        except CheckpointError as e:
            log.warning("skipping %s: %s", child.name, e)
            continue
        log.info("resuming from %s", child)
        return child
    what = "no complete checkpoint_step_N folder in it"
    if (p / "config.json").is_file():  # e.g. `final`: the weights without any trainer state
        what = "a model folder (weights only, no optimizer or trainer state), not a checkpoint"
    raise CheckpointError(
        f"resume_from {p}: {what}; check the path, or set resume_from to null to start a fresh "
        "run (with another or an empty checkpoint_dir)"
    )


def _load_model(path: Path, model: torch.nn.Module) -> None:
    """Copy the checkpoint's weights into model in place, after checking names and shapes."""
    weight_map = _read_weight_map(path)
    params = model.state_dict()
    unknown = sorted(set(weight_map) - set(params))
    if unknown:
        raise CheckpointError(
            f"{path}: tensor {unknown[0]!r} is not in the model; resume with the model config the "
            "checkpoint was trained with (its config.json)"
        )
    loaded_ptrs = {params[k].data_ptr() for k in weight_map}
    for k, t in params.items():  # a tied weight may be stored once, under its other name
        if k not in weight_map and t.data_ptr() not in loaded_ptrs:
            raise CheckpointError(f"{path}: the model's tensor {k!r} is missing in the checkpoint")
    by_file: dict[str, list[str]] = {}
    for k, file in weight_map.items():
        by_file.setdefault(file, []).append(k)
    headers = {file: read_header(path / file)[1] for file in by_file}
    for k in (k for k in params if k in weight_map):  # the model's order: the first mismatch
        file = weight_map[k]
        if k not in headers[file]:
            raise CheckpointError(f"{path / file} lacks tensor {k}, which the index lists")
        shape = tuple(headers[file][k]["shape"])
        if shape != tuple(params[k].shape):
            raise CheckpointError(
                f"{path / file}: tensor {k} has shape {shape} but the model's has "
                f"{tuple(params[k].shape)}; resume with the model config the checkpoint was "
                "trained with (its config.json), or start a fresh run"
            )
    for file, keys in by_file.items():
        read_tensors(path / file, into={k: params[k] for k in keys})


def load_checkpoint(
    path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict:
    """Fill model (and optimizer, if given) in place from a checkpoint folder; return its
    trainer_state. The folder is verified first; a different model shape raises CheckpointError
    naming the tensor and both shapes. Restoring RNG, scheduler, scaler and data is the caller's
    (restore_rng_state etc.), since it owns those objects."""
    path = Path(path)
    verify_checkpoint(path)
    model = unwrap_model(model)
    _load_model(path, model)
    if optimizer is not None:
        load_optimizer(path, optimizer, param_names(model))
    return read_json(path / "trainer_state.json")


def resume_warnings(
    trainer_state: dict, *, batch_size: int, learning_rate: float, world_size: int = 1
) -> list[str]:
    """Lines to warn with when the run resumes with settings the checkpoint was not trained with
    (a warning, not an error: it goes on). Compares against trainer_state's recorded numbers.
    A changed batch_size over streamed data also says what the data does about it (the data
    module knows, and says nothing itself: one line per change)."""
    out = []
    now = {"batch_size": batch_size, "learning_rate": learning_rate, "world_size": world_size}
    for key, value in now.items():
        saved = trainer_state.get(key)
        if saved is not None and saved != value:
            line = f"resuming with {key}={value}, but the checkpoint was trained with {saved}"
            data = trainer_state.get("data") or {}
            if key == "batch_size" and data.get("mode") == "stream":
                effect = batch_size_change_effect(data, value)
                line += f" ({effect})" if effect else ""
            out.append(line)
    return out
