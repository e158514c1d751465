"""The training loop's own cost per step: Trainer.fit() (data wait, scheduler, clipping, NaN
bookkeeping, logging every 10 steps) against the bare forward + backward + optimizer step of the
same model, optimizer and micro-batches, interleaved in one run on the CPU tiny config.

    pytest bench/test_bench_loop.py -s      (prints the numbers and the CPU)

Twenty rounds alternate bare steps and fit() steps, so a neighbour's load hits both alike. fit()'s
steps are timed from its data iterator (a mark at each step's first fetch delimits one whole loop
iteration; its start lines and final checkpoint fall outside), in windows of LOG_EVERY steps, each
holding one logged step. Each loop window is divided by the bare window just before it (the
same load around both); the median of those ratios is the overhead, wall clock (the target,
<= 5%) and process CPU time both reported.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

import torch

from bench.common import cpu_name, env_info
from bench.train_throughput import CPU_SHAPE
from octo import OctoConfig, OctoForCausalLM
from train.config import TrainConfig
from train.loop import Trainer
from train.optim import build_optimizer

ROUNDS, WARM, WINDOWS, LOG_EVERY = 20, 5, 1, 10  # a window: LOG_EVERY steps, one log line


def measure(tmp: Path, threads: int = 1) -> dict:
    """One intra-op thread by default: on a shared 2-core machine two OpenMP threads spin against
    the neighbours and a step's time varies 5x; one thread gives a stable step, and the loop's
    overhead (Python on one thread) is reported in ms as well as in %."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(tmp)
    finally:
        torch.set_num_threads(saved_threads)


def _measure(tmp: Path) -> dict:
    device = torch.device("cpu")
    cfg = TrainConfig(
        **CPU_SHAPE, device="cpu", compile="off", max_steps=10**6, warmup_steps=10,
        log_interval_steps=LOG_EVERY, eval_interval_steps=10**6, save_interval_steps=10**6,
        log_dir=str(tmp / "logs"), checkpoint_dir=str(tmp / "ckpt"),
    )  # fmt: skip
    model_cfg = OctoConfig.preset("tiny", vocab_size=256)
    g = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, 256, (cfg.batch_size, cfg.block_size), generator=g) for _ in range(8)]
    accum = cfg.gradient_accumulation_steps

    trainer = Trainer(cfg, model_cfg, device=device)
    torch.manual_seed(0)
    bare_model = OctoForCausalLM(model_cfg)
    bare_opt = build_optimizer(bare_model, cfg, device)  # the same fused AdamW and groups
    n = accum * cfg.batch_size * (cfg.block_size - 1)

    def bare_step(i: int) -> None:
        for j in range(accum):
            ids = pool[(i * accum + j) % len(pool)]
            (bare_model(ids, labels=ids, reduction="sum").loss / n).backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    bare, loop = [], []  # per window of LOG_EVERY steps: (wall, cpu) seconds per step

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def timed_pool(marks: list):
        """The loop's data: marks the clocks at each step's first fetch, so marks delimit whole
        loop iterations (data wait, step, bookkeeping, logging)."""
        for i in itertools.count():
            if i % accum == 0:
                marks.append(clocks())
            yield pool[i % len(pool)]

    def windows(marks: list, out: list) -> None:
        for a, b in zip(marks[WARM::LOG_EVERY], marks[WARM + LOG_EVERY :: LOG_EVERY]):
            out.append(((b[0] - a[0]) / LOG_EVERY, (b[1] - a[1]) / LOG_EVERY))

    steps = WARM + WINDOWS * LOG_EVERY + 1  # marks[k] is taken before step k: one extra step
    for _ in range(ROUNDS):
        marks = []
        for i in range(steps):
            marks.append(clocks())
            bare_step(i)
        windows(marks, bare)
        marks = []
        trainer.total_steps = trainer.step + steps
        trainer.train_data = timed_pool(marks)
        trainer.fit()  # any LOG_EVERY consecutive steps include exactly one logged step
        windows(marks, loop)
    trainer.log.close()
    # Rounds pair a bare window with the loop window right after it (the same neighbours' load):
    # the median of the per-pair ratios is the overhead; medians of the times are shown too.
    med = {name: [1e3 * statistics.median(x[k] for x in xs) for k in (0, 1)]
           for name, xs in (("bare", bare), ("loop", loop))}  # fmt: skip
    ratio = [statistics.median(lp[k] / b[k] for b, lp in zip(bare, loop)) for k in (0, 1)]
    return {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "shape": CPU_SHAPE,
        "model": "tiny, vocab 256", "steps_each": LOG_EVERY * len(loop),
        "bare_step_ms": med["bare"][0], "loop_step_ms": med["loop"][0],
        "overhead": ratio[0] - 1, "overhead_cpu": ratio[1] - 1,
        "bare_step_cpu_ms": med["bare"][1], "loop_step_cpu_ms": med["loop"][1],
    }  # fmt: skip


def test_loop_overhead_cpu(benchmark, tmp_path):
    benchmark.group = "loop-overhead"
    result = benchmark.pedantic(measure, args=(tmp_path,), rounds=1, iterations=1)
    benchmark.extra_info.update(env_info())
    benchmark.extra_info.update(result)
    print(
        f"\nloop overhead on {result['cpu']} ({result['threads']} thread(s)), {CPU_SHAPE}, "
        f"median window, {result['steps_each']} steps each: bare {result['bare_step_ms']:.2f} "
        f"ms/step, Trainer.fit {result['loop_step_ms']:.2f} ms/step; overhead (median of paired "
        f"ratios) {100 * result['overhead']:+.1f}% "
        f"(CPU time: {result['bare_step_cpu_ms']:.2f} vs {result['loop_step_cpu_ms']:.2f} ms, "
        f"{100 * result['overhead_cpu']:+.1f}%)"
    )
    assert result["overhead"] <= 0.05, result
