"""The training loop's own cost per step: Trainer.fit() (data wait, scheduler, clipping, NaN
bookkeeping, logging every 10 steps) against the bare forward + backward + optimizer step of the
same model, optimizer and micro-batches, interleaved in one run on the CPU tiny config.

    pytest bench/test_bench_loop.py -s      (prints the numbers and the CPU)

Each round times STEPS bare steps, then STEPS steps of fit() (per-step time from the JSON log's
timestamps, so its start lines and final checkpoint are outside the window); rounds alternate so
a neighbour's load hits both alike, and the fastest round of each is compared (load only ever
adds time). Target: overhead <= 5%.
"""

from __future__ import annotations

import itertools
import json
import platform
import time
from pathlib import Path

import torch

from bench.common import env_info
from bench.train_throughput import CPU_SHAPE
from octo import OctoConfig, OctoForCausalLM
from train.config import TrainConfig
from train.loop import Trainer
from train.optim import build_optimizer

ROUNDS, WARM, STEPS, LOG_EVERY = 5, 10, 40, 10


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(tmp: Path) -> dict:
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

    bare, loop = [], []
    for _ in range(ROUNDS):
        for i in range(WARM):
            bare_step(i)
        t = time.perf_counter()
        for i in range(STEPS):
            bare_step(i)
        bare.append((time.perf_counter() - t) / STEPS)

        start = trainer.step
        trainer.total_steps = start + WARM + STEPS
        trainer.train_data = (pool[i % len(pool)] for i in itertools.count())
        trainer.fit()
        records = [json.loads(x) for x in trainer.log.jsonl_path.read_text().splitlines()]
        times = {x["step"]: x["time"] for x in records if x["type"] == "train"}
        loop.append((times[start + WARM + STEPS] - times[start + WARM]) / STEPS)
    trainer.log.close()
    b, lp = min(bare), min(loop)
    return {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "shape": CPU_SHAPE,
        "model": "tiny, vocab 256", "bare_step_ms": 1e3 * b, "loop_step_ms": 1e3 * lp,
        "overhead": lp / b - 1, "bare_rounds_ms": [1e3 * x for x in bare],
        "loop_rounds_ms": [1e3 * x for x in loop],
    }  # fmt: skip


def test_loop_overhead_cpu(benchmark, tmp_path):
    benchmark.group = "loop-overhead"
    result = benchmark.pedantic(measure, args=(tmp_path,), rounds=1, iterations=1)
    benchmark.extra_info.update(env_info())
    benchmark.extra_info.update(result)
    print(
        f"\nloop overhead on {result['cpu']} ({result['threads']} threads), {CPU_SHAPE}: "
        f"bare {result['bare_step_ms']:.2f} ms/step, Trainer.fit {result['loop_step_ms']:.2f} "
        f"ms/step -> {100 * result['overhead']:+.1f}%  (rounds: bare {result['bare_rounds_ms']}, "
        f"loop {result['loop_rounds_ms']})"
    )
    assert result["overhead"] <= 0.05, result
