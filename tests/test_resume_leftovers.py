"""Resume edge cases: an explicitly named checkpoint that an interrupted save left only as its
`.old` folder; one warning line for a streamed resume with another batch_size."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from octo import OctoConfig, OctoForCausalLM
from train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve_resume,
    resume_warnings,
    save_checkpoint,
)
from train.config import TrainConfig
from train.distributed import DistEnv
from train.run import agree_on_resume

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
    monkeypatch.setattr("train.distributed.broadcast_object", lambda obj, env: ("path", "r0"))
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
