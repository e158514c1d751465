"""Ctrl-C and a failing log folder, in process through train.run.run() on a tiny model (CPU, fp32,
synthetic batches): one Ctrl-C during the end-of-run save finishes that save (exit 0); a second
Ctrl-C, or one before training or during the final model's save, is one line and exit 130; the
final model's save never leaves final.tmp nor damages an earlier `final`; a resume at the last
step saves nothing again, and one past it is one line (exit 2); a log file that fails mid-run
is one warning, and training and its checkpoints go on.

Signals are sent to this process (os.kill); a guard handler turns a SIGINT or SIGTERM that reaches
the default handler into a test failure instead of ending pytest."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import types
from pathlib import Path

import pytest
import torch

import train.run as run_mod
from octo import OctoConfig
from tests.fakes import ListData, final_run
from train.checkpoint import complete_checkpoints
from train.config import TrainConfig
from train.loop import Trainer

VOCAB, T = 96, 32
MODEL = OctoConfig.preset("tiny", vocab_size=VOCAB, max_position_embeddings=64)


class StrayInterrupt(Exception):
    """A SIGINT or SIGTERM that reached the handler in place before Octo installed its own."""


@pytest.fixture(autouse=True)
def sigint_guard():
    def stray(signum, frame):
        raise StrayInterrupt(f"{signal.Signals(signum).name} reached the handler outside Octo's")

    previous = {sig: signal.signal(sig, stray) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def make_trainer(tmp_path: Path, **kw) -> Trainer:
    base = dict(batch_size=4, block_size=T, gradient_accumulation_steps=1, max_steps=3,
                warmup_steps=1, log_interval_steps=1, eval_interval_steps=1000,
                save_interval_steps=1000, log_dir=str(tmp_path / "logs"), device="cpu",
                checkpoint_dir=str(tmp_path / "ckpt"), seed=1)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = ListData([torch.randint(0, VOCAB, (4, T), generator=g) for _ in range(8)])
    return Trainer(TrainConfig(**{**base, **kw}), MODEL, train_data=data)


def no_escape(fn, *args) -> int:
    """fn(*args); a KeyboardInterrupt escaping it fails the test (instead of ending pytest)."""
    try:
        return fn(*args)
    except KeyboardInterrupt:
        pytest.fail(f"KeyboardInterrupt escaped {fn.__name__}()")


def run_trainer(tr: Trainer, monkeypatch) -> int:
    """run() with tr as the trainer it builds."""
    monkeypatch.setattr(run_mod, "build_trainer", lambda *a: tr)
    return no_escape(run_mod.run, tr.cfg, {})


def test_ctrl_c_during_the_last_save_finishes_it(tmp_path, monkeypatch, capsys):
    """The signal handlers stay until the end-of-run save is done (they used to be restored
    before it, so Python's handler aborted the save: a traceback, exit 130, nothing saved)."""
    tr = make_trainer(tmp_path)
    real_save = Trainer.save_checkpoint

    def save(self):
        os.kill(os.getpid(), signal.SIGINT)  # handled before the save starts writing
        return real_save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    assert run_trainer(tr, monkeypatch) == 0
    out = capsys.readouterr().out
    ckpt = tmp_path / "ckpt" / "checkpoint_step_3"
    assert f"Stopped by SIGINT at step 3; checkpoint saved to {ckpt}. Resume with:" in out, out
    assert complete_checkpoints(tmp_path / "ckpt") == [(3, ckpt)]
    assert not (tmp_path / "ckpt" / "final").exists()  # interrupted: no final model, no samples


def test_second_ctrl_c_is_one_line_naming_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    tr = make_trainer(tmp_path, max_steps=6, save_interval_steps=1)

    def twice(module, args):
        if tr.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler: KeyboardInterrupt

    tr.model.register_forward_pre_hook(twice)
    assert run_trainer(tr, monkeypatch) == 130
    err = capsys.readouterr().err.strip()
    ckpt = tmp_path / "ckpt" / "checkpoint_step_2"
    assert "\n" not in err, err
    assert err.startswith(
        f"interrupted at step 2; the last complete checkpoint is {ckpt}. Resume with: cd "
    ), err
    assert err.endswith(f"--set resume_from={ckpt}"), err
    assert signal.getsignal(signal.SIGINT).__name__ == "stray"  # fit restored the handlers


def test_ctrl_c_before_training_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "build_trainer", interrupted)
    cfg = TrainConfig(device="cpu", log_dir=str(tmp_path / "l"), checkpoint_dir=str(tmp_path))
    assert no_escape(run_mod.run, cfg, {}) == 130
    assert capsys.readouterr().err == "interrupted before training started; nothing was saved\n"

    from train.__main__ import main  # a Ctrl-C while the config loads (or torch imports)

    monkeypatch.setattr(TrainConfig, "load", interrupted)
    assert no_escape(main, ["--config", "x.json"]) == 130
    assert capsys.readouterr().err == "interrupted before training started; nothing was saved\n"


@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_stopped_final_model_save_leaves_no_tmp_and_keeps_final(tmp_path, monkeypatch, where):
    """A Ctrl-C while the final model is written (final.tmp used to stay: only OSError cleaned
    up), or between replace_folder's two renames (the earlier `final` was only `final.old`)."""
    import octo.files

    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("earlier run\n")

    def save_pretrained(folder, **kw):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        if where == "writing":
            raise KeyboardInterrupt

    def replace_folder(tmp, dest):  # the first of its renames, then the Ctrl-C
        os.rename(dest, dest.with_name(dest.name + ".old"))
        raise KeyboardInterrupt

    monkeypatch.setattr(octo.files, "replace_folder", replace_folder)
    model = types.SimpleNamespace(save_pretrained=save_pretrained, num_parameters=lambda: 0,
                                  config=OctoConfig.preset("tiny"))  # fmt: skip
    run = final_run(TrainConfig(checkpoint_dir=str(tmp_path)), model)
    with pytest.raises(KeyboardInterrupt):
        run_mod.save_final_model(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in final.iterdir()] == ["config.json"]
    assert (final / "config.json").read_text() == "earlier run\n"


def test_ctrl_c_during_final_model_save_is_one_line(tmp_path, monkeypatch, capsys):
    tr = make_trainer(tmp_path)

    def interrupted(trainer):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "save_final_model", interrupted)
    assert run_trainer(tr, monkeypatch) == 130
    err = capsys.readouterr().err
    ckpt = tmp_path / "ckpt" / "checkpoint_step_3"
    assert err.startswith(f"interrupted at step 3; the last complete checkpoint is {ckpt}. ")
    assert err.count("\n") == 1, err


def test_sigterm_outside_training_is_taken_as_ctrl_c(tmp_path, monkeypatch, capsys):
    """SIGTERM during the final model's save (fit's handlers are gone by then): Python's default
    killed the process with no line and left final.tmp (~340 MB for the seed model); now it is
    Ctrl-C's path: final.tmp removed, one line, exit 130. run() restores the SIGTERM handler."""
    tr = make_trainer(tmp_path)
    before = signal.getsignal(signal.SIGTERM)

    real = tr.model.save_pretrained

    def save_pretrained(folder, **kw):  # the final model half written when SIGTERM comes
        real(folder, **kw)
        if Path(folder).name == "final.tmp":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tr.model, "save_pretrained", save_pretrained)
    assert run_trainer(tr, monkeypatch) == 130
    err = capsys.readouterr().err
    ckpt = tmp_path / "ckpt" / "checkpoint_step_3"
    assert err.startswith(f"interrupted at step 3; the last complete checkpoint is {ckpt}. ")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint_step_3"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_resumed_run_stopped_before_training_names_its_checkpoint(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while a resumed run starts: its checkpoint is intact (the line said "nothing was
    saved (no checkpoint yet)")."""

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "agree_on_resume", interrupted)
    cfg = TrainConfig(device="cpu", log_dir=str(tmp_path / "l"), checkpoint_dir=str(tmp_path),
                      resume_from=str(tmp_path / "checkpoint_step_10"))  # fmt: skip
    assert no_escape(run_mod.run, cfg, {}) == 130
    assert capsys.readouterr().err == (
        "interrupted before training started; nothing new was saved: run the same command again "
        f"to resume from {tmp_path / 'checkpoint_step_10'}\n"
    )


def test_resume_at_or_past_the_last_step(tmp_path, monkeypatch, capsys):
    """At the last step (what a run stopped during its final model's save leaves): no training,
    the checkpoint is not saved again (it used to be replaced by an identical copy), the final
    model is saved. Past it (max_steps lowered): one line, exit 2, nothing written."""
    assert run_trainer(make_trainer(tmp_path, max_steps=2), monkeypatch) == 0
    ckpt = tmp_path / "ckpt" / "checkpoint_step_2"
    shutil.rmtree(tmp_path / "ckpt" / "final")
    stamp = (ckpt / "trainer_state.json").stat().st_mtime_ns
    capsys.readouterr()

    tr = make_trainer(tmp_path, max_steps=2, resume_from=str(tmp_path / "ckpt"))
    assert run_trainer(tr, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "Saved checkpoint" not in out, out
    assert (ckpt / "trainer_state.json").stat().st_mtime_ns == stamp
    assert (tmp_path / "ckpt" / "final" / "config.json").is_file()

    tr = make_trainer(tmp_path, max_steps=1, resume_from=str(ckpt))
    assert run_trainer(tr, monkeypatch) == 2
    assert capsys.readouterr().err == (
        f"error: resume_from {ckpt} is at step 2, past this run's last step 1 (max_steps); "
        "raise max_steps above 2 to train on from it\n"
    )


class FailingFile:
    """A log file whose writes fail after `ok` of them, as on a disk that fills up."""

    def __init__(self, f, ok: int) -> None:
        self.f, self.ok, self.name = f, ok, f.name

    def write(self, text: str) -> int:
        self.ok -= 1
        if self.ok < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(text)

    def close(self) -> None:
        self.f.close()
        if self.ok < 0:
            raise OSError(errno.ENOSPC, "No space left on device")  # the buffered rest


def test_a_failing_run_log_does_not_stop_training(tmp_path, monkeypatch, capsys):
    """The .jsonl fails at its 4th record (mid-run): one warning naming the file, the error and
    the fix; the console lines, the checkpoints and the final model go on; exit 0. (It used to
    end the run with a traceback, and again in close(), and no checkpoint.)"""
    tr = make_trainer(tmp_path, max_steps=4, save_interval_steps=2)
    log = tr.log
    log._jsonl = FailingFile(log._jsonl, ok=3)  # start, step 1, step 2
    assert run_trainer(tr, monkeypatch) == 0
    cap = capsys.readouterr()
    assert cap.err == (
        f"warning: writing the run log {log.jsonl_path} failed (No space left on device); the "
        "run's .log and .jsonl are not written from here on (training, the console output and "
        "checkpoints go on): free space or set log_dir to another disk\n"
    )
    assert "Step 4: loss=" in cap.out and "Final model:" in cap.out
    assert [s for s, _ in complete_checkpoints(tmp_path / "ckpt")] == [2, 4]
    assert "Step 4" not in log.log_path.read_text()  # both files stopped at the failure


def test_a_full_log_dir_at_start_is_one_line(tmp_path, monkeypatch, capsys):
    """Writing the resolved config beside the log fails before training: one ConfigError line
    (exit 2), written before any log line, so nothing else fails first."""

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(TrainConfig, "save", full)
    tr = make_trainer(tmp_path)
    assert run_trainer(tr, monkeypatch) == 2
    config = tr.log.log_path.with_name(tr.log.log_path.stem + "_config.json")
    assert capsys.readouterr().err == (
        f"error: config key 'log_dir' is {str(tmp_path / 'logs')!r}: writing {config} failed "
        "(No space left on device); free disk space or set log_dir to a folder you can write "
        "to\n"
    )
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
