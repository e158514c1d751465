"""Exact resume and crash survival through the real trainer (issue 6, sections 4 and 5).

Every run is `python -m train` in its own process (CPU, fp32 unless the mode says fp16, eager,
tiny model, accumulation 2, an evaluation every 3 steps) on a small local corpus with its own
tokenizer, built once per session. The reference is one uninterrupted run of 8 steps per mode
(streaming with 0 or 2 workers, pre-tokenized, fp16 + GradScaler), saving at step 4; each case
compares, bit for bit, the per-step train losses and eval losses of the steps after the resume
point and the final checkpoint's weights, optimizer state and trainer_state
(which holds the data position and RNG states) against it.

Crashes are injected with train/checkpoint/folder.py's test hook OCTO_CRASH_AT=<point>:<step>, which
makes the process SIGKILL itself at that point of that step's save.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.child_env import child_env
from tests.run_logs import records, tensors

ROOT = Path(__file__).resolve().parents[1]
STEPS, MID = 8, 4

MODES = {
    "stream_0_workers": ["pretokenize=false", "num_workers=0"],
    "stream_2_workers": ["pretokenize=false", "num_workers=2"],
    "pretokenized": ["pretokenize=true", "num_workers=0"],
    # fp16 autocast + GradScaler (practical on CPU with a tiny model): the scaler's state, in
    # trainer_state.json, must continue exactly (its growth tracker counts every step).
    "fp16_grad_scaler": ["pretokenize=false", "num_workers=0", "precision=fp16"],
}


def train(corpus, run_dir: Path, *overrides: str, env: dict | None = None, check=True, popen=False):
    """`python -m train` with the test config plus overrides (later --set values win), logs and
    checkpoints in run_dir. The data mode is stream_0_workers unless overridden."""
    settings = [
        f"dataset_name={corpus['data']}", f"tokenizer_name={corpus['tokenizer']}",
        f"data_cache_dir={corpus['cache']}", f"checkpoint_dir={run_dir / 'ckpt'}",
        f"log_dir={run_dir / 'logs'}", "device=cpu", "precision=fp32", "compile=off",
        "kernels=torch", "block_size=32", "batch_size=2", "gradient_accumulation_steps=2",
        f"max_steps={STEPS}", f"save_interval_steps={MID}", "eval_interval_steps=3",
        "eval_max_batches=2", "log_interval_steps=1", "warmup_steps=2", "buffer_size=16",
        "keep_last_checkpoints=10", "sample_max_new_tokens=1", *MODES["stream_0_workers"],
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "train", "--model-config", "tiny", "--set", *settings, *overrides]
    full_env = child_env(drop=("OCTO_CRASH_AT",), **(env or {}))
    run_dir.mkdir(parents=True, exist_ok=True)
    if popen:
        return subprocess.Popen(cmd, cwd=run_dir, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    r = subprocess.run(cmd, cwd=run_dir, env=full_env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def set_aside_logs(run_dir: Path, prefix: str) -> None:
    """Rename the finished run's logs so the next run's records() sees only its own."""
    for log in (run_dir / "logs").glob("training_*"):
        log.rename(log.with_name(prefix + log.name))


def assert_same_continuation(ref_dir: Path, run_dir: Path, after: int) -> None:
    """Steps after `after` have the same losses, and the final checkpoints are identical."""
    ref, got = records(ref_dir), records(run_dir)
    for kind, value in (("train", lambda r: r["loss"]), ("eval", lambda loss: loss)):
        want = {s: value(v) for s, v in ref[kind].items() if s > after}
        have = {s: value(v) for s, v in got[kind].items() if s > after}
        assert have == want, kind
    assert len(got["train"]) and max(got["train"]) == STEPS
    a, b = (
        ref_dir / "ckpt" / f"checkpoint_step_{STEPS}",
        run_dir / "ckpt" / f"checkpoint_step_{STEPS}",
    )
    for prefix in ("model", "optimizer"):
        ta, tb = tensors(a, prefix), tensors(b, prefix)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k
    sa = json.loads((a / "trainer_state.json").read_text())
    sb = json.loads((b / "trainer_state.json").read_text())
    assert sa == sb  # step, tokens, scheduler, data position, RNG states


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run of each data mode, run once when first asked for."""
    done: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in done:
            run_dir = tmp_path_factory.mktemp(f"ref_{mode}")
            train(corpus, run_dir, *MODES[mode])
            assert sorted(records(run_dir)["train"]) == list(range(1, STEPS + 1))
            done[mode] = run_dir
        return done[mode]

    return get


def resume_from_copy(ref_dir: Path, run_dir: Path, step: int) -> Path:
    """A fresh run folder holding only the reference's checkpoint of `step`."""
    ckpt = run_dir / "ckpt" / f"checkpoint_step_{step}"
    shutil.copytree(ref_dir / "ckpt" / f"checkpoint_step_{step}", ckpt)
    return ckpt


# ----- section 4: exact resume --------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    [
        "stream_0_workers",
        pytest.param("stream_2_workers", marks=pytest.mark.slow),
        pytest.param("pretokenized", marks=pytest.mark.slow),
        pytest.param("fp16_grad_scaler", marks=pytest.mark.slow),
    ],
)
def test_resume_in_new_process_is_bit_exact(corpus, reference, tmp_path, mode):
    """8 steps straight == 4 steps, then a new process resuming from checkpoint_step_4 for 4 more
    (the checkpoint is the one the straight run wrote at step 4, evaluation at step 3 before it
    and step 6 after it)."""
    ref = reference(mode)
    ckpt = resume_from_copy(ref, tmp_path, MID)
    train(corpus, tmp_path, *MODES[mode], f"resume_from={ckpt}")
    assert min(records(tmp_path)["train"]) == MID + 1  # it really resumed
    assert_same_continuation(ref, tmp_path, after=MID)
    if mode == "fp16_grad_scaler":
        final = json.loads(
            (tmp_path / "ckpt" / f"checkpoint_step_{STEPS}" / "trainer_state.json").read_text()
        )
        assert final["scaler"]["_growth_tracker"] == STEPS and final["scaler"]["scale"] > 0


# ----- section 5: crashes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point",
    [
        pytest.param("after_model", marks=pytest.mark.slow),
        "after_first_shard",
        pytest.param("before_marker", marks=pytest.mark.slow),
        "before_rename",
        pytest.param("before_rotate", marks=pytest.mark.slow),
    ],
)
def test_kill_9_during_save_then_resume_from_folder(corpus, reference, tmp_path, point):
    """SIGKILL inside the save of step 4 (saves every 2 steps, the model in several 64 KB shards);
    resuming from the folder continues from the last complete checkpoint with the uninterrupted
    run's losses, and the leftover temporary folder is skipped (with a warning) and then
    removed."""
    ref = reference("stream_0_workers")
    crashed = train(corpus, tmp_path, "save_interval_steps=2", "max_shard_size=64KB",
                    env={"OCTO_CRASH_AT": f"{point}:4"}, check=False)  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout[-2000:] + crashed.stderr[-2000:]
    ckpt = tmp_path / "ckpt"
    expect = 4 if point == "before_rotate" else 2  # renamed into place: complete
    leftover = ckpt / "checkpoint_step_4.tmp"
    assert leftover.is_dir() == (point != "before_rotate")
    set_aside_logs(tmp_path, "crashed_")

    assert len(list((ckpt / "checkpoint_step_2").glob("model-*.safetensors"))) > 1
    r = train(corpus, tmp_path, "save_interval_steps=2", "max_shard_size=64KB",
              f"resume_from={ckpt}")  # fmt: skip
    if point != "before_rotate":
        assert "checkpoint_step_4.tmp" in r.stderr and "interrupted save" in r.stderr, r.stderr
        assert not leftover.exists()  # removed by the resumed run's first save
    assert f"Resumed from {ckpt / f'checkpoint_step_{expect}'} at step {expect}" in r.stdout
    assert min(records(tmp_path)["train"]) == expect + 1
    assert_same_continuation(ref, tmp_path, after=expect)
    assert not list(ckpt.glob("*.tmp")) and not list(ckpt.glob("*.old"))


def test_sigterm_saves_exits_0_and_resumes_exactly(corpus, reference, tmp_path):
    """SIGTERM after step 2 (the reference's config, so the schedule is the same): the step in
    flight finishes, a checkpoint is written, exit code 0; resuming from the folder continues
    exactly."""
    ref = reference("stream_0_workers")
    proc = train(corpus, tmp_path, popen=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(records(tmp_path)["train"]) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    end = records(tmp_path)["end"]
    assert end["status"] == "interrupted", "the run ended before SIGTERM arrived"
    stopped = end["step"]
    assert 2 <= stopped < STEPS and end["checkpoint"].endswith(f"checkpoint_step_{stopped}")
    assert "Resume with:" in out
    set_aside_logs(tmp_path, "first_")
    train(corpus, tmp_path, f"resume_from={tmp_path / 'ckpt'}")
    assert min(records(tmp_path)["train"]) == stopped + 1
    assert_same_continuation(ref, tmp_path, after=stopped)
