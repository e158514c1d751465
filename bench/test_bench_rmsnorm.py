"""RMSNorm forward and forward+backward: Triton vs eager reference vs torch.compile(reference) vs
Liger-Kernel (when it imports), with a device-to-device copy of the same bytes as the ceiling.

    pytest bench/test_bench_rmsnorm.py --benchmark-group-by=group

Shapes (rows x hidden, bf16 x and weight): seed 8192 x 768 (16 x 512 tokens of the seed model),
large 65536 x 4096. Bytes that must move: forward reads x and writes y (2 R C) plus w and rstd;
forward+backward adds reading dy and x and writing dx (3 R C). On the CPU only the reference
providers run, at 512 x 768. Targets (issue 3, H100): Triton fwd+bwd >= 80% of the copy's GB/s at
the large shape, and faster than torch.compile(reference) at the seed shape.
triton_compiled (seed shape, GPU): the Triton path inside torch.compile, as the model runs it
(bench/gpu.sh runs it with the default custom ops).
"""

from __future__ import annotations

import pytest
import torch

from bench.common import pass_fn
from octo_kernels.rmsnorm import rms_norm, rms_norm_ref

SHAPES = {"seed": (8192, 768), "large": (65536, 4096)}
CPU_SHAPE = (512, 768)
DTYPE = torch.bfloat16
EPS = 1e-6
PROVIDERS = ["triton", "eager", "compile", "liger", "triton_compiled"]
PASSES = ["fwd", "fwd+bwd"]


def _n_bytes(rows: int, cols: int, pass_: str) -> int:
    s = torch.finfo(DTYPE).bits // 8
    fwd = 2 * rows * cols * s + cols * s + rows * 4  # x in, y out, w in, rstd out
    bwd = 3 * rows * cols * s + cols * s + rows * 4 + cols * s  # dy, x in, dx out, w, rstd, dw
    return fwd if pass_ == "fwd" else fwd + bwd


def _op(provider: str, liger):
    if provider == "triton":
        return lambda x, w: rms_norm(x, w, EPS, backend="triton")
    if provider == "triton_compiled":  # as the model runs it: inside a compiled graph
        return torch.compile(lambda x, w: rms_norm(x, w, EPS, backend="triton"), dynamic=False)
    if provider == "eager":
        return lambda x, w: rms_norm_ref(x, w, EPS)
    if provider == "compile":
        return torch.compile(lambda x, w: rms_norm_ref(x, w, EPS), dynamic=False)
    if liger is None:
        pytest.skip("liger_kernel does not import")
    return lambda x, w: liger.liger_rms_norm(x, w, EPS, casting_mode="llama", in_place=False)


def _shape(shape_name: str, device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        return SHAPES[shape_name]
    if shape_name != "seed":
        pytest.skip("the large shape runs on a CUDA GPU")
    return CPU_SHAPE


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS + ["copy"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_rmsnorm(kernel_bench, copy_bench, bench_device, liger, shape_name, provider, pass_):
    rows, cols = _shape(shape_name, bench_device)
    n_bytes = _n_bytes(rows, cols, pass_)
    shape = f"{rows}x{cols} {str(DTYPE).removeprefix('torch.')}"
    group = f"rmsnorm {pass_} {shape}"
    if provider == "copy":
        copy_bench(n_bytes, group=group, shape=shape)
        return
    if provider in ("triton", "liger", "triton_compiled") and bench_device.type != "cuda":
        pytest.skip("Triton kernels are benchmarked on a CUDA GPU")
    if provider == "triton_compiled" and shape_name != "seed":
        pytest.skip("compiled Triton: the launch-bound seed shape only (the kernel is the same)")
    x = torch.randn(rows, cols, device=bench_device, dtype=DTYPE)
    w = (1 + 0.1 * torch.randn(cols, device=bench_device)).to(DTYPE)
    g = torch.randn_like(x)
    if pass_ == "fwd+bwd":
        x.requires_grad_()
        w.requires_grad_()

    def case(op):
        return pass_fn(pass_, op, (x, w), (x, w), g)

    fn = case(_op(provider, liger))
    expected = None if provider == "eager" else case(_op("eager", liger))
    kernel_bench(
        fn, group=group, provider=provider, shape=shape, n_bytes=n_bytes, device=bench_device,
        expected=expected, **{"pass": pass_, "dtype": str(DTYPE)},
    )  # fmt: skip
