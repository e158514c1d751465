"""Checkpoint save and load throughput (issue 6, section 6): the seed model (OctoConfig.preset
"seed", ~127M fp32 parameters) with its AdamW state (exp_avg, exp_avg_sq: ~1.5 GB in all), Octo's
save_checkpoint / load_checkpoint side by side with torch.save / torch.load of the same state, on
the local disk under pytest's tmp_path, in one run.

    pytest bench/test_bench_checkpoint.py --benchmark-only --benchmark-group-by=group
    python -m bench.test_bench_checkpoint [rounds]   # the same, providers interleaved per round

On a shared machine the load drifts over the minutes one provider's rounds take; the second form
alternates the providers within each round, so each sees the same conditions (min and median).

Providers:
    octo          save_checkpoint: sharded safetensors + JSON, every file fsynced, marker, rename;
                  load_checkpoint: verify (sizes, headers) then copy into the live model/optimizer
    torch         torch.save of {model, optimizer, trainer_state} state dicts (no fsync: the file
                  may still sit in the page cache when it returns); torch.load(weights_only=True)
                  then load_state_dict
    torch_fsync   torch.save followed by fsync, i.e. as durable as Octo's save

Loads read what the save just wrote, so they measure a warm page cache, for both providers alike;
both end with every tensor resident in memory (safetensors maps files lazily: Octo copies).
Each case records env_info() and its GB/s (state bytes / time) in extra_info.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from bench.common import env_info
from octo import OctoConfig, OctoForCausalLM
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import TrainConfig

PROVIDERS = ["octo", "torch", "torch_fsync"]
ROUNDS = 5


@pytest.fixture(scope="module")
def seed_state():
    return _seed_state()


def _seed_state():
    """The seed model and an AdamW whose state exists (one step on random gradients)."""
    torch.manual_seed(0)
    model = OctoForCausalLM(OctoConfig.preset("seed"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    trainer_state = {"step": 1, "epoch": 0, "tokens_seen": 0}
    return model, opt, trainer_state, nbytes


def _torch_save(path, model, opt, trainer_state, fsync: bool) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": trainer_state}
    with open(path, "wb") as f:
        torch.save(state, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _octo_save(root, model, opt, trainer_state):
    return save_checkpoint(
        root, 1, model=model, optimizer=opt, trainer_state=trainer_state, train_config=TrainConfig()
    )


def _record(benchmark, nbytes: int, op: str) -> None:
    benchmark.group = f"checkpoint {op}: seed model + AdamW state"
    benchmark.extra_info.update(env_info())
    benchmark.extra_info["state_bytes"] = nbytes


def _gbps(benchmark, nbytes: int) -> None:
    benchmark.extra_info["GB_per_s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 3)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_save(benchmark, seed_state, tmp_path, provider):
    model, opt, trainer_state, nbytes = seed_state
    _record(benchmark, nbytes, "save")
    target = tmp_path / "ckpt"

    def clear():
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        return (), {}

    if provider == "octo":
        run = lambda: _octo_save(target, model, opt, trainer_state)
    else:
        run = lambda: _torch_save(target, model, opt, trainer_state, provider == "torch_fsync")
    benchmark.pedantic(run, setup=clear, rounds=ROUNDS, iterations=1)
    _gbps(benchmark, nbytes)


@pytest.mark.parametrize("provider", ["octo", "torch"])
def test_load(benchmark, seed_state, tmp_path, provider):
    model, opt, trainer_state, nbytes = seed_state
    _record(benchmark, nbytes, "load")
    if provider == "octo":
        path = _octo_save(tmp_path, model, opt, trainer_state)
        run = lambda: load_checkpoint(path, model=model, optimizer=opt)
    else:
        path = tmp_path / "state.pt"
        _torch_save(path, model, opt, trainer_state, fsync=False)
        run = lambda: _torch_load(path, model, opt)

    assert run() == trainer_state  # the load is real: it returns what was saved
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    _gbps(benchmark, nbytes)


def main(rounds: int = 5) -> None:
    """Save and load of every provider, interleaved within each round; prints a Markdown table."""
    model, opt, trainer_state, nbytes = _seed_state()
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("OCTO_BENCH_DIR")) as d:
        d = Path(d)
        cases = {
            "save octo": lambda: _octo_save(d / "octo", model, opt, trainer_state),
            "save torch": lambda: _torch_save(d / "t.pt", model, opt, trainer_state, False),
            "save torch_fsync": lambda: _torch_save(d / "t.pt", model, opt, trainer_state, True),
            "load octo": lambda: load_checkpoint(
                d / "octo" / "checkpoint_step_1", model=model, optimizer=opt
            ),
            "load torch": lambda: _torch_load(d / "t.pt", model, opt),
        }
        for _ in range(rounds):
            for name, fn in cases.items():
                if name == "save octo":
                    shutil.rmtree(d / "octo", ignore_errors=True)
                t0 = time.perf_counter()
                fn()
                times.setdefault(name, []).append(time.perf_counter() - t0)
    print(json.dumps(env_info()))
    state = "seed model fp32 + AdamW exp_avg, exp_avg_sq"
    print(f"state: {nbytes / 1e9:.3f} GB ({state}); {rounds} rounds")
    print("| case | min s | median s | GB/s at median |\n|---|---|---|---|")
    for name, ts in times.items():
        ts = sorted(ts)
        med = ts[len(ts) // 2]
        print(f"| {name} | {ts[0]:.3f} | {med:.3f} | {nbytes / med / 1e9:.2f} |")


def _torch_load(path, model, opt):
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return state["trainer"]


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
