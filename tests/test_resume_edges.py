"""Resuming at the edges of a run, in process through train.run.run() on a tiny model (CPU, fp32,
synthetic batches; the helpers of test_interrupts): another max_steps (hence another
learning-rate schedule) is one warning line and goes on; a finished run (its last step reached
and its final model saved) is one line and exit 0 with nothing evaluated, saved or sampled again;
a final model of an earlier step does not count as finished."""

from __future__ import annotations

import shutil

from tests.test_interrupts import make_trainer, run_trainer, sigint_guard  # noqa: F401
from train.optim import LRSchedule, schedule_change


def warnings(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("warning: ")]


def test_another_max_steps_on_resume_is_one_warning_line(tmp_path, monkeypatch, capsys):
    assert run_trainer(make_trainer(tmp_path, max_steps=2, warmup_steps=1), monkeypatch) == 0
    capsys.readouterr()
    ckpt = tmp_path / "ckpt" / "checkpoint_step_2"
    tr = make_trainer(tmp_path, max_steps=6, warmup_steps=1, resume_from=str(ckpt))
    assert run_trainer(tr, monkeypatch) == 0
    now, then = LRSchedule(3e-4, 1, 6, min_lr_ratio=0.1)(2), LRSchedule(3e-4, 1, 2)(2)
    assert warnings(capsys.readouterr().out) == [
        "warning: resuming with another learning-rate schedule (planned steps 2 -> 6): the "
        f"learning rate at step 2 is {now:.1e}, the checkpoint's schedule gave {then:.1e}; "
        "continuing"
    ]
    assert f"{now:.1e}" != f"{then:.1e}"


def test_schedule_change_names_each_change_and_nothing_when_equal():
    saved = LRSchedule(1e-3, 10, 100, "cosine", 0.1).state_dict()
    assert schedule_change(saved, LRSchedule(1e-3, 10, 100, "cosine", 0.1), 50) is None
    line = schedule_change(saved, LRSchedule(1e-3, 20, 100, "linear", 0.2), 50)
    assert line.startswith("resuming with another learning-rate schedule (warmup_steps 10 -> 20, "
                           "lr_schedule cosine -> linear, min_lr_ratio 0.1 -> 0.2): ")  # fmt: skip
    assert schedule_change(None, LRSchedule(1e-3, 10, 100), 5) is None  # no saved schedule
    # the peak alone is the learning_rate warning's business
    assert schedule_change(saved, LRSchedule(2e-3, 10, 100, "cosine", 0.1), 50) is None


def test_resuming_a_finished_run_says_so_and_exits_0(tmp_path, monkeypatch, capsys):
    assert run_trainer(make_trainer(tmp_path, max_steps=2), monkeypatch) == 0
    final, ckpt = tmp_path / "ckpt" / "final", tmp_path / "ckpt" / "checkpoint_step_2"
    stamps = {p: p.stat().st_mtime_ns for p in (final / "config.json", ckpt / "trainer_state.json")}
    capsys.readouterr()
    tr = make_trainer(tmp_path, max_steps=2, resume_from=str(tmp_path / "ckpt"))
    evals = []
    monkeypatch.setattr(tr, "evaluate", lambda: evals.append(1))
    assert run_trainer(tr, monkeypatch) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines()[-1] == (
        f"{ckpt} is at step 2, this run's last (max_steps), and {final} holds its weights: the "
        "run is complete; raise max_steps above 2 to train on"
    )
    assert "Final model" not in captured.out and "Saved checkpoint" not in captured.out
    assert not evals
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing written again


def test_a_final_model_of_an_earlier_step_is_not_a_finished_run(tmp_path, monkeypatch, capsys):
    """final/ from step 2, the checkpoint at step 3 (a run extended, then stopped before its
    final save): resuming at step 3 saves the final model of step 3."""
    assert run_trainer(make_trainer(tmp_path, max_steps=2), monkeypatch) == 0
    root = tmp_path / "ckpt"
    shutil.copytree(root / "final", tmp_path / "final_2")
    tr = make_trainer(tmp_path, max_steps=3, resume_from=str(root))
    assert run_trainer(tr, monkeypatch) == 0
    shutil.rmtree(root / "final")
    shutil.copytree(tmp_path / "final_2", root / "final")  # step 2's weights beside step 3's
    capsys.readouterr()
    tr = make_trainer(tmp_path, max_steps=3, resume_from=str(root))
    assert run_trainer(tr, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "the run is complete" not in out and f"Final model: {root / 'final'}" in out
    from train.checkpoint.verify import same_weights

    assert same_weights(root / "final", root / "checkpoint_step_3")
    assert not same_weights(tmp_path / "final_2", root / "checkpoint_step_3")
