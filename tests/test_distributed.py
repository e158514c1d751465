"""Several processes (issue 7): DDP and FSDP2 on CPU with gloo, 2 ranks, through torchrun.

Every distributed run is `torchrun --standalone --nproc_per_node 2 -m train` (or this file as the
torchrun script, for the fault-injection cases: see `_driver` at the bottom) on a small story
corpus with its own 512-token BPE, pre-tokenized (its data position is global, so 2 ranks x
batch 2 read exactly the blocks 1 process x batch 4 reads), tiny model, fp32, eager, reference
kernels, accumulation 2. The single-process reference runs in this process.

    DDP and FSDP2 vs one process     the same per-step losses, gradient norms, eval losses and
                                     final weights within fp32 tolerance
    resume on 2 ranks                bit-identical continuation (losses, weights, AdamW state,
                                     trainer_state with each rank's data position and RNG)
    FSDP2 checkpoint in 1 process    loads in OctoForCausalLM and transformers' Llama; a 1-process
                                     run resumes from it (re-sharding 2 -> 1 ranks) and continues
                                     as the 1-process reference
    agreement                        a NaN loss and a SIGTERM on rank 1 only: both ranks skip the
                                     same step, stop at the same step, keep identical weights
    a rank that raises               the job ends (bounded), with the error shown
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.child_env import child_env
from tests.fakes import ListData
from tests.run_logs import records, tensors

ROOT = Path(__file__).resolve().parents[1]
STEPS, MID = 8, 4
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32: only the order of the sums differs


def settings(corpus: dict[str, Path], run_dir: Path, world: int) -> list[str]:
    """The test config for `world` processes with the same global batch (4 sequences x 2
    micro-steps) and the same eval blocks (2 x 2 on 2 ranks, 1 x 4 on one)."""
    return [
        f"dataset_name={corpus['data']}", f"tokenizer_name={corpus['tokenizer']}",
        f"data_cache_dir={corpus['cache']}", f"checkpoint_dir={run_dir / 'ckpt'}",
        f"log_dir={run_dir / 'logs'}", "device=cpu", "precision=fp32", "compile=off",
        "kernels=torch", "block_size=32", f"batch_size={4 // world}",
        "gradient_accumulation_steps=2", f"max_steps={STEPS}", f"save_interval_steps={MID}",
        "eval_interval_steps=3", f"eval_max_batches={world}", "log_interval_steps=1",
        "warmup_steps=2", "buffer_size=16", "keep_last_checkpoints=10", "sample_max_new_tokens=2",
        "pretokenize=true", "num_workers=0",
    ]  # fmt: skip


def train_here(corpus, run_dir: Path, *overrides: str) -> None:
    """`python -m train` on one process, inside this one (the environment is restored after:
    the run sets OCTO_KERNELS)."""
    from train.__main__ import main

    saved = dict(os.environ)
    try:
        code = main(["--model-config", "tiny", "--set", *settings(corpus, run_dir, 1), *overrides])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert code == 0


def torchrun(corpus, run_dir: Path, *overrides: str, script: list[str] | None = None,
             timeout: float = 240) -> subprocess.CompletedProcess:  # fmt: skip
    """2 processes through torchrun: `-m train` with the test config, or `script` (this file
    with a scenario) followed by the same arguments. Returns the finished process."""
    target = script or ["-m", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *target, "--model-config", "tiny", "--set", *settings(corpus, run_dir, 2),
           *overrides]  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=run_dir, env=rank_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def rank_env() -> dict[str, str]:
    """The ranks' environment: this one without a fault injection or WORLD_SIZE, the checkout
    importable, one thread per rank on CPU (2 ranks share 2 cores)."""
    return child_env(drop=("OCTO_CRASH_AT", "WORLD_SIZE"), OMP_NUM_THREADS="1")


def ok(r: subprocess.CompletedProcess) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    return out


def assert_close_runs(got_dir: Path, ref_dir: Path, after: int = 0, **weights_tol: float) -> None:
    """Per-step loss and grad norm, eval losses and the final weights and AdamW moments agree
    within fp32 tolerance (steps after `after`); weights_tol overrides TOL for the tensors."""
    got, ref = records(got_dir), records(ref_dir)
    steps = [s for s in ref["train"] if s > after]
    assert steps and sorted(s for s in got["train"] if s > after) == steps
    for s in steps:
        for key in ("loss", "grad_norm"):
            assert got["train"][s][key] == pytest.approx(ref["train"][s][key], rel=1e-5), (s, key)
    evals = {s: v for s, v in ref["eval"].items() if s > after}
    assert evals and {s: v for s, v in got["eval"].items() if s > after} == pytest.approx(evals)
    a, b = (
        got_dir / "ckpt" / f"checkpoint_step_{STEPS}",
        ref_dir / "ckpt" / f"checkpoint_step_{STEPS}",
    )
    for prefix in ("model", "optimizer"):
        ta, tb = tensors(a, prefix), tensors(b, prefix)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], **{**TOL, **weights_tol}, msg=k)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    """The 1-process reference: batch 4, 8 steps, checkpoints at 4 and 8."""
    run_dir = tmp_path_factory.mktemp("single")
    train_here(corpus, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory):
    """The 2-rank run of a parallelism (8 steps, checkpoints at 4 and 8), run once per module;
    returns (run folder, console output)."""
    runs: dict[str, tuple[Path, str]] = {}

    def get(parallelism: str) -> tuple[Path, str]:
        if parallelism not in runs:
            run_dir = tmp_path_factory.mktemp(parallelism)
            runs[parallelism] = run_dir, ok(torchrun(corpus, run_dir, f"parallelism={parallelism}"))
        return runs[parallelism]

    return get


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(two_ranks, single, parallelism):
    run_dir, out = two_ranks(parallelism)
    assert (
        f"Global batch: 2 x 2 accumulation x 2 processes = 8 sequences per step "
        f"({parallelism.upper()})" in out
    )
    assert_close_runs(run_dir, single)
    end = records(run_dir)["end"]
    assert end["status"] == "completed" and end["step"] == STEPS
    state = json.loads(
        (run_dir / "ckpt" / f"checkpoint_step_{STEPS}" / "trainer_state.json").read_text()
    )
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert state["tokens_seen"] == STEPS * 2 * 2 * 2 * 32


def test_muon_ddp_two_ranks_match_one_process(corpus, tmp_path):
    """optimizer muon under DDP: every rank runs torch.optim.Muon on the same all-reduced
    gradients, so 2 ranks train as 1 process does. Not to fp32 tolerance: torch.optim.Muon's
    Newton-Schulz runs in bf16, where an input differing by 1e-6 (the all-reduce's order of
    sums) gives an update differing by ~1% (measured: 0.7-1.0% for 64-wide matrices), so the
    runs drift apart by that much per step in their weights while their losses stay within
    1e-5 (measured over these 8 steps: loss 8e-6, grad norm 2e-4, eval 7e-6, final weights
    3.2% of a tensor's norm at most). That the ranks stay identical is exact:
    test_ranks_agree_on_nan_skip_and_stop[muon]."""
    train_here(corpus, tmp_path / "single", "optimizer=muon")
    out = ok(torchrun(corpus, tmp_path / "ddp", "optimizer=muon", "parallelism=ddp"))
    assert "Optimizer: Muon for the 14 decoder-layer matrices" in out  # tiny: 2 layers x 7
    got, ref = records(tmp_path / "ddp"), records(tmp_path / "single")
    assert sorted(got["train"]) == sorted(ref["train"]) == list(range(1, STEPS + 1))
    for s, r in ref["train"].items():
        assert got["train"][s]["loss"] == pytest.approx(r["loss"], rel=1e-4), s
        assert got["train"][s]["grad_norm"] == pytest.approx(r["grad_norm"], rel=2e-3), s
    assert got["eval"] == pytest.approx(ref["eval"], rel=1e-4) and ref["eval"]
    step = f"checkpoint_step_{STEPS}"
    for prefix in ("model", "optimizer"):  # Muon's momentum buffers and AdamW's moments
        ta, tb = (tensors(tmp_path / d / "ckpt" / step, prefix) for d in ("ddp", "single"))
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert float((ta[k] - tb[k]).norm()) <= 0.1 * float(tb[k].norm()), k
    assert "state.model.layers.0.self_attn.q_proj.weight.momentum_buffer" in ta


def test_fsdp_resume_on_two_ranks_is_exact(corpus, tmp_path):
    """Streamed data (one position per rank), FSDP2: a run of 8 steps, then a run resumed from
    its step-4 checkpoint (both in one torchrun job, see _driver): steps 5..8 are bit-identical,
    and so is everything in the final checkpoint, each rank's data position and RNG included."""
    out = ok(torchrun(corpus, tmp_path, "parallelism=fsdp", "pretokenize=false",
                      script=[__file__, "resume"]))  # fmt: skip
    ref_dir, run_dir = tmp_path / "straight", tmp_path / "resumed"
    assert f"Resumed from straight/ckpt/checkpoint_step_{MID} at step {MID}" in out
    got, ref = records(run_dir), records(ref_dir)
    for kind in ("train", "eval"):
        want = {s: v for s, v in ref[kind].items() if s > MID}
        have = {s: v for s, v in got[kind].items() if s > MID}
        if kind == "train":  # timings differ; the numbers must not
            keys = ("loss", "grad_norm", "tokens_seen", "nonfinite_skips")
            want = {s: [r[k] for k in keys] for s, r in want.items()}
            have = {s: [r[k] for k in keys] for s, r in have.items()}
        assert have == want and want, kind
    a = run_dir / "ckpt" / f"checkpoint_step_{STEPS}"
    b = ref_dir / "ckpt" / f"checkpoint_step_{STEPS}"
    for prefix in ("model", "optimizer"):
        ta, tb = tensors(a, prefix), tensors(b, prefix)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k
    sa, sb = (json.loads((d / "trainer_state.json").read_text()) for d in (a, b))
    assert sa == sb  # step, tokens, schedule, each rank's data position and RNG states
    positions = [r["data"] for r in sa["ranks"]]
    assert positions[0]["mode"] == "stream" and positions[0] != positions[1]


def test_fsdp_checkpoint_loads_in_one_process(two_ranks, single, corpus, tmp_path):
    """The FSDP2 run's folders are plain model folders: Octo and transformers load them with the
    same logits; and a 1-process run resumed from the step-4 checkpoint (2 ranks -> 1: the
    pre-tokenized position re-shards exactly) continues as the 1-process reference."""
    from transformers import LlamaForCausalLM

    from octo import OctoForCausalLM
    from train.checkpoint import verify_checkpoint

    run_dir, _ = two_ranks("fsdp")
    ckpt = run_dir / "ckpt" / f"checkpoint_step_{STEPS}"
    verify_checkpoint(ckpt)
    ids = torch.randint(0, 512, (2, 16))
    for folder in (ckpt, run_dir / "ckpt" / "final"):
        octo = OctoForCausalLM.from_pretrained(folder)
        llama = LlamaForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(octo(ids).logits, llama(ids).logits, rtol=1e-4, atol=1e-4)
    ref = OctoForCausalLM.from_pretrained(single / "ckpt" / "final").state_dict()
    for k, v in OctoForCausalLM.from_pretrained(run_dir / "ckpt" / "final").state_dict().items():
        torch.testing.assert_close(v, ref[k], **TOL, msg=k)

    (tmp_path / "ckpt").mkdir()
    src = run_dir / "ckpt" / f"checkpoint_step_{MID}"
    shutil.copytree(src, tmp_path / "ckpt" / src.name)
    train_here(corpus, tmp_path, f"resume_from={tmp_path / 'ckpt'}")
    assert_close_runs(tmp_path, single, after=MID)


def test_world_size_change_streaming_is_one_clear_error(tmp_path):
    """A streamed data position belongs to its processes: resuming it on another number of
    processes is one CheckpointError naming both; the same number gets each rank its own."""
    from train.checkpoint import CheckpointError, rank_state
    from train.distributed import DistEnv

    ranks = [{"data": {"mode": "stream", "next": r}, "rng": {"r": r}} for r in range(2)]
    state = {"world_size": 2, "data": ranks[0]["data"], "rng": ranks[0]["rng"], "ranks": ranks}
    got = rank_state(state, DistEnv(rank=1, local_rank=1, world_size=2), tmp_path)
    assert got["data"] == {"mode": "stream", "next": 1} and got["rng"] == {"r": 1}
    for world in (1, 4):
        with pytest.raises(CheckpointError, match="run on 2 process.*this one has " + str(world)):
            rank_state(state, DistEnv(world_size=world), tmp_path)
    pretok = {**state, "data": {"mode": "pretok", "position": 8}}
    assert rank_state(pretok, DistEnv(), tmp_path)["data"]["position"] == 8


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ranks_agree_on_nan_skip_and_stop(corpus, tmp_path, optimizer):
    """Rank 1 alone sees a NaN loss at step 2 (its gradients stay finite, so nothing else would
    tell rank 0) and alone gets SIGTERM after step 5: both ranks skip step 2, stop after step 5
    with a checkpoint, and end with identical weights (DDP; with muon, every rank's own Muon
    step on the all-reduced gradients keeps them identical)."""
    r = torchrun(corpus, tmp_path, "parallelism=ddp", f"optimizer={optimizer}",
                 script=[__file__, "agree"])  # fmt: skip
    out = ok(r)
    log = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("training_*.log"))
    assert "Step 2: non-finite loss or gradient norm, optimizer step skipped" in log
    assert "Stopped by a signal to another process at step 5" in log  # rank 0's log
    assert records(tmp_path)["end"]["status"] == "interrupted"
    assert (tmp_path / "ckpt" / "checkpoint_step_5").is_dir()
    # anywhere in the text, not only at a line start: the ranks share the pipe
    sums = dict(re.findall(r"WEIGHTS (\d) (\S+)\n", out))
    assert len(sums) == 2 and len(set(sums.values())) == 1, (sums, out[-3000:])


def test_a_rank_that_raises_ends_the_job(corpus, tmp_path):
    """Rank 1 raises at step 2 (FSDP2): torchrun ends the whole job, non-zero, the error shown,
    within the timeout (rank 0, waiting in a collective, does not hang)."""
    t0 = time.perf_counter()
    r = torchrun(corpus, tmp_path, "parallelism=fsdp", script=[__file__, "fail"], timeout=120)
    assert r.returncode != 0
    assert "injected failure on rank 1 at step 2" in r.stdout + r.stderr
    assert time.perf_counter() - t0 < 120


def test_a_held_checkpoint_dir_stops_every_rank(corpus, tmp_path):
    """Another run holds checkpoint_dir (here: this process): rank 0, the only rank that takes
    the lock, finds it held, and every rank stops with the one line naming the holder, exit 2,
    before any data is read (rank 1 learns it from rank 0 rather than waiting for it in a later
    collective). A two-rank run that completes (above) shows rank 1 never takes it."""
    import socket

    from train.checkpoint.lock import lock_folder

    (tmp_path / "ckpt").mkdir()
    with lock_folder(tmp_path / "ckpt"):
        r = torchrun(corpus, tmp_path, timeout=120)
    out = r.stdout + r.stderr
    line = (f"error: checkpoint_dir {tmp_path / 'ckpt'} is in use by another run (PID "
            f"{os.getpid()} on host {socket.gethostname()}, since ")  # fmt: skip
    assert r.returncode != 0 and out.count(line) == 2, out[-3000:]
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_single_process_checkpoint_starts_two_rank_run(single, corpus, tmp_path, parallelism):
    """A 2-rank run resumed from the 1-process step-4 checkpoint continues as the 1-process run
    does (FSDP2: loaded on rank 0 and scattered into the shards)."""
    (tmp_path / "ckpt").mkdir()
    src = single / "ckpt" / f"checkpoint_step_{MID}"
    shutil.copytree(src, tmp_path / "ckpt" / src.name)
    resume = f"resume_from={tmp_path / 'ckpt'}"
    ok(torchrun(corpus, tmp_path, f"parallelism={parallelism}", resume))
    assert_close_runs(tmp_path, single, after=MID)


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallelism, kernels, weights_atol", [("ddp", "triton", 1e-5), ("fsdp", "torch", 1e-6)]
)
def test_compiled_two_ranks_match_one_process(
    single, corpus, tmp_path, parallelism, kernels, weights_atol
):
    """compile=on: DDP compiles the model's forward inside the wrapper, FSDP2 each layer's; the
    runs match the eager 1-process reference. Both kernel backends trace with fullgraph=True
    (the reference cross-entropy skips its host-syncing label check while compiling), so the two
    cases split them over the wrappers: DDP's whole-model graph, which takes the loss too, with
    the Triton kernels (interpreted here), FSDP2's per-layer graphs with the references.
    Triton's linear + cross-entropy sums in another order than the reference, and AdamW turns a
    tiny gradient's last-bit difference into up to a whole step's update for that weight:
    measured 1.2e-6 on 1 of 11264 weights, against the 2.4e-3 (lr x steps) a weight can move,
    hence atol 1e-5 there."""
    ok(torchrun(corpus, tmp_path, f"parallelism={parallelism}", "compile=on", f"kernels={kernels}",
                timeout=580))  # fmt: skip
    assert_close_runs(tmp_path, single, atol=weights_atol)


# ----- synthetic runs: the Trainer on token batches, without the data pipeline ----------------
# The GPU images have no `datasets`, so the GPU runs (NCCL, bf16, torch.compile, Triton kernels)
# feed the Trainer synthetic token batches (rank r takes rows [r B, (r+1) B) of each global batch)
# instead of the data pipeline; their CPU twin and the DDP communication count use the same runs.
# With one GPU, torchrun --nproc_per_node 1 still wraps the model (a group of one): the code path
# of N GPUs.

GPU_RUN = dict(device="auto", precision="bf16", compile="auto", kernels="auto")
# The GPU run's settings on CPU (gloo): bf16 autocast, and FSDP2's MixedPrecisionPolicy (bf16
# gathered parameters, fp32 gradient reduction); compile and kernels "auto" resolve to eager and
# the references on CPU.
CPU_BF16_RUN = {**GPU_RUN, "device": "cpu"}
CPU_FP32_RUN = {**CPU_BF16_RUN, "precision": "fp32"}
RUNS = {"gpu": GPU_RUN, "cpu_bf16": CPU_BF16_RUN, "cpu_fp32": CPU_FP32_RUN}
# bf16 tolerances, from the CPU analogue (bf16 autocast, FSDP2 bf16 gathers vs 1 process, lr 3e-3,
# 8 steps): loss gaps <= 6.7e-5 relative, gradient norm gaps <= 1.2e-3. A wrong gradient scale
# (world_size, accumulation) moves the norm by >= 2x and the loss visibly at this lr.
GPU_TOL = {"loss": 1e-3, "grad_norm": 1e-2}


class SyntheticData(ListData):
    """This rank's rows of seeded random global batches (8, 64) of 512-token ids; resumable."""

    def __init__(self, rank: int, world: int, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        super().__init__([torch.randint(0, 512, (8, 64), generator=g)[rows] for _ in range(n)])


def synthetic_run(
    run_dir: Path, parallelism: str, world: int, run: dict, resume: str = "", steps: int = 12
) -> None:
    """`steps` steps (12: checkpoints at 6 and 12) of the tiny model on SyntheticData, 2
    micro-steps each, in this process (which torchrun may have started: then it joins the
    group). run: one of RUNS."""
    from octo import OctoConfig
    from train.config import TrainConfig
    from train.distributed import cleanup, init_distributed
    from train.loop import Trainer
    from train.runtime import resolve_device

    cfg = TrainConfig(
        batch_size=8 // world, block_size=64, gradient_accumulation_steps=2, max_steps=steps,
        warmup_steps=2, learning_rate=3e-3, log_interval_steps=1, eval_interval_steps=1000,
        save_interval_steps=6, log_dir=str(run_dir / "logs"), checkpoint_dir=str(run_dir / "ckpt"),
        parallelism=parallelism, seed=1, **run,
    )  # fmt: skip
    device = resolve_device(cfg)
    env = init_distributed(device)
    data = SyntheticData(env.rank, env.world_size, 2 * steps)
    model = OctoConfig.preset("tiny", vocab_size=512, max_position_embeddings=64)
    tr = Trainer(cfg, model, train_data=data, device=device, env=env)
    if resume:
        tr.resume(resume)
    tr.fit()
    tr.log.close()
    cleanup(env)


def synthetic_torchrun(world: int, *args: str) -> str:
    """torchrun of `world` ranks on this file's `synthetic` / `nosync` scenarios; the output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), __file__, *args]  # fmt: skip
    return ok(subprocess.run(cmd, env=rank_env(), capture_output=True, text=True, timeout=580))


def assert_tol_runs(got_dir: Path, ref_dir: Path, tol: dict[str, float], after: int = 0) -> None:
    got, ref = records(got_dir)["train"], records(ref_dir)["train"]
    steps = [s for s in ref if s > after]
    assert steps and sorted(s for s in got if s > after) == steps
    for s in steps:
        for key, rel in tol.items():
            assert got[s][key] == pytest.approx(ref[s][key], rel=rel), (s, key)


def assert_parallel_matches_one_process(tmp_path: Path, run: str, parallelism: str, world: int):
    """RUNS[run] with `parallelism` on `world` ranks follows the 1-process run within GPU_TOL; a
    resume from step 6 continues it; the step-12 checkpoint loads in transformers."""
    synthetic_run(tmp_path / "ref", "ddp", 1, RUNS[run])
    synthetic_torchrun(world, "synthetic", run, parallelism, str(tmp_path / "run"))
    ckpt6 = str(tmp_path / "run" / "ckpt" / "checkpoint_step_6")
    synthetic_torchrun(world, "synthetic", run, parallelism, str(tmp_path / "resumed"), ckpt6)
    assert_tol_runs(tmp_path / "run", tmp_path / "ref", GPU_TOL)
    assert_tol_runs(tmp_path / "resumed", tmp_path / "run", GPU_TOL, after=6)
    from transformers import LlamaForCausalLM

    from octo import OctoForCausalLM

    ckpt = tmp_path / "run" / "ckpt" / "checkpoint_step_12"
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        a = OctoForCausalLM.from_pretrained(ckpt)(ids).logits
        b = LlamaForCausalLM.from_pretrained(ckpt).eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_gpu_parallel_matches_one_gpu(tmp_path, parallelism):
    """bf16, torch.compile, Triton kernels, NCCL: DDP / FSDP2 on min(GPUs, 2) ranks follow the
    plain 1-GPU run; a resume from step 6 continues it; the FSDP2 checkpoint loads in
    transformers."""
    assert_parallel_matches_one_process(
        tmp_path, "gpu", parallelism, min(torch.cuda.device_count(), 2)
    )


def test_fsdp_bf16_two_ranks_match_one_process(tmp_path):
    """The GPU test's bf16 FSDP2 case on CPU (gloo, 2 ranks, eager, reference kernels): bf16
    gathered parameters and fp32 gradient reduction follow the 1-process bf16 run within GPU_TOL
    (measured on the 2-core CPU: losses within 2.1e-5 relative, gradient norms within 7.6e-4),
    and so does the resume from step 6."""
    assert_parallel_matches_one_process(tmp_path, "cpu_bf16", "fsdp", 2)


def test_ddp_all_reduces_on_the_last_micro_step_only(tmp_path):
    """DDP, 2 ranks, accumulation 2, 3 steps: a comm hook sees every gradient all-reduce (one
    per bucket). They all come from the second micro-step's backward, at least one per step, the
    same on both ranks: `no_sync` holds the first micro-step's gradients locally."""
    synthetic_torchrun(2, "nosync", str(tmp_path))
    calls = [json.loads((tmp_path / f"allreduce_{r}.json").read_text()) for r in range(2)]
    assert calls[0] == calls[1]
    assert {(step, micro) for step, micro in calls[0]} == {(1, 1), (2, 1), (3, 1)}, calls[0]


def test_init_distributed_without_torchrun_variables_is_one_clear_error(monkeypatch):
    """WORLD_SIZE set without the rest of torchrun's environment: a ConfigError naming what is
    missing and how to launch, not a KeyError or a hang in the rendezvous."""
    from train.config import ConfigError
    from train.distributed import init_distributed

    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT "
                       "is not; .*torchrun --nproc_per_node N"):  # fmt: skip
        init_distributed(cpu)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="but MASTER_ADDR, MASTER_PORT is not"):
        init_distributed(cpu)


def test_fsdp_with_fp16_is_one_clear_error():
    """FSDP2 under fp16 would need a sharded GradScaler: refused before any sharding (so no
    process group is needed to see it), naming the ways out."""
    from train.config import ConfigError
    from train.distributed import DistEnv, wrap_model

    with pytest.raises(ConfigError, match="'fsdp' with fp16 .*use precision bf16.*parallelism ddp"):
        wrap_model(torch.nn.Linear(2, 2), DistEnv(world_size=2), "fsdp", torch.float16)


# ----- the torchrun script of the fault-injection cases ---------------------------------------


def _driver(scenario: str, argv: list[str]) -> int:
    """`torchrun ... tests/test_distributed.py SCENARIO --model-config ... --set ...`: the real
    `python -m train` with one rank's behaviour changed through the Trainer.
    agree:  rank 1's loss is NaN at step 2 (gradients finite) and it SIGTERMs itself after
            step 5; each rank prints "WEIGHTS <rank> <checksum>" at the end.
    fail:   rank 1 raises at step 2.
    resume: two runs one after the other in one process group: straight/ (8 steps) and
            resumed/, resumed from straight/'s step-4 checkpoint.
    synthetic RUN PARALLELISM RUN_DIR [CHECKPOINT]: synthetic_run with RUNS[RUN].
    nosync RUN_DIR: 3 DDP steps of synthetic_run (fp32) with a comm hook that records each
            gradient all-reduce as [step, micro-step]; rank r writes them to allreduce_r.json."""
    import signal

    from train.__main__ import main
    from train.loop import Trainer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if scenario == "synthetic":
        run = RUNS[argv[0]]
        synthetic_run(Path(argv[2]), argv[1], world, run, argv[3] if len(argv) > 3 else "")
        return 0
    if scenario == "nosync":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        calls: list[list[int]] = []
        step_fn = Trainer.train_step

        def counted_step(self, micro):
            if "_micro" not in self.__dict__:  # first step: hook the all-reduce, count micro-steps
                forward = self._forward_loss

                def counted_forward(ids):
                    self._micro += 1
                    return forward(ids)

                def hook(state, bucket):
                    calls.append([self.step + 1, self._micro])
                    return allreduce_hook(state, bucket)

                self._forward_loss = counted_forward
                self.wrapped.register_comm_hook(None, hook)
            self._micro = -1
            return step_fn(self, micro)

        Trainer.train_step = counted_step
        synthetic_run(Path(argv[0]), "ddp", world, CPU_FP32_RUN, steps=3)
        (Path(argv[0]) / f"allreduce_{rank}.json").write_text(json.dumps(calls))
        return 0

    step_fn, fit_fn = Trainer.train_step, Trainer.fit

    def train_step(self, micro):
        if rank == 1 and scenario == "fail" and self.step == 1:
            raise RuntimeError("injected failure on rank 1 at step 2")
        if scenario == "agree":
            forward = self.__dict__.setdefault("_clean_forward", self._forward_loss)
            poison = rank == 1 and self.step == 1
            self._forward_loss = (lambda ids: forward(ids) + float("nan")) if poison else forward
        stats = step_fn(self, micro)
        if scenario == "agree" and rank == 1 and self.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    def fit(self):
        result = fit_fn(self)
        total = sum(float(p.detach().double().sum()) for p in self.model.parameters())
        # one write with its newline: ranks share the pipe, and under torchrun's `python -u`
        # print() writes the text and the newline separately
        sys.stdout.write(f"WEIGHTS {rank} {total!r}\n")
        sys.stdout.flush()
        return result

    Trainer.train_step, Trainer.fit = train_step, fit
    if scenario == "resume":  # keep the process group for the second run
        import train.run

        destroy, train.run.cleanup = train.run.cleanup, lambda env: None
        first = main([*argv, "checkpoint_dir=straight/ckpt", "log_dir=straight/logs"])
        train.run.cleanup = destroy
        resume = f"resume_from=straight/ckpt/checkpoint_step_{MID}"
        return first or main([*argv, "checkpoint_dir=resumed/ckpt", "log_dir=resumed/logs", resume])
    return main(argv)


if __name__ == "__main__":
    from train.__main__ import exit_process

    exit_process(_driver(sys.argv[1], sys.argv[2:]))
