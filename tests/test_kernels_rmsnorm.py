"""RMSNorm: the Triton kernel (interpreted on CPU, compiled on a GPU) against the fp32 reference.

Outputs and both gradients, fp32/bf16/fp16, odd shapes, non-contiguous inputs, the torch.library
contract (opcheck), torch.compile(fullgraph=True) against eager, and bad input.

Tolerance (tests/numerics.py): error against the truth <= 2 x the error of the same-dtype PyTorch
computation (the reference run on the kernel's dtype) + atol. The truth is the reference on inputs
upcast to fp64 (it then computes in fp64), so that for fp32 the baseline's own rounding counts too.
"""

from __future__ import annotations

import pytest
import torch
from numerics import FAR_STRIDE, assert_kernel_close, far_view

from octo_kernels.backend import interpreting
from octo_kernels.rmsnorm import MAX_HIDDEN, rms_norm, rms_norm_bwd, rms_norm_fwd, rms_norm_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _fwd_bwd(fn, x, w, g):
    """Run fn(x, w) forward and backward with upstream grad g; return y, dx, dw (detached)."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def _used_kernel(y: torch.Tensor) -> bool:
    return "octo_rms_norm_fwd" in type(y.grad_fn).__name__


def _check_against_reference(x, w, eps=1e-6, device_kernel=True):
    """Kernel vs the reference on fp64-upcast inputs, with the same-dtype reference as baseline."""
    g = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    xk, wk = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = rms_norm(xk, wk, eps, backend="triton")
    assert _used_kernel(y), "the Triton op did not run"
    y.backward(g)
    ref = _fwd_bwd(lambda a, b: rms_norm_ref(a, b, eps), x.double(), w.double(), g.double())
    base = _fwd_bwd(lambda a, b: rms_norm_ref(a, b, eps), x, w, g)
    for name, out, r, b in zip(("y", "dx", "dw"), (y, xk.grad, wk.grad), ref, base):
        assert out.dtype == b.dtype and out.shape == b.shape, name
        assert_kernel_close(out, r, b, name=f"{name} ({x.dtype}, {tuple(x.shape)})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 760), (199, 1128), (2, 3, 760)])
def test_matches_reference(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    w = (1 + 0.2 * torch.randn(shape[-1])).to(dtype)
    _check_against_reference(x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x_fp32_weight(dtype):
    # Under autocast the weight stays fp32 while activations are half precision.
    x = torch.randn(37, 760, dtype=dtype)
    w = 1 + 0.2 * torch.randn(760)
    _check_against_reference(x, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_scales_and_eps(dtype):
    # Rows whose mean square is comparable to eps (so eps changes the result) and an all-zero row
    # (rstd = 1/sqrt(eps)). Scales stay where |dx| = O(10): the fp32 case has atol 1e-5 absolute.
    x = torch.randn(9, 1128) * torch.logspace(-1, 1, 9)[:, None]
    x[4] = 0
    _check_against_reference(x.to(dtype), torch.randn(1128).to(dtype), eps=1e-2)


def test_hidden_16384():
    _check_against_reference(torch.randn(3, 16384), 1 + 0.2 * torch.randn(16384))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    # Row-strided view (no copy: the kernel takes the row stride) and a transposed view (copied
    # inside the op because its last dim is not contiguous); a strided weight.
    rows = torch.randn(33, 2 * 760).to(dtype)[:, :760]
    transposed = torch.randn(760, 33).to(dtype).t()
    strided_w = torch.randn(2 * 760).to(dtype)[::2]
    assert not (rows.is_contiguous() or transposed.is_contiguous() or strided_w.is_contiguous())
    _check_against_reference(rows, torch.randn(760).to(dtype))
    _check_against_reference(transposed, strided_w)


@pytest.mark.skipif(not interpreting(), reason="CPU interpreter only (a sparse-file view)")
def test_int64_offsets_past_2_pow_31(tmp_path):
    # rows 2^30 + 64 elements apart: row 2 starts past 2^31, where an int32 offset wraps (and,
    # from tests/numerics.far_view's layout, reads zeros: y and dx of that row would be wrong)
    x = far_view(tmp_path, (3, 760), (FAR_STRIDE, 1), torch.bfloat16)
    x.copy_(torch.randn(3, 760).to(torch.bfloat16))
    _check_against_reference(x, (1 + 0.2 * torch.randn(760)).to(torch.bfloat16))


def test_expanded_stride0_grad():
    # The grad of .sum() is an expanded stride-0 tensor; the op must not read it as contiguous.
    x, w = torch.randn(5, 3, 96), torch.randn(96)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    for g in (torch.randn(()).expand(5, 3, 96), torch.randn(96).expand(5, 3, 96)):
        dx, dw = rms_norm_bwd(g, x, w, rstd)
        dx_ref, dw_ref = rms_norm_bwd(g.contiguous(), x, w, rstd)
        torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)
        torch.testing.assert_close(dw, dw_ref, rtol=0, atol=0)


def test_opcheck():
    x = torch.randn(4, 3, 96, requires_grad=True)
    w = torch.randn(96, requires_grad=True)
    torch.library.opcheck(rms_norm_fwd, (x, w, 1e-6))
    rstd = torch.rand(4, 3) + 0.5
    torch.library.opcheck(rms_norm_bwd, (torch.randn(4, 3, 96), x.detach(), w.detach(), rstd))


def test_compile_fullgraph_matches_eager():
    def loss(x, w):
        return rms_norm(x, w, 1e-6, backend="triton").sum()

    x = torch.randn(6, 5, 136)
    w = 1 + 0.2 * torch.randn(136)
    eager = _fwd_bwd(lambda a, b: loss(a, b), x, w, torch.tensor(1.0))
    compiled = _fwd_bwd(torch.compile(loss, fullgraph=True), x, w, torch.tensor(1.0))
    for name, a, b in zip(("loss", "dx", "dw"), eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


def test_wide_hidden_falls_back_to_reference():
    x, w = torch.randn(2, MAX_HIDDEN + 2, requires_grad=True), torch.randn(MAX_HIDDEN + 2)
    y = rms_norm(x, w, backend="triton")
    assert not _used_kernel(y)
    torch.testing.assert_close(y, rms_norm_ref(x, w), rtol=0, atol=0)


def test_backend_torch_runs_reference():
    x = torch.randn(3, 64, requires_grad=True)
    y = rms_norm(x, torch.randn(64), backend="torch")
    assert not _used_kernel(y)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_raises(backend):
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="does not match hidden size"):
        rms_norm(x, torch.randn(32), backend=backend)
    with pytest.raises(ValueError, match="does not match hidden size"):
        rms_norm(x, torch.randn(64, 1), backend=backend)
    with pytest.raises(ValueError, match="floating point"):
        rms_norm(x.long(), torch.randn(64), backend=backend)
    with pytest.raises(ValueError, match="on meta"):
        rms_norm(x, torch.randn(64, device="meta"), backend=backend)


# ---------------------------------------------------------------------------- GPU (compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 760), (199, 1128), (8192, 768), (4096, 4096), (64, 16384)])
def test_gpu_matches_reference(shape, dtype):
    x = torch.randn(shape, dtype=dtype, device="cuda")
    w = (1 + 0.2 * torch.randn(shape[-1], device="cuda")).to(dtype)
    _check_against_reference(x, w)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_matches_eager():
    def loss(x, w):
        return rms_norm(x, w).sum()

    x = torch.randn(4, 512, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(768, device="cuda")
    eager = _fwd_bwd(loss, x, w, torch.tensor(1.0, device="cuda"))
    compiled = _fwd_bwd(torch.compile(loss, fullgraph=True), x, w, torch.tensor(1.0, device="cuda"))
    for name, a, b in zip(("loss", "dx", "dw"), eager, compiled):
        torch.testing.assert_close(b, a, msg=name)
