"""octo_kernels.backend: which implementation runs (OCTO_KERNELS / backend=); cast_like's
rounding."""

from __future__ import annotations

import pytest
import torch

import octo_kernels
from octo_kernels import backend


def test_requested_backend_argument_env_and_default(monkeypatch):
    monkeypatch.delenv("OCTO_KERNELS", raising=False)
    assert backend.requested_backend() == "auto"
    monkeypatch.setenv("OCTO_KERNELS", " Torch ")
    assert backend.requested_backend() == "torch"
    assert backend.requested_backend("triton") == "triton"  # the argument wins


def test_unknown_backend_is_one_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown kernel backend 'cuda' \(from argument\)"):
        backend.requested_backend("cuda")
    monkeypatch.setenv("OCTO_KERNELS", "fast")
    with pytest.raises(ValueError, match=r"'fast' \(from OCTO_KERNELS\); use one of"):
        octo_kernels.rms_norm(torch.randn(2, 8), torch.ones(8))


def test_use_triton_on_cpu_tensors(monkeypatch):
    x = torch.randn(2, 8)
    assert backend.use_triton(x, backend="torch") is False
    assert backend.use_triton(x, backend="auto") is False  # auto: CUDA tensors only
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.use_triton(x, backend="triton") is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        backend.use_triton(x, backend="triton")


def test_env_var_picks_the_path(monkeypatch):
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.ones(16)
    monkeypatch.setenv("OCTO_KERNELS", "triton")
    assert "octo_rms_norm_fwd" in type(octo_kernels.rms_norm(x, w).grad_fn).__name__
    monkeypatch.setenv("OCTO_KERNELS", "torch")
    assert "octo" not in type(octo_kernels.rms_norm(x, w).grad_fn).__name__
    monkeypatch.setenv("OCTO_KERNELS", "auto")  # CPU tensors: the reference
    assert "octo" not in type(octo_kernels.rms_norm(x, w).grad_fn).__name__


def test_argument_overrides_env_in_every_public_function(monkeypatch):
    x, w = torch.randn(3, 16, requires_grad=True), torch.ones(16)
    q, k = torch.randn(1, 2, 4, 16, requires_grad=True), torch.randn(1, 1, 4, 16)
    cos, sin = torch.ones(4, 16), torch.zeros(4, 16)
    labels, head = torch.tensor([1, 2, -100]), torch.randn(5, 16)
    calls = {  # each returns an output made by the op itself (its grad_fn names the op)
        "rms_norm": lambda b: octo_kernels.rms_norm(x, w, backend=b),
        "rope": lambda b: octo_kernels.apply_rope(q, k, cos, sin, backend=b)[0],
        "cross_entropy": lambda b: octo_kernels.cross_entropy(
            x, labels, reduction="none", backend=b
        ),
        "linear_cross_entropy": lambda b: octo_kernels.linear_cross_entropy(
            x, head, labels, backend=b
        ),
    }
    for env, arg in (("torch", "triton"), ("triton", "torch")):
        monkeypatch.setenv("OCTO_KERNELS", env)
        for name, call in calls.items():
            fused = "octo" in type(call(arg).grad_fn).__name__
            assert fused == (arg == "triton"), f"{name}: OCTO_KERNELS={env}, backend={arg!r}"


def test_without_triton(monkeypatch):
    # macOS / Windows: auto and torch run the reference, triton is one clear error
    monkeypatch.setattr(backend, "_TRITON_AVAILABLE", False)
    x = torch.randn(2, 8)
    assert backend.use_triton(x, backend="auto") is False
    assert backend.use_triton(x, backend="torch") is False
    with pytest.raises(RuntimeError, match="'triton' requested but Triton does not import"):
        octo_kernels.rms_norm(x, torch.ones(8), backend="triton")


def test_describe(monkeypatch):
    monkeypatch.setenv("OCTO_KERNELS", "torch")
    assert backend.describe("cuda").startswith("reference")
    monkeypatch.setenv("OCTO_KERNELS", "auto")
    assert backend.describe("cpu").startswith("reference")
    monkeypatch.setenv("OCTO_KERNELS", "triton")
    assert backend.describe("cpu") == "fused Triton kernels (interpreted)"


if backend.triton_available():
    import triton
    import triton.language as tl

    from octo_kernels.backend import cast_like

    @triton.jit
    def _cast_kernel(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, cast_like(tl.load(X + offs), Y))


@pytest.mark.skipif(not backend.triton_available(), reason="Triton does not import")
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 3.4e38 -> fp16
def test_cast_like_rounds_to_nearest_even():
    # Bit-exact against torch's fp32 -> bf16/fp16 conversion (round to nearest, ties to even),
    # including exact ties, values that round up into the next binade, and inf. Interpreted on
    # the CPU (where it corrects Triton's truncating cast), compiled on a GPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(4096) * 3
    ties = torch.tensor([1.00390625, 1.01171875, -1.00390625, 255.5, 1.9999999, 0.0, -0.0])
    x[: ties.numel()] = ties
    x[-3:] = torch.tensor([float("inf"), -float("inf"), 3.4e38])
    x = x.to(device)
    for dtype in (torch.bfloat16, torch.float16):
        y = torch.empty(x.numel(), dtype=dtype, device=device)
        _cast_kernel[(1,)](x, y, N=x.numel())
        assert torch.equal(y.view(torch.int16), x.to(dtype).view(torch.int16)), dtype
