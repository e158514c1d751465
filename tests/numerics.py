"""The tolerance rule of DESIGN.md, in one place for every kernel test.

A kernel's output passes when its error against the fp32 reference (computed on upcast inputs) is
at most 2x the error of the same-dtype PyTorch computation plus a small atol. The same-dtype
baseline is the reference run on the low-precision inputs (which rounds like PyTorch would).

For outputs computed entry by entry without cancellation (the logits gradient of a
cross-entropy: softmax minus one-hot, scaled), `elementwise=True` also holds each entry to its own
magnitude: its error may be 2x the baseline's error there or REL_ULPS units of the dtype's
precision of the entry, whichever is larger. The max alone cannot see wrong small entries: a
gradient over 50257 classes is mostly ~1e-7, below the fp32 atol, so a kernel that zeroed half of
it would pass. Outputs that are sums with cancellation (matmul and norm gradients, rotations)
have errors relative to their terms, not to themselves, and keep the max rule only.
"""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}
REL_ULPS = {torch.float32: 64.0, torch.bfloat16: 1.0, torch.float16: 1.0}


def assert_kernel_close(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    baseline: torch.Tensor,
    name: str = "output",
    atol: float | None = None,
    elementwise: bool = False,
) -> None:
    """out: the kernel's result; ref_fp32: the fp32 reference on upcast inputs; baseline: the
    same computation in the kernel's dtype (PyTorch).
    Passes when max abs error of out <= 2 x baseline's + atol; with elementwise, also when each
    entry's error <= 2 x max(baseline's error there, REL_ULPS x eps(dtype) x |reference there|)."""
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
    if not elementwise or not out.numel():
        return
    errs, base_errs = (out.double() - ref).abs(), (baseline.double() - ref).abs()
    rel = REL_ULPS.get(out.dtype, 64.0) * torch.finfo(out.dtype).eps * ref.abs()
    bound = 2 * torch.maximum(base_errs, rel) + torch.finfo(out.dtype).tiny
    bad = errs > bound
    if bad.any():
        i = int(torch.argmax((errs - bound).flatten()))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {out.numel()} entries beyond their own bound; worst "
            f"at flat index {i}: got {out.flatten()[i].item():.6e}, reference "
            f"{ref.flatten()[i].item():.6e}, baseline {baseline.flatten()[i].item():.6e}"
        )


# Offsets past 2^31 elements without 2^31 elements of memory: see far_view.
FAR_BASE = 2**32  # elements before the view's first one: an int32-wrapped offset lands in the file
FAR_STRIDE = 2**30 + 64  # fits int32 (as the kernels get it); twice it does not


def far_view(
    tmp_path, size: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A zero-filled view of `size` and `stride` whose last elements lie more than 2^31 elements
    past its first, backed by a sparse file (only the pages written or read get memory: a few MB).

    Why: a kernel that forms `row * stride` in int32 wraps past 2^31 and reads the wrong memory;
    on a GPU that needs a > 4 GiB tensor, here it needs none. The view starts FAR_BASE = 2^32
    elements into the file, so a wrapped offset (the true one minus 2^32) still points into the
    file: it reads zeros, a wrong result the test sees, instead of crashing the interpreter."""
    span = sum((n - 1) * s for n, s in zip(size, stride)) + 1
    assert span - 1 >= 2**31, f"offsets up to {span - 1} stay below 2^31: not a far view"
    n_elements = FAR_BASE + span
    path = tmp_path / "far_view.bin"
    with open(path, "wb") as f:
        f.truncate(n_elements * torch.empty((), dtype=dtype).element_size())  # sparse: no blocks
    flat = torch.from_file(str(path), shared=True, size=n_elements, dtype=dtype)  # mmap
    path.unlink()  # the mapping stays valid; nothing is left behind
    return flat.as_strided(size, stride, FAR_BASE)
