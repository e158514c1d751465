"""Optimizer state in a checkpoint, keyed by parameter name: the one conversion between
optimizer.state_dict()'s positions and names, for one process and for FSDP2 (train/checkpoint/
dist.py) alike.

    optimizer.json                          type, param_groups (hyperparameters, parameter NAMES),
                                            and for each parameter name its state entries
    optimizer-0000K-of-0000N.safetensors    the state tensors, key "state.<param name>.<state key>"
                                            (AdamW: step (), exp_avg (shape of p), exp_avg_sq)

Keying by parameter name, not by position, is why a checkpoint still maps after the optimizer's
parameter order changes, or when the model is wrapped (torch.compile, DDP) on one side only.
No pickle anywhere: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from octo.files import plan_shards, read_tensors, save_safetensors
from train.checkpoint.state import read_json, write_json
from train.errors import CheckpointError

OPTIMIZER_META = "optimizer.json"


def group_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """The parameter names (in the unwrapped `model`; a tied weight: its first name) of each of
    optimizer's groups, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    except KeyError:
        raise CheckpointError(
            "the optimizer holds a parameter that is not in the model; build the optimizer "
            "from model.parameters() (or named_parameters) of the model being saved"
        ) from None


def name_keyed(sd: dict[str, Any], groups: list[list[str]]) -> dict[str, Any]:
    """optimizer.state_dict() (parameters numbered in group order) with parameter names instead
    of numbers: {"state": {name: {...}}, "param_groups": [{..., "params": [name, ...]}]} (the
    form FSDP2's set_optimizer_state_dict takes, and the one saved)."""
    order = [n for g in groups for n in g]
    return {
        "state": {order[i]: s for i, s in sd["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                         for g in sd["param_groups"]],
    }  # fmt: skip


def index_keyed(sd: dict[str, Any], groups: list[list[str]]) -> dict[str, Any]:
    """The inverse of name_keyed, for load_state_dict of an optimizer whose groups hold the
    parameters `groups` names: its groups must hold the same names as sd's (any order within a
    group); the numbers follow `groups`' order, which load_state_dict pairs with its own
    parameters by position."""
    index = {n: i for i, n in enumerate(n for g in groups for n in g)}
    return {
        "state": {index[n]: s for n, s in sd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in names]}
                         for g, names in zip(sd["param_groups"], groups)],
    }  # fmt: skip


def _group_hparams(i: int, group: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """A param group's hyperparameters as JSON (a tensor-valued one, e.g. a tensor lr, goes to
    the safetensors file; a tuple, e.g. betas, is remembered so it comes back as a tuple)."""
    out: dict[str, Any] = {"tuple_keys": []}
    for k, v in group.items():
        if k == "params":
            continue
        if isinstance(v, torch.Tensor):
            key = f"param_groups.{i}.{k}"
            tensors[key] = v
            out[k] = {"tensor": key}
        else:
            if isinstance(v, tuple):
                out["tuple_keys"].append(k)
            out[k] = v
    return out


def save_optimizer(
    folder: Path,
    optimizer: torch.optim.Optimizer,
    groups: list[list[str]],
    max_shard_size: int,
    after_shard: Callable[[int], None] = lambda k: None,
) -> None:
    """Write optimizer.json and optimizer-0000K-of-0000N.safetensors (shards of at most
    max_shard_size bytes, unless one tensor alone is larger) from name_keyed(optimizer's state
    dict, groups) (groups: group_names). after_shard(k) runs after shard k."""
    sd = name_keyed(optimizer.state_dict(), groups)
    tensors: dict[str, torch.Tensor] = {}
    saved_groups, state = [], {}
    for i, group in enumerate(sd["param_groups"]):
        hp = _group_hparams(i, group, tensors)
        hp["params"] = group["params"]
        saved_groups.append(hp)
        for name in group["params"]:
            entries = {}
            for k, v in sd["state"].get(name, {}).items():
                if isinstance(v, torch.Tensor):
                    key = f"state.{name}.{k}"
                    if key in tensors:
                        raise CheckpointError(f"optimizer state key {key!r} is not unique")
                    tensors[key] = v
                    entries[k] = {"tensor": key}
                else:
                    entries[k] = {"value": v}
            if entries:
                state[name] = entries
    shards = plan_shards(tensors, max_shard_size)  # insertion order, <= max_shard_size bytes
    n = len(shards)
    files = [f"optimizer-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map = {key: files[k] for k, keys in enumerate(shards) for key in keys}
    for k, keys in enumerate(shards):
        # safetensors writes from host memory: copy one shard at a time off the accelerator.
        shard = {key: tensors[key].detach().to("cpu").contiguous() for key in keys}
        save_safetensors(shard, folder / files[k])
        del shard
        after_shard(k)
    meta = {
        "format": 1,
        "optimizer": type(optimizer).__name__,
        "param_groups": saved_groups,
        "state": state,
        "weight_map": weight_map,
    }
    write_json(folder / OPTIMIZER_META, meta)


def _read_shards(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = {}
    for file in sorted(set(meta["weight_map"].values())):
        try:
            loaded.update(read_tensors(folder / file))
        except ValueError as e:  # a damaged shard (octo.files' text names it)
            raise CheckpointError(str(e)) from None
    return loaded


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, groups: list[list[str]]) -> None:
    """Fill optimizer (built over the model's parameters, any order; groups: its group_names)
    from save_optimizer's files. The saved groups must hold the same parameter names as the
    current ones, group by group, and every state tensor the shape of its parameter ("step":
    one number); each problem is one CheckpointError naming the file and the field or tensor."""
    meta_path = folder / OPTIMIZER_META
    meta = read_json(meta_path)  # its form: checked with the checkpoint (check_optimizer_meta)
    if meta.get("optimizer") != type(optimizer).__name__:
        raise CheckpointError(
            f"{meta_path} holds {meta.get('optimizer')} state but the run uses "
            f"{type(optimizer).__name__}; resume with the same optimizer or start a fresh run"
        )
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{meta_path} has {len(saved_groups)} parameter groups, the optimizer "
            f"{len(optimizer.param_groups)}; resume with the same weight-decay grouping"
        )
    loaded = _read_shards(folder, meta)

    def tensor(key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in loaded:
            raise CheckpointError(
                f"{meta_path} names tensor {key!r:.60}, which no optimizer shard holds"
            )
        return loaded[key]

    params = [p for g in optimizer.param_groups for p in g["params"]]
    shapes = {n: p.shape for n, p in zip((n for g in groups for n in g), params)}
    sd: dict[str, Any] = {"state": {}, "param_groups": []}
    for i, (saved, current) in enumerate(zip(saved_groups, groups)):
        if set(current) != set(saved["params"]):
            diff = sorted(set(current) ^ set(saved["params"]), key=str)
            raise CheckpointError(
                f"{meta_path}: parameter group {i} differs from the optimizer's "
                f"(e.g. {diff[0]!r}); resume with the same model and weight-decay grouping"
            )
        hp = {k: v for k, v in saved.items() if k != "tuple_keys"}
        for k, v in hp.items():
            if k == "params":
                continue
            if isinstance(v, dict) and set(v) == {"tensor"}:
                hp[k] = tensor(v["tensor"])
            elif k in saved.get("tuple_keys", []):
                hp[k] = tuple(v) if isinstance(v, list) else v
        sd["param_groups"].append(hp)
        for name in current:
            entries = meta["state"].get(name)
            if not entries:
                continue
            st = {k: tensor(e["tensor"]) if "tensor" in e else e["value"]
                  for k, e in entries.items()}  # fmt: skip
            for k, t in st.items():
                if not isinstance(t, torch.Tensor):
                    continue
                if not (t.numel() == 1 if k == "step" else t.shape == shapes[name]):
                    want = f"{tuple(shapes[name])} (the parameter's)"
                    want = "one number" if k == "step" else want
                    raise CheckpointError(
                        f"{folder}: optimizer state {name}.{k} has shape {tuple(t.shape)}, "
                        f"not {want} (corrupt checkpoint, or another model)"
                    )
            sd["state"][name] = st
    optimizer.load_state_dict(index_keyed(sd, groups))
