"""The benchmark plumbing that turns a run into numbers: device busy time and the end-to-end
table. (The benchmarks themselves live in bench/ and run with `pytest bench/`.)"""

from __future__ import annotations

import time

import pytest
import torch

from bench.common import device_busy_ms, union_ms
from bench.train_throughput import markdown


def test_union_counts_overlapping_and_nested_work_once():
    assert union_ms([]) == 0.0
    assert union_ms([(0, 1000)]) == 1.0
    # overlap (0-10, 5-20 -> 20 us), nested (30-40 holds 31-32 -> 10 us), out of order
    assert union_ms([(30, 40), (5, 20), (0, 10), (31, 32)]) == pytest.approx(0.030)
    assert union_ms([(0, 10), (10, 20)]) == pytest.approx(0.020)  # touching: no gap, no double


def test_busy_time_leaves_out_host_idle_time():
    """A call that works ~tens of ms and then sleeps 300 ms: the profiler's op intervals cover
    the work, not the sleep (on CPU the "device work" is the time inside aten ops)."""
    a = torch.randn(256, 256)

    def work_then_idle() -> None:
        for _ in range(10):
            a @ a
        time.sleep(0.3)

    t0 = time.perf_counter()
    busy = device_busy_ms(work_then_idle, "cpu")
    wall_ms = 1e3 * (time.perf_counter() - t0)
    assert 0 < busy < wall_ms - 250, (busy, wall_ms)


@pytest.mark.gpu
def test_gpu_busy_time_is_kernel_time_not_host_time():
    """A ~20 ms GPU spin, then 200 ms of host sleep: busy is the spin, not the sleep."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    torch.cuda.synchronize()
    spin_ms = start.elapsed_time(end)

    def spin_then_idle() -> None:
        torch.cuda._sleep(20_000_000)
        time.sleep(0.2)

    busy = device_busy_ms(spin_then_idle, "cuda")
    assert busy == pytest.approx(spin_ms, rel=0.25), (busy, spin_ms)


def test_table_shows_busy_time_and_reads_older_results():
    env = {"gpu": "GPU X", "torch": "2", "triton": "3", "commit": "abc", "date": "today"}
    row = dict(
        vocab_size=16000, tokens_per_step=32768, precision="bf16", tokens_per_s=2e5,
        mfu=0.2, peak_memory_gib=5.0, step_ms=150.0, first_step_s=30.0,
        phase_ms={"data_wait": 0.1, "forward_backward": 120.0, "optimizer": 3.0},
    )  # fmt: skip
    rows = [
        {**row, "provider": "octo-triton-compiled", "gpu_busy_ms": 74.96},
        {**row, "provider": "hf-llama-eager"},  # a JSON from before gpu_busy_ms existed
    ]
    table = markdown(rows, env)
    assert "GPU busy ms" in table
    octo_line = next(line for line in table.splitlines() if "octo-triton-compiled" in line)
    hf_line = next(line for line in table.splitlines() if "hf-llama-eager" in line)
    assert "| 75.0 |" in octo_line
    assert octo_line.count("|") == hf_line.count("|")
