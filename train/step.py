"""The arithmetic of one optimizer step, beside the Trainer that runs it (train/loop.py).

For micro-batches m = 1..A of token ids (B, T) (labels = ids, shifted in the model):
    loss_m = sum of the token losses of m (model(..., reduction="sum"), fp32)
    backward of loss_m * loss_scale,  loss_scale = 1/N,  N = target tokens of ALL micro-batches of
    the step and all ranks (OctoForCausalLM.count_targets)
so the gradient is that of the mean token loss of the whole step, whatever A and B are. Then the
global gradient norm (grad_norm, clipping at max_grad_norm), and the update (apply_update), which
a step whose loss or gradient norm is not finite (step_fault) skips on the device. SkipCounter
counts the skipped steps without a host sync in the hot path.
"""

from __future__ import annotations

import dataclasses

import torch

from train.distributed import DistEnv, all_reduce_sum, any_rank, replicated


@dataclasses.dataclass
class StepStats:
    """What one train_step did. Tensors stay on the device (reading them syncs)."""

    loss_sum: torch.Tensor  # () fp32: summed token loss of the step on this rank
    n_targets: int  # target tokens of the step on this rank (OctoForCausalLM.count_targets)
    grad_norm: torch.Tensor  # () fp32: global gradient norm before clipping
    skipped: torch.Tensor  # () bool: non-finite loss or gradient norm; the update was not applied
    lr: float
    timings: dict[str, float] | None = None  # seconds per phase, only with Trainer(profile=True)

    def loss(self) -> float:
        """Mean token loss of the step (syncs)."""
        return float(self.loss_sum) / self.n_targets


def loss_scale(n_targets: int, env: DistEnv, device: torch.device) -> float | torch.Tensor:
    """1/N with N the step's target tokens over all ranks. DDP/FSDP average gradients over ranks,
    hence world_size / N there (all_reduce of N: a () tensor, no host sync)."""
    if not env.enabled:
        return 1.0 / n_targets
    n = all_reduce_sum(torch.tensor(float(n_targets), device=device), env)
    return env.world_size / n


def grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient norm, () fp32 (replicated on every rank under FSDP2), before clipping
    the gradients to max_norm (max_norm <= 0: no clipping)."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return replicated(norm)  # FSDP2: a replicated DTensor


def step_fault(
    loss_sum: torch.Tensor, norm: torch.Tensor, scaled: bool, env: DistEnv
) -> torch.Tensor:
    """() bool on the device, the same on every rank: skip this step's update. Without a
    GradScaler: a non-finite loss or gradient norm; with one (scaled), gradient overflow is the
    scaler's business (it lowers the scale) and a non-finite loss is ours."""
    if scaled:
        fault = ~torch.isfinite(loss_sum)
    else:
        fault = ~(torch.isfinite(loss_sum) & torch.isfinite(norm))
    return any_rank(fault, env)  # every rank skips the same steps


def apply_update(
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    fused: bool,
    fault: torch.Tensor,
) -> None:
    """The optimizer step, unless `fault`: the GradScaler's step (it skips what it finds
    non-finite), the fused AdamW's found_inf (skipped on the device), or for optimizers without
    the fused kernel (Muon) a host read of fault."""
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    elif fused:
        opt.found_inf = fault.float()  # fused AdamW skips the whole update on device when 1
        opt.step()
    elif not bool(fault):  # host sync: only optimizers without the fused kernel (Muon)
        opt.step()


class SkipCounter:
    """Skipped (non-finite) steps, in a row (the stop rule) and in total, counted on the device.
    The host copies `in_row` and `total` are copied asynchronously on a GPU and read one step
    late (waiting only for the previous step, while the current one is queued); on a CPU they
    are current."""

    def __init__(self, device: torch.device, pin_memory: bool) -> None:
        self._in_row = torch.zeros((), dtype=torch.int64, device=device)
        self._total = torch.zeros((), dtype=torch.int64, device=device)
        self._host = torch.zeros(2, dtype=torch.int64, pin_memory=pin_memory)
        self._event = torch.cuda.Event() if device.type == "cuda" else None
        self.in_row = self.total = 0

    def add(self, fault: torch.Tensor) -> None:
        """Count one step (fault: () bool on the device), then the (lagged) host copy."""
        self._in_row = torch.where(fault, self._in_row + 1, 0)
        self._total += fault
        if self._event is not None:  # GPU: read the previous step's counts, then send these
            self._read()
            self._host.copy_(torch.stack([self._in_row, self._total]), non_blocking=True)
            self._event.record()
        else:
            self._host.copy_(torch.stack([self._in_row, self._total]))
            self._read()

    def _read(self) -> None:
        if self._event is not None:
            self._event.synchronize()
        self.in_row, self.total = self._host.tolist()

    def exact_total(self) -> int:
        """The total up to the last step counted (syncs; for a checkpoint)."""
        return int(self._total)

    def restore(self, total: int) -> None:
        """A resumed run's total (its steps in a row start at 0)."""
        self._total.fill_(total)
        self.total = total
