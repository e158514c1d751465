"""Cross-entropy over a vocabulary, with ignore_index and an optional z-loss.

Shapes: logits (N, V) in fp32/bf16/fp16, labels (N,) int64 with values in [0, V) or ignore_index.

Forward, per row i with label y_i != ignore_index (fp32 math):
    lse_i  = log sum_v exp(x_iv)
    loss_i = lse_i - x_{i,y_i} + z_loss * lse_i^2
Rows whose label is ignore_index have loss 0. reduction: "none" -> (N,) fp32 per-row losses;
"sum" -> scalar; "mean" -> sum / max(#non-ignored, 1) (an all-ignored batch gives 0, never NaN;
the count stays on the device, so there is no host sync).
Backward, with s = dL/dloss_i (1 for "sum", 1/count for "mean"):
    dL/dx_iv = s * (softmax(x_i)_v * (1 + 2 z_loss lse_i) - [v == y_i])
and zero for ignored rows.
"""

from __future__ import annotations

import torch

from kernels.backend import use_triton

REDUCTIONS = ("mean", "sum", "none")


def check_cross_entropy_args(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str
) -> None:
    """Shape/dtype/device checks shared by every path (no host sync)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction {reduction!r} not in {REDUCTIONS}")
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be (N, V), got {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"cross_entropy: labels {tuple(labels.shape)} must be ({logits.shape[0]},) to match "
            f"logits {tuple(logits.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy: labels must be int64 or int32, got {labels.dtype}")
    if not logits.is_floating_point():
        raise ValueError(f"cross_entropy: logits must be floating point, got {logits.dtype}")
    if logits.device != labels.device:
        raise ValueError(f"cross_entropy: logits on {logits.device} but labels on {labels.device}")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels outside [0, V) other than ignore_index: a clear error. Costs one host sync, so only
    the reference path calls it (the Triton kernels document the precondition instead)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"cross_entropy: label {first} is outside the vocabulary [0, {vocab_size}) and is not "
            f"ignore_index={ignore_index}; check the tokenizer's vocab size against the model's"
        )


def reduce_losses(
    per_row: torch.Tensor, valid: torch.Tensor, reduction: str
) -> torch.Tensor:
    """(N,) fp32 per-row losses (0 where ignored) -> the reduction, mean over valid rows."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def cross_entropy_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Reference cross-entropy in fp32. logits (N, V), labels (N,) -> fp32 loss per `reduction`."""
    check_cross_entropy_args(logits, labels, ignore_index, reduction)
    check_label_range(labels, logits.shape[1], ignore_index)
    x = logits.float()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(x, dim=-1)  # (N,)
    target = x.gather(1, safe.unsqueeze(1)).squeeze(1)  # (N,)
    per_row = lse - target
    if z_loss:
        per_row = per_row + z_loss * lse.square()
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return reduce_losses(per_row, valid, reduction)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits (N, V) against labels (N,); fp32 result. See module docstring."""
    if use_triton(logits, labels, backend=backend) and _triton_path is not None:
        check_cross_entropy_args(logits, labels, ignore_index, reduction)
        return _triton_path(logits, labels, ignore_index, reduction, z_loss)
    return cross_entropy_ref(logits, labels, ignore_index, reduction, z_loss)


_triton_path = None  # set by the Triton section of this module
