"""The tolerance rule of DESIGN.md, in one place for every kernel test.

A kernel's output passes when its error against the fp32 reference (computed on upcast inputs) is
at most 2x the error of the same-dtype PyTorch computation plus a small atol. The same-dtype
baseline is the reference run on the low-precision inputs (which rounds like PyTorch would).
"""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def assert_kernel_close(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    baseline: torch.Tensor,
    name: str = "output",
    atol: float | None = None,
) -> None:
    """out: the kernel's result; ref_fp32: the fp32 reference on upcast inputs; baseline: the
    same computation in the kernel's dtype (PyTorch).
    Passes when max abs error of out <= 2 x baseline's + atol."""
    assert out.shape == ref_fp32.shape, (
        f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    )
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    ref = ref_fp32.double()
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    base_err = (baseline.double() - ref).abs().max().item() if out.numel() else 0.0
    tol = 2 * base_err + (ATOL.get(out.dtype, 1e-5) if atol is None else atol)
    assert err <= tol, (
        f"{name}: max abs error {err:.3e} > 2 x baseline {base_err:.3e} + atol = {tol:.3e}"
    )
