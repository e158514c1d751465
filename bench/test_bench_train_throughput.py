"""pytest-benchmark wrapper of bench.train_throughput: the real training step, Octo against
transformers' Llama, side by side in one run (tiny fp32 config on CPU; the seed config in bf16
on a GPU). `python -m bench.train_throughput` prints the full table."""

import pytest
import torch

from bench.train_throughput import CPU_SHAPE, GPU_SHAPE, release, run_provider
from octo import OctoConfig

pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
PROVIDERS = ["octo-triton-compiled", "hf-llama-eager"] if CUDA else [
    "octo-reference-eager", "hf-llama-eager"]  # fmt: skip


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step_throughput(benchmark, provider):
    device = torch.device("cuda" if CUDA else "cpu")
    model_cfg = OctoConfig.preset("seed" if CUDA else "tiny", vocab_size=16000 if CUDA else 256)
    shape = GPU_SHAPE if CUDA else CPU_SHAPE
    benchmark.group = "train-step"
    result = benchmark.pedantic(
        run_provider, args=(provider, model_cfg, shape, device, 5, 1), rounds=1, iterations=1
    )
    release(device)
    benchmark.extra_info.update(
        provider=provider, shape=f"{shape}", ms=result["step_ms"],
        tokens_per_s=result["tokens_per_s"], peak_mib=(result["peak_memory_gib"] or 0) * 1024,
    )  # fmt: skip
    assert result["tokens_per_s"] > 0
