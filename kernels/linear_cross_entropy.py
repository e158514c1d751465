"""Fused linear + cross-entropy: loss(hidden @ weight.T, labels) without the full logits.

Shapes: hidden (N, C), weight (V, C) (the lm_head), labels (N,) int64, optional bias (V,).
The loss is exactly cross_entropy(hidden @ weight.T, labels, ...) (see kernels/cross_entropy.py);
the fused path walks the N tokens in chunks, so only a (chunk, V) block of logits ever exists:
forward computes each chunk's loss and, at once, its logit gradient, which it turns into
dL/dhidden (chunk, C) and accumulates into dL/dweight (V, C) in fp32 before the next chunk.
"""

from __future__ import annotations

import torch

from kernels.backend import use_triton
from kernels.cross_entropy import check_cross_entropy_args, cross_entropy_ref


def check_linear_args(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """hidden (N, C) and weight (V, C) agree in C, dtype and device."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
            "must be (N, C) and (V, C)"
        )
    if hidden.device != weight.device:
        raise ValueError(f"linear_cross_entropy: hidden on {hidden.device}, weight on {weight.device}")


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Reference: materialise the (N, V) logits, then cross_entropy_ref. fp32 loss."""
    check_linear_args(hidden, weight)
    logits = hidden @ weight.t()  # (N, V)
    return cross_entropy_ref(logits, labels, ignore_index, reduction, z_loss)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """loss(hidden (N, C) @ weight (V, C).T, labels (N,)); fp32 result. See module docstring."""
    if use_triton(hidden, weight, labels, backend=backend) and _triton_path is not None:
        check_linear_args(hidden, weight)
        check_cross_entropy_args(hidden[:, :1], labels, ignore_index, reduction)
        return _triton_path(hidden, weight, labels, ignore_index, reduction, z_loss)
    return linear_cross_entropy_ref(hidden, weight, labels, ignore_index, reduction, z_loss)


_triton_path = None  # set by the Triton section of this module
