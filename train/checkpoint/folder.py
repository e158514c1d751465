"""Checkpoint folders on disk: the atomic save (octo.files.staged_folder, then octo.integrity.seal),
the rotation to keep_last, the repair of what an interrupted save left, and the final model
folder, which is written the same way.

Atomic: everything goes to the sibling `checkpoint_step_5000.tmp`, each file is fsynced, the
completion marker is written last, the folder is renamed into place and the parent fsynced. A crash
at any point leaves the previous checkpoints untouched and, at worst, a `.tmp` folder that is never
resumed from and is removed (with a warning) by the next save. Older complete checkpoints are
removed only after the new one is in place, keeping `keep_last`.

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
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

from octo.files import fsync, parse_size, staged_folder
from octo.hf_io import unwrap_model
from octo.integrity import MARKER_NAME, seal
from octo.tokenizer_files import save_tokenizer, special_token_ids
from train.checkpoint.optimizer import group_names, save_optimizer
from train.checkpoint.state import write_json
from train.checkpoint.verify import STEP_FOLDER, TRANSIENT_FOLDER, verify_checkpoint
from train.config import TrainConfig
from train.data import with_own_tokenizer
from train.errors import CheckpointError, write_error_fix
from train.model_card import FinalModel, write_model_card

log = logging.getLogger("train.checkpoint")


def crash_point(point: str, step: int) -> None:
    """Test hook (see the module docstring): SIGKILL this process at `point` of a save."""
    want = os.environ.get("OCTO_CRASH_AT")
    if not want:
        return
    name, _, at_step = want.partition(":")
    if name == point and (not at_step or int(at_step) == step):
        os.kill(os.getpid(), signal.SIGKILL)


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


def remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint folder: rename it to a transient name first, so a crash half-way
    leaves something the next save cleans up, never a half-deleted folder that looks complete."""
    doomed = path.with_name(path.name + ".old")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def restore_old(old: Path, final: Path) -> None:
    """Rename the verified `old` (checkpoint_step_N.old) back to `final` (checkpoint_step_N),
    with a warning. Raises CheckpointError (from verify_checkpoint) when `old` is not intact."""
    verify_checkpoint(old)
    log.warning("restoring %s as %s: a save replacing it was interrupted", old.name, final.name)
    with contextlib.suppress(FileNotFoundError):  # another process restored it first
        os.rename(old, final)
    fsync(final.parent)


def recover_replaced(root: Path) -> None:
    """Undo the one crash that could lose a complete checkpoint: replace_folder renamed
    checkpoint_step_N aside to .old and died before the new one took its place. A verified .old
    with no checkpoint_step_N beside it is renamed back (a partly removed one fails verification
    and is left for clean_stale)."""
    for p in sorted(root.iterdir()):
        m = TRANSIENT_FOLDER.fullmatch(p.name)
        final = root / f"checkpoint_step_{m.group(1)}" if m else None
        if m is None or m.group(2) != "old" or not p.is_dir() or final.exists():
            continue
        with contextlib.suppress(CheckpointError):
            restore_old(p, final)


def recover_named(final: Path) -> None:
    """resume_from names checkpoint_step_N, which is missing, and checkpoint_step_N.old stands
    beside it: the crash recover_replaced undoes, met through the folder's own name. A verified
    .old is restored; a damaged one is an error (it is not restored, and the name given does not
    exist), saying what is wrong and the way out."""
    old = final.with_name(final.name + ".old")
    if final.exists() or not STEP_FOLDER.fullmatch(final.name) or not old.is_dir():
        return
    try:
        restore_old(old, final)
    except CheckpointError as e:
        raise CheckpointError(
            f"resume_from {final} does not exist, and {old.name} beside it (left by an "
            f"interrupted save that was replacing it) is damaged: {e}; resume from an earlier "
            f"checkpoint, or from the parent folder {final.parent} (its newest intact checkpoint)"
        ) from None


def clean_stale(root: Path) -> None:
    """Before a save: restore what recover_replaced can, then remove every transient folder."""
    recover_replaced(root)
    for p in sorted(root.iterdir()):
        if TRANSIENT_FOLDER.fullmatch(p.name) and p.is_dir():
            log.warning("removing %s, left by an interrupted checkpoint save", p)
            shutil.rmtree(p)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the finished checkpoints in root (those with the marker), by step."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = STEP_FOLDER.fullmatch(p.name)
        if m and (p / MARKER_NAME).is_file():
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

    Call it on one process (rank 0). trainer_state must be JSON (train/checkpoint/state.py).
    A failed write (a full disk: ENOSPC) raises one CheckpointError; the partial folder is removed
    and the earlier checkpoints are untouched. Returns the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    final = root / f"checkpoint_step_{step}"
    shard_bytes = parse_size(max_shard_size)
    model = unwrap_model(model)
    what = "the model shards"
    t0 = time.perf_counter()
    try:
        with staged_folder(final) as tmp:
            tmp.mkdir()
            token_ids = special_token_ids(tokenizer) if tokenizer is not None else None
            model.save_pretrained(tmp, max_shard_size=shard_bytes, token_ids=token_ids)
            crash_point("after_model", step)
            what = "the optimizer state"
            save_optimizer(
                tmp,
                optimizer,
                group_names(optimizer, model),
                shard_bytes,
                after_shard=lambda k: k == 0 and crash_point("after_first_shard", step),
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
            what = f"the files (fsync) and {MARKER_NAME}"
            seal(tmp, step, before_marker=lambda: crash_point("before_marker", step))
            crash_point("before_rename", step)
            what = "the checkpoint folder (rename)"
            if final.exists():  # saved this step before (e.g. a resumed run): replace it
                log.warning("%s exists; replacing it", final)
    except OSError as e:  # staged_folder removed the partial folder
        raise CheckpointError(
            f"saving checkpoint {final} failed while writing {what}: "
            f"{e.strerror or e}; {checkpoint_write_fix(e)}. The partial save was removed; "
            f"{what_stands(root)}"
        ) from e
    crash_point("before_rotate", step)
    # The one just written stays, and so does every checkpoint with a higher step: after a resume
    # from an older checkpoint into the same folder, those belong to a later point of this or
    # another run, and removing them would lose that work (the person decides). Of the older
    # ones, the newest keep_last - 1 stay.
    found = complete_checkpoints(root)
    older = [p for s, p in found if s < step]
    for p in older[: max(0, len(older) - (keep_last - 1))]:
        remove_checkpoint(p)
    newer = [p.name for s, p in found if s > step]
    if newer:
        log.info("keeping %s: newer than step %d, not this run's to rotate", ", ".join(newer), step)
    fsync(root)
    log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - t0)
    return final


def save_final_model(run: FinalModel) -> Path:
    """{checkpoint_dir}/final: the model (Llama-format safetensors + config.json), the tokenizer
    (with its token ids in config.json and generation_config.json, see octo.tokenizer_files),
    train_config.json and the model card, and last the completion marker with every file's
    checksums (as a checkpoint has: octo.generate and from_pretrained check it); written beside,
    then renamed (octo.files.staged_folder), so a half-written folder never stands. run.model is
    the plain (unwrapped) model. Whatever stops it (a full disk, Ctrl-C) removes final.tmp and
    leaves an earlier `final` in place."""
    cfg, tok, model = run.cfg, run.tokenizer, run.model
    final = Path(cfg.checkpoint_dir) / "final"
    try:
        with staged_folder(final) as tmp:
            ids = special_token_ids(tok) if tok is not None else None
            model.save_pretrained(tmp, max_shard_size=cfg.max_shard_size, token_ids=ids)
            if tok is not None:
                save_tokenizer(tok, tmp, model.config.max_position_embeddings)
                cfg = with_own_tokenizer(cfg)
            cfg.save(tmp / "train_config.json")
            write_model_card(run, tmp, final)  # README.md (+ loss.png)
            seal(tmp, kind="model")  # last: its marker covers every file written above
    except OSError as e:  # a full disk: no final.tmp is left, `final` stands
        raise CheckpointError(
            f"saving the final model to {final} failed: {e.strerror or e}; "
            f"{checkpoint_write_fix(e)}. "
            f"The partial folder was removed; {what_stands(final.parent)}"
        ) from e
    return final
