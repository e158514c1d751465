"""Linear + cross-entropy (the lm_head and the loss) forward and forward+backward: the fused
chunked path vs eager reference (full logits) vs torch.compile(reference) vs Liger-Kernel's fused
linear cross-entropy (when it imports).

    pytest bench/test_bench_linear_ce.py --benchmark-group-by=group

Shapes (tokens x hidden -> vocab; bf16 hidden and weight; int64 labels, 1 in 8 ignored; "mean"):
seed 8192 x 768 -> 16000 and -> 50257; large 65536 x 4096 -> 50257 (skipped when the eager
reference runs out of GPU memory). This op is matmul-bound: extra_info also records tflops
(2 N V C per matmul: one forward, two backward) beside ms, GB/s (hidden, weight, gradients) and
peak_mib. On the CPU only the reference providers run, at 512 x 256 -> 16000.
Targets (issue 3, H100) at vocab 50257: fused peak memory <= 25% of eager's, time <= 1.2x eager.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import pass_fn
from octo_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

SHAPES = {"v16000": (8192, 768, 16000), "v50257": (8192, 768, 50257), "large": (65536, 4096, 50257)}
CPU_SHAPE = (512, 256, 16000)
DTYPE = torch.bfloat16
PROVIDERS = ["triton", "eager", "compile", "liger"]
PASSES = ["fwd", "fwd+bwd"]


def _n_bytes(rows: int, hidden: int, vocab: int, pass_: str) -> int:
    s = torch.finfo(DTYPE).bits // 8
    fwd = rows * hidden * s + vocab * hidden * s + rows * 8  # hidden, weight, labels in
    return fwd if pass_ == "fwd" else 2 * fwd  # + dhidden, dweight out (and the inputs again)


def _op(provider: str, liger):
    if provider == "triton":
        return lambda h, w, y: linear_cross_entropy(h, w, y, backend="triton")
    if provider == "eager":
        return linear_cross_entropy_ref
    if provider == "compile":
        return torch.compile(linear_cross_entropy_ref, dynamic=False)
    if liger is None:
        pytest.skip("liger_kernel does not import")
    return lambda h, w, y: liger.liger_fused_linear_cross_entropy(
        h, w, y, ignore_index=-100, reduction="mean"
    )


def _shape(shape_name: str, device: torch.device) -> tuple[int, int, int]:
    if device.type == "cuda":
        return SHAPES[shape_name]
    if shape_name != "v16000":
        pytest.skip("this shape runs on a CUDA GPU")
    return CPU_SHAPE


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_linear_cross_entropy(
    benchmark, kernel_bench, bench_device, liger, shape_name, provider, pass_
):
    if shape_name == "large" and (pass_ == "fwd" or provider == "liger"):
        pytest.skip("large shape: fwd+bwd of triton/eager/compile only (keeps bench/gpu.sh short)")
    rows, hidden, vocab = _shape(shape_name, bench_device)
    n_bytes = _n_bytes(rows, hidden, vocab, pass_)
    shape = f"{rows}x{hidden}->{vocab} {str(DTYPE).removeprefix('torch.')}"
    group = f"linear_cross_entropy {pass_} {shape}"
    if provider in ("triton", "liger") and bench_device.type != "cuda":
        pytest.skip("Triton kernels are benchmarked on a CUDA GPU")
    h = torch.randn(rows, hidden, device=bench_device, dtype=DTYPE)
    w = (torch.randn(vocab, hidden, device=bench_device) / hidden**0.5).to(DTYPE)
    y = torch.randint(0, vocab, (rows,), device=bench_device)
    y[::8] = -100
    if pass_ == "fwd+bwd":
        h.requires_grad_()
        w.requires_grad_()

    def case(op):
        return pass_fn(pass_, op, (h, w, y), (h, w))

    fn = case(_op(provider, liger))
    # the eager reference's (N, V) logits do not fit beside the large shape's inputs: no check
    check = provider != "eager" and shape_name != "large"
    expected = case(_op("eager", liger)) if check else None
    out_of_memory = False
    try:
        kernel_bench(
            fn, group=group, provider=provider, shape=shape, n_bytes=n_bytes,
            device=bench_device, expected=expected, **{"pass": pass_, "dtype": str(DTYPE)},
        )  # fmt: skip
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True  # skip outside the handler, once its frames (and tensors) are gone
    if out_of_memory:
        del fn, h, w, y
        torch.cuda.empty_cache()
        pytest.skip(f"{provider} {pass_} at {shape} does not fit in GPU memory")
    ms = benchmark.extra_info.get("ms")
    matmuls = 1 if pass_ == "fwd" else 3
    benchmark.extra_info["tflops"] = 2 * matmuls * rows * hidden * vocab / (ms * 1e-3) / 1e12
