"""Shared fixtures for the kernel benchmarks (pytest-benchmark).

    def test_x(kernel_bench, copy_bench):
        kernel_bench(fn, group="rmsnorm fwd+bwd 8192x768 bf16", provider="triton",
                     shape="8192x768", n_bytes=..., device=x.device)
        copy_bench(n_bytes, group=..., shape=...)   # the bandwidth ceiling, same group

`kernel_bench` first checks, when given `expected` (the eager reference on the same inputs), that
the provider computes the same thing: every output within MATCH_RTOL of the largest reference
entry (bf16 rounding is 2^-8 of it; a wrong or missing result is O(1)). A provider that disagrees
fails its case (Liger's skips, with the difference: its API, not ours, is then not like-for-like).
Then it runs the case and records in benchmark.extra_info what bench/report.py reads:
provider, shape, ms, gbps, peak_mib, plus n_bytes, device and env_info() (hardware, versions,
commit, date), so every number says what produced it. At the end of the session the terminal
shows these cases as one table (ms, GB/s, peak MiB), which pytest-benchmark's own tables lack.

Timing on CUDA: `ms` is the median of CUDA-event-timed calls enqueued back to back
(bench.common.time_cuda: warmup first, so torch.compile's compilation is never timed; one
synchronize at the end, so a GPU-bound call is timed at its GPU time, not plus the host's path to
its first launch). The host clock pytest-benchmark reports is kept too, on a function that
synchronizes after each call, so its statistics are honest wall times of one isolated call.
L2 is not flushed between calls (a layer's input usually sits in L2 in training too); at the
large shapes the data is far bigger than L2 anyway.
`gbps` = bytes that must move (the caller's count: each input read once, each output written once,
the same for every provider) / `ms`. `peak_mib` = peak CUDA memory allocated during one call above
what was allocated before it (inputs excluded, outputs and temporaries included).
On the CPU, `ms` is pytest-benchmark's host-clock median and peak_mib comes from one extra,
profiled call (bench.common.peak_memory_mb: torch.profiler's memory timeline).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bench.common import env_info, gbps, peak_memory_mb, time_cuda

HAS_CUDA = torch.cuda.is_available()
_ROWS = pytest.StashKey[list]()  # the kernel cases of this session, for the terminal table
MATCH_RTOL = 2e-2  # provider vs eager reference: max error / max |reference|, per output


def _leaves(out: object) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if t is not None]


def check_same_result(got: object, want: object, provider: str) -> None:
    """Each output tensor of `got` within MATCH_RTOL x max |want| of `want`'s (fp32 compare)."""
    got, want = _leaves(got), _leaves(want)
    problem = None if len(got) == len(want) else f"{len(got)} outputs, the reference {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if problem:
            break
        a, b = a.detach().float(), b.detach().float()
        if a.shape != b.shape:
            problem = f"output {i} has shape {tuple(a.shape)}, the reference {tuple(b.shape)}"
            break
        scale = b.abs().max().item() or 1.0
        err = (a - b).abs().max().item() / scale
        if not err <= MATCH_RTOL:  # NaN fails too
            problem = f"output {i} is {err:.2e} x max |reference| off (allowed {MATCH_RTOL})"
    if problem is None:
        return
    msg = f"{provider} does not compute what the eager reference does: {problem}"
    if provider == "liger":
        pytest.skip(msg + "; not a like-for-like comparison")
    raise AssertionError(msg)


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """cuda when there is a GPU, else cpu (where only the reference cases run, at small shapes)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def _env() -> dict:
    return env_info()


@pytest.fixture
def kernel_bench(benchmark, _env, request) -> Callable[..., None]:
    """Run one benchmark case; see the module docstring for what is recorded and how."""

    def run(
        fn: Callable[[], object],
        *,
        group: str,
        provider: str,
        shape: str,
        n_bytes: int,
        device: torch.device | str,
        expected: Callable[[], object] | None = None,
        **extra: object,
    ) -> None:
        device = torch.device(device)
        want = expected() if expected is not None else None  # before fn: Liger works in place
        try:
            got = fn()
        except Exception as e:
            if provider != "liger":
                raise
            # an API change in Liger must not sink the whole run
            pytest.skip(f"liger_kernel failed on this case: {type(e).__name__}: {e}")
        if want is not None:
            check_same_result(got, want, provider)
        del want, got
        benchmark.group = group
        benchmark.extra_info.update(_env)
        benchmark.extra_info.update(provider=provider, shape=shape, n_bytes=n_bytes, **extra)
        benchmark.extra_info["device"] = str(device)
        if device.type == "cuda":
            ms = time_cuda(fn, warmup=5, rep=50)
            peak = peak_memory_mb(fn, device)

            def synced() -> None:
                fn()
                torch.cuda.synchronize(device)

            benchmark(synced)
        else:
            fn()  # warmup (and torch.compile's compilation) outside the timed rounds
            benchmark(fn)
            stats = getattr(benchmark, "stats", None)
            ms = stats.stats.median * 1e3 if stats is not None else None
            peak = peak_memory_mb(fn, device)
        benchmark.extra_info["ms"] = ms
        benchmark.extra_info["gbps"] = gbps(n_bytes, ms) if ms else None
        benchmark.extra_info["peak_mib"] = peak
        row = dict(group=group, name=request.node.name, provider=provider, shape=shape)
        row.update(ms=ms, gbps=benchmark.extra_info["gbps"], peak_mib=peak)
        request.config.stash.setdefault(_ROWS, []).append(row)

    return run


@pytest.fixture
def copy_bench(kernel_bench, bench_device) -> Callable[..., None]:
    """Benchmark a device-to-device copy that moves n_bytes (reads n_bytes / 2, writes n_bytes / 2)
    as provider "copy": the bandwidth ceiling for a memory-bound kernel moving n_bytes, measured in
    the same run and group. CUDA only (skips on the CPU)."""

    def run(n_bytes: int, *, group: str, shape: str) -> None:
        if bench_device.type != "cuda":
            pytest.skip("the copy ceiling is measured on a CUDA GPU")
        src = torch.empty(n_bytes // 2, dtype=torch.uint8, device=bench_device)
        dst = torch.empty_like(src)
        kernel_bench(
            lambda: dst.copy_(src), group=group, provider="copy", shape=shape, n_bytes=n_bytes,
            device=bench_device,
        )  # fmt: skip

    return run


@pytest.fixture(scope="session")
def liger():
    """liger_kernel.transformers.functional when Liger-Kernel imports, else None."""
    try:
        from liger_kernel.transformers import functional
    except Exception:
        return None
    return functional


def pytest_terminal_summary(terminalreporter, config) -> None:
    """The kernel cases' ms, GB/s and peak MiB side by side (bench/report.py's table)."""
    rows = config.stash.get(_ROWS, [])
    if rows:
        from bench.report import kernel_table

        terminalreporter.write_sep("-", "kernel benchmarks: time, bandwidth, peak memory")
        terminalreporter.write_line(", ".join(f"{k} {v}" for k, v in env_info().items()))
        terminalreporter.write_line(kernel_table(rows))
