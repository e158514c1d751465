"""RoPE forward and forward+backward (q and k together): Triton vs eager reference vs
torch.compile(reference) vs Liger-Kernel (when it imports), with a device-to-device copy of the
same bytes as the ceiling.

    pytest bench/test_bench_rope.py --benchmark-group-by=group

q and k come in the model's layout, proj(x).view(B, T, H, D).transpose(1, 2), bf16; cos/sin are
(T, D) fp32. Shapes: seed B=16 T=512, 12 query / 3 KV heads of 64 (the seed model); large B=16
T=4096, 32 / 8 heads of 128 (q is 65536 tokens x 4096, the large RMSNorm shape). Bytes that must
move: forward reads q, k and the cos/sin rows and writes q, k; backward the same again. On the CPU
only the reference providers run, at B=2 T=128. Target (issue 3, H100): Triton fwd+bwd >= 80% of
the copy's GB/s at the large shape, faster than torch.compile(reference) at the seed shape.
Liger rotates in place, on contiguous (B, T, H, D) copies it makes of q and k.
triton_compiled (seed shape, GPU): the Triton path inside torch.compile, as the model runs it
(bench/gpu.sh runs it with the default custom ops).
"""

from __future__ import annotations

import pytest
import torch

from bench.common import pass_fn
from octo_kernels.rope import apply_rope, apply_rope_ref

# (B, T, Hq, Hkv, D)
SHAPES = {"seed": (16, 512, 12, 3, 64), "large": (16, 4096, 32, 8, 128)}
CPU_SHAPE = (2, 128, 12, 3, 64)
DTYPE = torch.bfloat16
PROVIDERS = ["triton", "eager", "compile", "liger", "triton_compiled"]
PASSES = ["fwd", "fwd+bwd"]


def _n_bytes(B: int, T: int, Hq: int, Hkv: int, D: int, pass_: str) -> int:
    s = torch.finfo(DTYPE).bits // 8
    fwd = 2 * B * T * (Hq + Hkv) * D * s + 2 * T * D * 4  # q, k in and out; cos, sin rows
    return fwd if pass_ == "fwd" else 2 * fwd


def _op(provider: str, liger):
    if provider == "triton":
        return lambda q, k, c, s: apply_rope(q, k, c, s, backend="triton")
    if provider == "triton_compiled":  # as the model runs it: inside a compiled graph
        return torch.compile(
            lambda q, k, c, s: apply_rope(q, k, c, s, backend="triton"), dynamic=False
        )
    if provider == "eager":
        return apply_rope_ref
    if provider == "compile":
        return torch.compile(apply_rope_ref, dynamic=False)
    if liger is None:
        pytest.skip("liger_kernel does not import")
    return lambda q, k, c, s: liger.liger_rope(q, k, c, s)


def _shape(shape_name: str, device: torch.device) -> tuple[int, int, int, int, int]:
    if device.type == "cuda":
        return SHAPES[shape_name]
    if shape_name != "seed":
        pytest.skip("the large shape runs on a CUDA GPU")
    return CPU_SHAPE


def _tables(T: int, D: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    freqs = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS + ["copy"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_rope(kernel_bench, copy_bench, bench_device, liger, shape_name, provider, pass_):
    B, T, Hq, Hkv, D = _shape(shape_name, bench_device)
    n_bytes = _n_bytes(B, T, Hq, Hkv, D, pass_)
    shape = f"B{B} T{T} H{Hq}/{Hkv} D{D} {str(DTYPE).removeprefix('torch.')}"
    group = f"rope {pass_} {shape}"
    if provider == "copy":
        copy_bench(n_bytes, group=group, shape=shape)
        return
    if provider in ("triton", "liger", "triton_compiled") and bench_device.type != "cuda":
        pytest.skip("Triton kernels are benchmarked on a CUDA GPU")
    if provider == "triton_compiled" and shape_name != "seed":
        pytest.skip("compiled Triton: the launch-bound seed shape only (the kernel is the same)")
    q = torch.randn(B, T, Hq, D, device=bench_device, dtype=DTYPE).transpose(1, 2)  # (B, Hq, T, D)
    k = torch.randn(B, T, Hkv, D, device=bench_device, dtype=DTYPE).transpose(1, 2)
    cos, sin = _tables(T, D, bench_device)
    # upstream grads in the model's layout too (SDPA's backward returns that layout)
    gq = torch.randn(B, T, Hq, D, device=bench_device, dtype=DTYPE).transpose(1, 2)
    gk = torch.randn(B, T, Hkv, D, device=bench_device, dtype=DTYPE).transpose(1, 2)
    if pass_ == "fwd+bwd":
        q.requires_grad_()
        k.requires_grad_()

    def case(op):
        return pass_fn(pass_, op, (q, k, cos, sin), (q, k), (gq, gk))

    fn = case(_op(provider, liger))
    expected = None if provider == "eager" else case(_op("eager", liger))
    kernel_bench(
        fn, group=group, provider=provider, shape=shape, n_bytes=n_bytes, device=bench_device,
        expected=expected, **{"pass": pass_, "dtype": str(DTYPE)},
    )  # fmt: skip
