"""pytest-benchmark wrapper of bench.train_throughput: the real training step, Octo against
transformers' Llama, side by side in one run (tiny fp32 config on CPU; the seed config in bf16
on a GPU). `python -m bench.train_throughput` prints the full table.

Each case records what the harness reports (tokens/s, MFU, peak memory, the step's time split,
first-step time) and checks that the harness measured a real step: the first losses of a fresh
model are ln(V) give or take a little (a loss path reduced wrongly, e.g. a sum read as a mean, is
off by a factor of the token count), and every phase of the split took time."""

import math

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
        tokens_per_s=result["tokens_per_s"], mfu=result["mfu"],
        peak_mib=None if result["peak_memory_gib"] is None else result["peak_memory_gib"] * 1024,
        first_step_s=result["first_step_s"], phase_ms=result["phase_ms"],
        first_losses=result["first_losses"],
    )  # fmt: skip
    assert result["tokens_per_s"] > 0 and result["first_step_s"] > 0
    ln_v = math.log(model_cfg.vocab_size)
    losses = result["first_losses"]
    assert len(losses) == 5 and all(abs(x - ln_v) < 0.25 for x in losses), (ln_v, losses)
    phases = result["phase_ms"]
    assert set(phases) == {"data_wait", "forward_backward", "optimizer"}, phases
    assert phases["data_wait"] >= 0 and phases["forward_backward"] > 0 and phases["optimizer"] > 0
    if CUDA:
        assert result["mfu"] is not None and 0 < result["mfu"] < 1, result["mfu"]
        assert result["peak_memory_gib"] > 0
