"""Checkpoints of a run on several processes, in the single-process layout of
train/checkpoint/folder.py.

One layout for every mode: a checkpoint written by 1 process, by DDP or by FSDP2 on any number
of ranks is the same folder (full, unsharded tensors keyed by parameter name: a Llama model
folder, name-keyed AdamW state, trainer_state.json), so it loads in transformers and in a
single-process Octo, and any mode can resume from any other.

    one process, DDP   rank 0 writes with save_checkpoint (DDP keeps the whole
                       model and optimizer state on every rank; nothing to gather).
    FSDP2              every rank takes part in gathering the full state dicts onto rank 0's CPU
                       (torch.distributed.checkpoint.state_dict: get_model_state_dict /
                       get_optimizer_state_dict, full_state_dict=True, cpu_offload=True); rank 0
                       puts them into a plain CPU copy of the model and optimizer and writes them
                       with the same save_checkpoint. Loading is the reverse: rank 0 reads the
                       folder into such a copy (with every check of load_checkpoint), then
                       set_model_state_dict / set_optimizer_state_dict(broadcast_from_rank0=True)
                       scatter it into the shards.

Why gather rather than DCP's HuggingFaceStorageWriter (each rank writing its own shards): the
atomic save (temporary folder, fsync, completion marker, rename, rotation) and the name-keyed
optimizer layout stay one piece of code; the folder is a transformers folder without a separate
consolidation pass; resuming with another world size or mode needs no resharding logic; and the
writer's API has changed between the torch releases Octo runs on (2.11 on the GPUs, 2.13 here).
The cost: rank 0 needs CPU memory for the full model and AdamW state (12 bytes per parameter:
fp32 weights and two AdamW moments; 12.0 measured with the tiny preset on 2 gloo ranks), and a
save runs at one process's write speed -- fine up to a few billion parameters.

Per-rank state: each rank's data position and RNG states go into trainer_state["ranks"] (the
contract's "data" and "rng" keys keep rank 0's). Resuming with the same world size restores each
rank's own; with another world size a pre-tokenized position (global: blocks consumed of the
epoch's order) re-shards exactly, while a streaming position (one per rank and worker stream)
cannot, which is one CheckpointError naming both sizes and the fix.

The plain optimizer built for a save or load is `type(optimizer)(groups)`: torch's AdamW and the
like. MuonWithAdamW (train/muon.py) is not built that way, and FSDP2 with Muon is refused at
start (muon.check_optimizer), so it never gets here.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from octo import OctoForCausalLM
from octo.hf_io import empty_model
from train.checkpoint.folder import save_checkpoint
from train.checkpoint.optimizer import group_names, index_keyed, name_keyed
from train.checkpoint.resume import load_checkpoint
from train.config import TrainConfig
from train.distributed import DistEnv, all_gather_object, broadcast_object, is_fsdp
from train.errors import CheckpointError

__all__ = ["full_model", "load_checkpoint_dist", "rank_state", "save_checkpoint_dist"]


def _state_dict_api() -> ModuleType:
    """torch.distributed.checkpoint.state_dict, imported here, lazily: it costs ~2 s of import
    after torch, and only FSDP2 saves and loads use it."""
    import torch.distributed.checkpoint.state_dict as api  # lazy: heavy, FSDP2 only

    return api


def _full_options(**kw: Any) -> Any:
    return _state_dict_api().StateDictOptions(full_state_dict=True, **kw)


def _plain_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    groups: list[list[str]],
    osd: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """An optimizer of optimizer's class over `model`'s parameters, grouped by name as `groups`,
    holding osd (a name-keyed state dict, get_optimizer_state_dict's form) or no state yet. It
    is only saved or loaded, never stepped."""
    params = dict(model.named_parameters())
    plain = type(optimizer)([{"params": [params[n] for n in g]} for g in groups])
    if osd is not None:
        plain.load_state_dict(index_keyed(osd, groups))
    return plain


def _raise_everywhere(error: BaseException | None, env: DistEnv, what: str) -> None:
    """Rank 0's failure (or None) reaches every rank, so all of them stop with the same one-line
    error instead of waiting in the next collective for a rank that has gone."""
    message = broadcast_object(None if error is None else str(error), env)
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(f"rank 0 failed {what}: {message}")


def save_checkpoint_dist(
    root: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    train_config: TrainConfig,
    env: DistEnv,
    tokenizer: Any = None,
    keep_last: int = 3,
    max_shard_size: str | int = "2GB",
) -> Path | None:
    """Write root/checkpoint_step_{step}/ (save_checkpoint's layout) from a run
    on any number of processes. Call it on EVERY rank: the per-rank states are gathered and, under
    FSDP2, so are the weights. Returns the folder on rank 0, None on the others; a failed save
    raises on every rank."""
    trainer_state = dict(trainer_state)
    if env.enabled:
        mine = {"data": trainer_state.get("data"), "rng": trainer_state.get("rng")}
        trainer_state["ranks"] = all_gather_object(mine, env)
    save_model, save_opt = model, optimizer
    if env.enabled and is_fsdp(model):
        api = _state_dict_api()
        state = api.get_model_state_dict(model, options=_full_options(cpu_offload=True))
        osd = api.get_optimizer_state_dict(
            model, optimizer, options=_full_options(cpu_offload=True)
        )
        if env.is_main:
            save_model = empty_model(OctoForCausalLM, model.config, state=state)
            groups = [g["params"] for g in osd["param_groups"]]
            save_opt = _plain_optimizer(optimizer, save_model, groups, osd)
        del state, osd
    path, error = None, None
    if env.is_main:
        try:
            path = save_checkpoint(
                root, step, model=save_model, optimizer=save_opt, trainer_state=trainer_state,
                train_config=train_config, tokenizer=tokenizer, keep_last=keep_last,
                max_shard_size=max_shard_size,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
            error = e
    _raise_everywhere(error, env, f"to save checkpoint step {step} in {root}")
    return path


def load_checkpoint_dist(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None, env: DistEnv
) -> dict:
    """Fill model and optimizer (plain, DDP's inner module, or FSDP2-sharded) from a checkpoint
    folder of any run; call it on every rank. Returns trainer_state with "data" and "rng" set to
    this rank's own (see the module docstring for a changed world size)."""
    path = Path(path)
    if env.enabled and is_fsdp(model):
        state = _load_fsdp(path, model, optimizer, env)
    else:
        state = load_checkpoint(path, model=model, optimizer=optimizer)
    return rank_state(state, env, path)


def rank_state(state: dict, env: DistEnv, path: Path) -> dict:
    """trainer_state with this rank's data position and RNG states; CheckpointError when a
    streaming data position would have to be re-sharded to another world size."""
    saved_world = int(state.get("world_size") or 1)
    ranks = state.get("ranks")
    if saved_world == env.world_size:
        if ranks:
            state = {**state, "data": ranks[env.rank]["data"], "rng": ranks[env.rank]["rng"]}
        return state
    data = state.get("data")
    if isinstance(data, dict) and data.get("mode") == "stream":
        raise CheckpointError(
            f"{path} was written by a run on {saved_world} process(es), this one has "
            f"{env.world_size}: a streamed data position belongs to its processes and cannot be "
            f"re-sharded; resume with {saved_world} process(es) (torchrun --nproc_per_node ...), "
            "or train with pretokenize: true, whose position re-shards exactly"
        )
    return state  # pre-tokenized: one global position, valid for any world size


def _load_fsdp(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, env: DistEnv
) -> dict:
    api = _state_dict_api()
    state = weights = osd = error = None
    if env.is_main:
        try:
            plain = empty_model(OctoForCausalLM, model.config)
            plain_opt, groups = None, None
            if optimizer is not None:
                groups = group_names(optimizer, model)  # FSDP2 keeps the plain names
                plain_opt = _plain_optimizer(optimizer, plain, groups)
            state = load_checkpoint(path, model=plain, optimizer=plain_opt)
            weights = plain.state_dict()
            osd = name_keyed(plain_opt.state_dict(), groups) if plain_opt is not None else None
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
            error = e
    _raise_everywhere(error, env, f"to load {path}")
    state = broadcast_object(state, env)
    opts = _full_options(broadcast_from_rank0=True)
    api.set_model_state_dict(model, weights if env.is_main else {}, options=opts)
    if optimizer is not None:
        api.set_optimizer_state_dict(model, optimizer, osd if env.is_main else {}, options=opts)
    return state


def full_model(model: nn.Module, env: DistEnv, device: torch.device | None = None) -> nn.Module:
    """The whole model as a plain module: under FSDP2 (call on every rank) rank 0 gets an
    unsharded copy on `device` (default CPU) and the other ranks their sharded model back;
    otherwise the model itself. For the final save and the sample, which run on rank 0 alone."""
    if not (env.enabled and is_fsdp(model)):
        return model
    state = _state_dict_api().get_model_state_dict(model, options=_full_options(cpu_offload=True))
    if not env.is_main:
        return model
    plain = empty_model(OctoForCausalLM, model.config, state=state)
    return plain.to(device) if device is not None else plain
