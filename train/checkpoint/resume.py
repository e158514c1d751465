"""Starting a run from a saved folder: which checkpoint to resume from (resolve_resume, agreed by
every rank), loading it (load_checkpoint: weights through octo.hf_io.load_weights, the one
weight loader, then the optimizer), the warnings for changed settings, the refusal of a fresh run
in a used checkpoint_dir, and init_from.

init_from: a fresh run that starts from trained weights (fine-tuning, or more pre-training on
other data), what transformers' `model_name_or_path` is to its Trainer. The folder is a final
model folder, a complete checkpoint_step_N folder or a transformers Llama folder (config.json +
safetensors). Only its weights are taken (octo.hf_io.from_pretrained, which never unpickles); the
model's shape is its config.json's (train.model_config.load_model_config reads it before any
data is loaded). The optimizer, the learning-rate schedule, the step count and the data order start
fresh from the config, unlike resume_from, which continues a run exactly. The configs the run
saves name the model by its fields and set init_from to null, so resuming the new run
(resume_from) needs nothing else.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

import torch

from octo import OctoForCausalLM
from octo.hf_index import MISSING, NOT_IN_SHARD, UNEXPECTED, WeightsMismatch
from octo.hf_io import load_weights, unwrap_model
from octo.integrity import MARKER_NAME
from train.checkpoint.folder import complete_checkpoints, recover_named, recover_replaced
from train.checkpoint.optimizer import group_names, load_optimizer
from train.checkpoint.state import read_json
from train.checkpoint.verify import (
    STEP_FOLDER,
    TRANSIENT_FOLDER,
    is_model_folder,
    verify_checkpoint,
)
from train.data.stream import batch_size_change_effect
from train.distributed import broadcast_object
from train.errors import CheckpointError, DataError

log = logging.getLogger("train.checkpoint")


def resolve_resume(resume_from: str | Path) -> Path:
    """The checkpoint folder to resume from.

    resume_from is a checkpoint folder (verified; a bad one is an error naming the file), or a
    folder of them (the newest complete one that verifies; temporary, incomplete and corrupt ones
    are skipped with a warning), or the seed's spelling `.../checkpoint_step_5000.pt`, which means
    the folder `.../checkpoint_step_5000`. Either way, a checkpoint_step_N that an interrupted
    save left only as a verified checkpoint_step_N.old is restored first (with a warning). Raises
    CheckpointError when nothing usable exists. Under torchrun only rank 0 calls it
    (agree_on_resume), since it may rename folders.
    """
    p = Path(resume_from)
    if p.suffix == ".pt" and not p.exists():
        recover_named(p.with_suffix(""))
        if p.with_suffix("").is_dir():
            log.info("resume_from %s: using the checkpoint folder %s", p, p.with_suffix(""))
            p = p.with_suffix("")
    recover_named(p)
    if p.is_file():
        raise CheckpointError(
            f"resume_from {p} is a file; Octo resumes from checkpoint folders (it never unpickles "
            "a .pt file): name a checkpoint_step_N folder or the folder holding them"
        )
    if not p.is_dir():
        raise CheckpointError(
            f"resume_from {p} does not exist; name a checkpoint_step_N folder or its parent folder"
        )
    if TRANSIENT_FOLDER.fullmatch(p.name):
        raise CheckpointError(
            f"{p} is the temporary folder of an interrupted save; resume from its parent {p.parent}"
        )
    marked = (p / MARKER_NAME).exists() and not is_model_folder(p)
    if STEP_FOLDER.fullmatch(p.name) or marked or (p / "trainer_state.json").exists():
        try:
            verify_checkpoint(p)
        except CheckpointError as e:  # named explicitly: an error, with the way out
            raise CheckpointError(
                f"{e}; resume from an earlier checkpoint, or from the parent folder {p.parent} "
                "(its newest intact checkpoint)"
            ) from None
        return p
    recover_replaced(p)
    candidates = []
    for child in p.iterdir():
        m = STEP_FOLDER.fullmatch(child.name) or TRANSIENT_FOLDER.fullmatch(child.name)
        if m and child.is_dir():
            candidates.append((int(m.group(1)), child))
    for _, child in sorted(candidates, reverse=True):
        if TRANSIENT_FOLDER.fullmatch(child.name):
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


def agree_on_resume(resume_from: str, env: Any) -> Path:
    """The checkpoint every rank resumes from: rank 0 resolves resume_from (resolve_resume, which
    may also restore an interrupted save's folder) and the others take its answer, so ranks can
    neither race on that repair nor pick different checkpoints. A CheckpointError on rank 0 is
    raised on every rank."""
    answer = None
    if env.is_main:
        try:
            answer = ("path", str(resolve_resume(resume_from)))
        except CheckpointError as e:
            answer = ("error", str(e))
    kind, value = broadcast_object(answer, env)
    if kind == "error":
        raise CheckpointError(value)
    return Path(value)


def _mismatch(path: Path, e: WeightsMismatch) -> str:
    """load_weights' finding, as a resumed run words it."""
    name = e.names[0]
    same = "resume with the model config the checkpoint was trained with (its config.json)"
    if e.kind == UNEXPECTED:
        return f"{path}: tensor {name!r} is not in the model; {same}"
    if e.kind == MISSING:
        return f"{path}: the model's tensor {name!r} is missing in the checkpoint"
    if e.kind == NOT_IN_SHARD:
        return f"{e.file} lacks tensor {name}, which the index lists"
    return (f"{e.file}: tensor {name} has shape {e.got} but the model's has {e.want}; {same}, "
            "or start a fresh run")  # fmt: skip


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
    try:
        load_weights(model, path)
    except WeightsMismatch as e:
        raise CheckpointError(_mismatch(path, e)) from None
    except ValueError as e:  # a damaged index or shard (verified above: changed since)
        raise CheckpointError(str(e)) from None
    if optimizer is not None:
        load_optimizer(path, optimizer, group_names(optimizer, model))
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


def check_fresh_checkpoint_dir(checkpoint_dir: str) -> None:
    """A run that does not resume refuses a checkpoint_dir that holds complete checkpoints or a
    final model (CheckpointError, exit 2, before any data is read). Why: its saves would replace
    the other run's final model and same-step checkpoints, and a later resume_from=<folder>
    would pick whichever run's checkpoint is newest."""
    root = Path(checkpoint_dir)
    found = complete_checkpoints(root)
    has_final = (root / "final").is_dir()
    if not found and not has_final:
        return
    held = [found[-1][1].name] if found else []
    held += ["final"] if has_final else []
    resume = shlex.quote(f"resume_from={root}")
    cont = f"continue that run with --set {resume}, or " if found else ""
    raise CheckpointError(
        f"checkpoint_dir {root} already holds a run's checkpoints (newest: {' and '.join(held)}) "
        f"and this run starts from scratch; {cont}start over with another or an empty "
        "checkpoint_dir"
    )


def load_init_model(folder: str | Path) -> OctoForCausalLM:
    """init_from's model (module docstring), fp32 on the CPU (the trainer moves it). A checkpoint
    folder must be complete and intact (verify_checkpoint: an interrupted save's is refused); any
    problem with the weights is one CheckpointError naming the folder."""
    folder = Path(folder)
    if (
        STEP_FOLDER.fullmatch(folder.name)
        or TRANSIENT_FOLDER.fullmatch(folder.name)
        or (folder / "trainer_state.json").is_file()
    ):
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            raise CheckpointError(f"init_from: {e}") from None
    try:
        return OctoForCausalLM.from_pretrained(folder)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"init_from {folder}: {e}") from None


def check_tokenizer_fits(folder: str | Path, tokenizer: Any, vocab_size: int) -> None:
    """DataError (one line) when the tokenizer has ids the model's embedding has no row for."""
    n = len(tokenizer)
    if n > vocab_size:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise DataError(
            f"tokenizer {name!r} has {n} tokens but init_from {folder}'s model has vocab_size "
            f"{vocab_size}; set tokenizer_name to the tokenizer the model was trained with (a "
            "final or checkpoint folder holds it: tokenizer_name=<that folder>)"
        )
