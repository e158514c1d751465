"""Shared benchmark plumbing: environment facts, timing that respects CUDA's asynchrony, bandwidth.

Every benchmark result records env_info() so a number always says what hardware, versions,
commit and date produced it.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from train.runtime import cpu_name  # bench's CPU facts name the CPU as a run's model card does


def env_info() -> dict:
    """Hardware, versions, commit and date of this run. The commit is git's HEAD, or where the
    tree has no .git (a copy sent to a GPU machine) $OCTO_COMMIT, which the sender sets."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # the repository
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except Exception:  # a copy of the tree without .git (the GPU machines): the caller says
        commit = os.environ.get("OCTO_COMMIT") or "unknown (no .git here; set OCTO_COMMIT)"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except Exception:
            info["driver"] = None
    return info


def gpt2_tokenizer_folder(gpt2: Path, out: Path) -> Path:
    """A transformers tokenizer folder at `out`, built offline from the real GPT-2 vocab.json and
    merges.txt in `gpt2` (../shared/data/gpt2), once; returns out."""
    if not (out / "tokenizer.json").is_file():
        import inspect

        from transformers import GPT2TokenizerFast

        vocab, merges = str(gpt2 / "vocab.json"), str(gpt2 / "merges.txt")
        # transformers 5 names the files vocab=/merges= and silently ignores vocab_file= (leaving
        # a 1-token tokenizer); 4.x is the other way round
        if "vocab" in inspect.signature(GPT2TokenizerFast.__init__).parameters:
            tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
        else:
            tok = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
        if len(tok) != 50257:
            raise ValueError(f"{gpt2}: expected GPT-2's 50257 tokens, got {len(tok)}")
        tok.save_pretrained(out)
    return out


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_cuda(fn: Callable[[], object], warmup: int = 5, rep: int = 20) -> float:
    """Median milliseconds per call of fn() on the GPU: after `warmup` calls, `rep` calls
    enqueued back to back, each between two CUDA events, and one synchronize at the end (as
    triton.testing.do_bench does).

    Why not a synchronize after each call (this function did that until 2026-12-06): then every
    call starts on an idle GPU, and its time includes the host's whole path to its first kernel
    launch (Python, op dispatch, autograd), which a kernel called through Python pays and a
    device-to-device copy, the ceiling it is compared with, hardly does. Back to back, the host
    prepares call i + 1 while the GPU runs call i: a GPU-bound call is timed at its GPU time,
    and a host-bound one (the launch-bound seed shapes) still shows its host time, as a training
    loop sees it."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(rep)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str = "cuda") -> float | None:
    """Peak memory allocated during fn(), above what was allocated before it, in MiB (fn's
    outputs and temporaries; inputs excluded).

    CUDA: the caching allocator's counters. CPU: torch has no such counters, so one profiled
    call replays every CPU allocation and free in order (torch.profiler's memory timeline, a
    private API: None where it is missing); profiling slows that call, not the timed ones."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action

        acts = [ProfilerActivity.CPU]
        with profile(
            activities=acts, profile_memory=True, record_shapes=True, with_stack=True
        ) as p:
            fn()  # its outputs are freed on return, inside the profile: both ends are seen
        timeline = p._memory_profile().timeline  # (time, action, (key, version), bytes)
    except Exception:
        return None
    now = peak = 0
    for _t, action, (key, _version), n_bytes in sorted(timeline, key=lambda e: e[0]):
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            now += n_bytes
        elif action == Action.DESTROY:
            now -= n_bytes
        peak = max(peak, now)
    return peak / 2**20


# torch.profiler's trace categories of the work a device itself does (Kineto's names)
DEVICE_WORK = {"cuda": ("kernel", "gpu_memcpy", "gpu_memset"), "cpu": ("cpu_op",)}


def union_ms(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start_us, end_us) intervals, in ms: work on overlapping streams
    (or nested CPU ops) counts once."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total / 1e3


def device_busy_ms(fn: Callable[[], object], device: torch.device | str = "cuda") -> float:
    """Milliseconds during one call of fn() in which the device was working: the union of its
    kernels, copies and memsets as torch.profiler (Kineto/CUPTI) records them.

    Why: a step whose busy time is well under its wall time waits on the host (Python, op
    dispatch, launches), not on the GPU; more kernel work will not show in its speed, and less
    host work will. Read from the profiler's Chrome trace (its documented format) rather than its
    Python event objects, which change between torch versions. On a CPU device the "work" is the
    time inside profiled aten ops, which only serves to test this function."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    work = DEVICE_WORK[device.type]
    spans = [
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in work and "dur" in e
    ]
    return union_ms(spans)


def gbps(n_bytes: int, ms: float) -> float:
    """Bandwidth: bytes that must move, over time (GB/s, 1e9)."""
    return n_bytes / (ms * 1e-3) / 1e9


def pass_fn(
    pass_: str,
    op: Callable[..., Any],
    args: tuple,
    wrt: tuple[torch.Tensor, ...] = (),
    upstream: Any = None,
) -> Callable[[], Any]:
    """The timed callable of one benchmark case: "fwd" runs op(*args) under no_grad; "fwd+bwd"
    returns torch.autograd.grad(op(*args), wrt, upstream) (not .backward: nothing accumulates
    into .grad between calls)."""
    if pass_ == "fwd":

        def fwd() -> Any:
            with torch.no_grad():
                return op(*args)

        return fwd
    return lambda: torch.autograd.grad(op(*args), wrt, upstream)
