"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w.

Shapes: x (..., C), w (C,), y like x. Rows are normalised independently; R = prod(leading dims).

Forward, per row (fp32 math whatever the input dtype):
    rstd = 1 / sqrt(sum_c x_c^2 / C + eps)
    y_c  = x_c * rstd * w_c
Backward, with g = dL/dy and xhat = x * rstd:
    dL/dw_c = sum_rows g_c * xhat_c
    dL/dx_c = rstd * (g_c * w_c - xhat_c * mean_c(g * w * xhat))

The Triton path (added beside this reference) saves rstd (R,) for backward and reduces dL/dw
from fp32 per-program partials.
"""

from __future__ import annotations

import torch

from kernels.backend import use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Reference RMSNorm: fp32 math, result cast back to x's dtype. x (..., C), weight (C,)."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(
            f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}"
        )
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x on {x.device} but weight on {weight.device}")
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim. x (..., C), weight (C,) -> (..., C) in x's dtype."""
    if use_triton(x, weight, backend=backend) and _triton_path is not None:
        return _triton_path(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


_triton_path = None  # set by the Triton section of this module
