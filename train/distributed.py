"""Several processes through torchrun: the process group, DDP / FSDP2 wrapping, and the few
collectives the training loop needs.

    torchrun --nproc_per_node N -m train --config ...            (one node, N GPUs)
    torchrun --nnodes M --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
             --nproc_per_node N -m train --config ...            (M nodes)

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python -m train` has none of them and
every function here is then a no-op (the loop calls them unconditionally). torchrun with a single
process (--nproc_per_node 1) does join a group of one and wrap the model: the code path of N
ranks, which lets one GPU check it. Backends: NCCL for CUDA tensors and gloo for CPU tensors in
one default group ("cpu:gloo,cuda:nccl"), gloo alone on CPU.

parallelism (TrainConfig), under torchrun:
  ddp   every rank holds the whole model, optimizer state and gradients; gradients are averaged
        with one all-reduce per optimizer step (`no_sync` on the other accumulation micro-steps).
  fsdp  FSDP2: `fully_shard` on each decoder layer and on the root, so parameters, gradients and
        AdamW state are split over the ranks (1/N each); a layer's parameters are all-gathered
        just before it runs and freed after, and gradients are reduce-scattered on every
        micro-step (so they stay sharded). Under bf16 the gathered parameters are bf16 and the
        gradient reduction fp32 (MixedPrecisionPolicy); fp32 runs gather fp32.
Both average gradients over ranks; train.step.loss_scale multiplies by world_size to undo that.

Agreement: a decision that changes the sequence of collectives (skip an update, stop, the end of
the data) must be the same on every rank, or ranks wait for each other forever. `any_rank`
(device tensors, no host sync) and `host_any` (Python bools, one tiny gloo all-reduce) make it so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from train.config import ConfigError

_joined_group = False  # set by init_distributed: see joined_group


@dataclasses.dataclass
class DistEnv:
    """Where this process stands: rank in [0, world_size), local_rank on its node."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    group: bool = False  # in a process group (launched by torchrun), even one of a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Wrap the model, reduce and agree through the process group."""
        return self.world_size > 1 or self.group


def init_distributed(device: torch.device) -> DistEnv:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and join the process group;
    a process not launched by torchrun (no RANK, WORLD_SIZE unset or 1) gets DistEnv() and no
    group. Idempotent: a second call (the Trainer's, after run()'s) returns the same DistEnv."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "RANK" not in os.environ:
        return DistEnv()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} is not; launch several "
            "processes with torchrun (torchrun --nproc_per_node N -m train ...), or unset "
            "WORLD_SIZE for one process"
        )
    env = DistEnv(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world, True)
    global _joined_group
    _joined_group = True
    if not dist.is_initialized():
        if device.type == "cuda":
            # One group, two backends: NCCL for the CUDA tensors (gradients, losses), gloo for the
            # CPU ones (the stop/end-of-data flags, pickled objects), so flags need no GPU sync.
            dist.init_process_group(backend="cpu:gloo,cuda:nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return env


def wrap_model(
    model: nn.Module,
    env: DistEnv,
    parallelism: str,
    param_dtype: torch.dtype | None = None,
    compile_fn: Callable[[Callable], Callable] | None = None,
) -> nn.Module:
    """DDP around the model, or FSDP2 applied to it in place (parallelism "ddp" | "fsdp"), under
    torchrun; the model itself otherwise. param_dtype: the autocast dtype of the run
    (bf16/fp16, or None for fp32), the dtype FSDP gathers parameters in.

    compile_fn (train.runtime.Runtime.compiled for the run, or None): torch.compile cannot trace
    through DDP's or FSDP2's forward hooks with fullgraph=True, so with several processes the
    compiled unit goes inside the wrapper, as nanoGPT (DDP) and torchtitan (FSDP2) do: the
    model's forward under DDP (Dynamo's DDPOptimizer then splits the graph at the gradient
    buckets, so their all-reduce overlaps the backward), each decoder layer's forward under FSDP2
    (its all-gather and reduce-scatter hooks run eagerly between the compiled layers). Only
    `forward` is compiled, so parameter names, hence checkpoints, are unchanged; the caller must
    then not compile the step function itself.

    The model must already be on its device, with the same initial weights on every rank (the
    Trainer seeds every rank alike; DDP also broadcasts rank 0's weights, FSDP2 does not)."""
    if not env.enabled:
        return model
    if parallelism == "ddp":
        device = next(model.parameters()).device
        if compile_fn is not None:
            model.forward = compile_fn(model.forward)
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy
        )
    if parallelism == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # lazy: FSDP2 only

        if param_dtype == torch.float16:
            raise ConfigError(
                "parallelism 'fsdp' with fp16 needs a sharded gradient scaler, which Octo does "
                "not have; use precision bf16 (Ampere or newer GPUs) or parallelism ddp"
            )
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # One FSDP unit per decoder layer (gathered and freed one at a time: memory ~ one layer
        # unsharded) and the root for the rest (embeddings, final norm, lm_head).
        for layer in model.model.layers:
            if compile_fn is not None:
                layer.forward = compile_fn(layer.forward)
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    raise ConfigError(f"parallelism {parallelism!r}; choose ddp or fsdp")


def is_fsdp(model: nn.Module) -> bool:
    """True for a model that fully_shard was applied to."""
    from torch.distributed.fsdp import FSDPModule  # lazy: heavy; FSDP2 models only have it

    return isinstance(model, FSDPModule)


def no_sync(
    model: nn.Module, env: DistEnv, last_micro_step: bool
) -> contextlib.AbstractContextManager:
    """DDP: skip the gradient all-reduce on accumulation micro-steps that are not the last (the
    gradients accumulate locally; the last micro-step's backward all-reduces the sum). FSDP2 and
    one process: nothing (FSDP2 reduce-scatters every micro-step, keeping gradients sharded)."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if ddp and env.enabled and not last_micro_step:
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks, in place, and return it; identity for one process. On CUDA it is
    queued on the stream (no host sync)."""
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """() bool tensor -> () bool tensor, True when it is True on any rank. Stays on the device
    (no host sync), so every rank skips the same non-finite steps without waiting."""
    if not env.enabled:
        return flag
    return all_reduce_sum(flag.to(torch.int32), env) > 0


def host_any(flag: bool, env: DistEnv) -> bool:
    """True when `flag` is True on any rank: one all-reduce of a CPU int (gloo). For decisions
    made on the host every step: a stop signal seen by one rank, one rank's data running out."""
    if not env.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item())


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a value FSDP2 returns as a replicated DTensor (clip_grad_norm_'s total
    norm over sharded gradients: already reduced over ranks, so its local tensor is the value)."""
    from torch.distributed.tensor import DTensor  # lazy: heavy, FSDP2 only

    return t.full_tensor() if isinstance(t, DTensor) else t


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; small objects only)."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's obj on every rank (pickled; small objects only)."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(env: DistEnv) -> None:
    """Destroy the process group, if this process joined one."""
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def joined_group() -> bool:
    """True once this process has joined a process group (even one destroyed since): it must
    then end through train.__main__.exit_process, not a plain interpreter exit."""
    return _joined_group
