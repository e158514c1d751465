"""Resume edge cases: an explicitly named checkpoint that an interrupted save left only as its
`.old` folder; one warning line for a streamed resume with another batch_size; the printed resume
command run verbatim from another directory."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from octo import OctoConfig, OctoForCausalLM
from tests.child_env import child_env
from tests.run_logs import records
from train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve_resume,
    resume_warnings,
    save_checkpoint,
)
from train.checkpoint.resume import agree_on_resume
from train.config import TrainConfig
from train.distributed import DistEnv

ROOT = Path(__file__).resolve().parents[1]
LOG = "train.checkpoint"


# ----- 1. checkpoint_step_N named, only checkpoint_step_N.old on disk ---------------------------


def _save(root: Path, step: int) -> Path:
    """A real checkpoint of a tiny model after one AdamW step (several shards)."""
    model = OctoForCausalLM(OctoConfig.preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    return save_checkpoint(root, step, model=model, optimizer=opt, trainer_state={"step": step},
                           train_config=TrainConfig(), max_shard_size="400KB")  # fmt: skip


@pytest.fixture
def replaced(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """checkpoint_step_2 and the state a crash between replace_folder's two renames leaves of
    checkpoint_step_4: its complete .old and the new copy's .tmp, no checkpoint_step_4."""
    _save(tmp_path, 2)
    four = _save(tmp_path, 4)
    before = {p.name: p.read_bytes() for p in four.iterdir()}
    shutil.copytree(four, tmp_path / "checkpoint_step_4.tmp")
    os.rename(four, tmp_path / "checkpoint_step_4.old")
    return four, before


@pytest.mark.parametrize("spelling", ["folder", "seed_pt"])
def test_named_checkpoint_left_as_old_is_restored_and_resumed(replaced, caplog, spelling):
    four, before = replaced
    name = four if spelling == "folder" else four.with_name(four.name + ".pt")
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert resolve_resume(name) == four
    warned = [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno >= 30]
    assert warned == [
        "restoring checkpoint_step_4.old as checkpoint_step_4: a save replacing it was interrupted"
    ]  # the same warning as resolving the parent folder
    assert {p.name: p.read_bytes() for p in four.iterdir()} == before
    assert not four.with_name("checkpoint_step_4.old").exists()
    model = OctoForCausalLM(OctoConfig.preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert load_checkpoint(four, model=model, optimizer=opt)["step"] == 4  # resumable


def test_named_checkpoint_with_damaged_old_is_one_line_error(replaced):
    four, _ = replaced
    old = four.with_name("checkpoint_step_4.old")
    shard = sorted(old.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as e:
        resolve_resume(four)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"resume_from {four} does not exist, and checkpoint_step_4.old"), msg
    assert "is damaged" in msg and str(shard) in msg and "bytes, expected" in msg, msg
    assert msg.endswith(f"or from the parent folder {four.parent} (its newest intact checkpoint)")
    assert old.is_dir() and not four.exists()  # not restored
    assert resolve_resume(four.parent) == four.with_name("checkpoint_step_2")  # the way out


def test_only_rank_0_restores_the_old_folder(replaced, monkeypatch):
    """agree_on_resume: a rank other than 0 takes rank 0's answer and touches no folder."""
    four, _ = replaced
    monkeypatch.setattr("train.checkpoint.resume.broadcast_object", lambda obj, env: ("path", "r0"))
    assert agree_on_resume(str(four), DistEnv(rank=1, world_size=2, group=True)) == Path("r0")
    assert not four.exists() and four.with_name("checkpoint_step_4.old").is_dir()


# ----- 2. a changed batch_size: one warning line ------------------------------------------------


def test_resume_warnings_one_batch_size_line_per_data_mode():
    stream = {"mode": "stream", "batch_size": 4, "buffer_size": 20, "streams": [None]}
    state = {"batch_size": 4, "learning_rate": 1e-3, "world_size": 1, "data": stream}
    (line,) = resume_warnings(state, batch_size=2, learning_rate=1e-3)
    assert line == (
        "resuming with batch_size=2, but the checkpoint was trained with 4 (each data stream "
        "restarts its current shuffle window, so up to 20 blocks per stream are seen again)"
    )
    for data in ({**stream, "buffer_size": 0}, {"mode": "pretok"}, None):  # the data continues
        (line,) = resume_warnings({**state, "data": data}, batch_size=2, learning_rate=1e-3)
        assert line == "resuming with batch_size=2, but the checkpoint was trained with 4"
    assert resume_warnings(state, batch_size=4, learning_rate=1e-3) == []


# ----- 3. the printed resume command, from another directory ------------------------------------

STOPPED = re.compile(r"^Stopped by SIGTERM at step (\d+); .* Resume with: (.*)$", re.M)


def _run_until_step(cmd: str | list[str], cwd: Path, env: dict, run_dir: Path, after: int):
    """Start cmd in cwd (a string: by /bin/sh, as a person would paste it) and SIGTERM the
    training process once run_dir's log has `after` train steps: (output, exit code)."""
    shell = isinstance(cmd, str)
    p = subprocess.Popen(cmd, cwd=cwd, env=env, shell=shell, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if len(records(run_dir)["train"]) >= after:
            pid = p.pid
            if shell:  # dash runs `cd ... && python ...` as its child; bash would exec it
                kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
                pid = int(kids[0]) if kids else pid
            os.kill(pid, signal.SIGTERM)
            break
        time.sleep(0.01)
    out, _ = p.communicate(timeout=240)
    return out, p.returncode


@pytest.mark.slow  # two `python -m train` processes: 13-26 s on the shared 2-core CPU
def test_printed_resume_command_works_from_another_directory(corpus, tmp_path):
    """A run started in `run/` with every path relative (checkpoint_dir, log_dir, data_cache_dir,
    the dataset and the tokenizer), stopped by SIGTERM: the printed command, run verbatim by a
    shell in another directory, resumes from that checkpoint and writes into run/'s folders."""
    run_dir, elsewhere, bin_dir = tmp_path / "run", tmp_path / "elsewhere", tmp_path / "bin"
    for d in (run_dir, elsewhere, bin_dir):
        d.mkdir()
    shutil.copytree(corpus["data"], run_dir / "stories")
    shutil.copytree(corpus["tokenizer"], run_dir / "tok")
    (bin_dir / "python").symlink_to(sys.executable)  # the printed `python` is this one
    env = child_env(drop=("OCTO_CRASH_AT",), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "train", "--model-config", "tiny", "--set",
           "dataset_name=./stories", "tokenizer_name=./tok", "data_cache_dir=cache",
           "checkpoint_dir=ckpt", "log_dir=logs", "device=cpu", "precision=fp32", "compile=off",
           "kernels=torch", "block_size=32", "batch_size=2", "max_steps=100000",
           "pretokenize=false", "num_workers=0", "log_interval_steps=1",
           "eval_interval_steps=100000", "save_interval_steps=100000"]  # fmt: skip
    out, rc = _run_until_step(cmd, run_dir, env, run_dir, after=2)
    m = STOPPED.search(out)
    assert rc == 0 and m, out[-3000:]
    step, printed = int(m[1]), m[2]
    for log in (run_dir / "logs").glob("training_*"):  # the next records() sees the resumed run
        log.rename(log.with_name("first_" + log.name))

    out2, rc2 = _run_until_step(printed, elsewhere, env, run_dir, after=1)
    assert rc2 == 0, out2[-3000:]
    assert f"Resumed from ckpt/checkpoint_step_{step} at step {step}" in out2, out2[-3000:]
    assert min(records(run_dir)["train"]) == step + 1
    m2 = STOPPED.search(out2)
    assert m2 and int(m2[1]) > step, out2[-3000:]
    assert (run_dir / "ckpt" / f"checkpoint_step_{m2[1]}" / "trainer_state.json").is_file()
    assert not any(elsewhere.iterdir())  # nothing written where the command was typed
