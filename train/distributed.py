"""Process group, model wrapping and collectives for torchrun (DDP, FSDP2).

A single process (no torchrun) needs none of it: every function here is then a cheap no-op, so
the training loop calls them unconditionally. (Single-process stub; issue 7 fills in DDP/FSDP2.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch


@dataclasses.dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistEnv:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); single process -> world 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise NotImplementedError("several processes: not implemented yet (issue 7)")
    return DistEnv()


def wrap_model(model: torch.nn.Module, env: DistEnv, parallelism: str) -> torch.nn.Module:
    """DDP or FSDP2 around the model when world_size > 1; the model itself otherwise."""
    return model


def no_sync(model: torch.nn.Module, env: DistEnv, last_micro_step: bool):
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks (in place); identity for one process."""
    return t


def cleanup(env: DistEnv) -> None:
    """Destroy the process group, if any."""
