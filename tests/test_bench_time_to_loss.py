"""bench/time_to_loss.py: where a curve reaches the target, the ratios and verdicts, and a short
real run of two arms in lockstep (the demo case, 4 steps) writing its JSON, table and plot."""

from __future__ import annotations

import json

import pytest

from bench.common import gpt2_tokenizer_folder
from bench.time_to_loss import crossing, main, seconds_at, summarize


def test_crossing_interpolates_between_the_evaluations_around_it():
    curve = [[10, 5.0, 1.0], [20, 4.0, 2.0], [30, 3.0, 3.5]]
    assert crossing(curve, 3.5) == pytest.approx((25.0, 2.75))  # halfway from step 20 to 30
    assert crossing(curve, 4.0) == (20, 2.0)  # reached exactly at an evaluation
    assert crossing(curve, 6.0) == (10, 1.0)  # already at the first evaluation
    assert crossing(curve, 2.9) is None  # never
    assert crossing([[10, 5.0, 1.0], [20, 5.0, 2.0]], 5.0) == (10, 1.0)


def result(steps_to, secs_to, step_s, steps=100, train_s=10.0, curve=None) -> dict:
    return {"steps_to_target": steps_to, "seconds_to_target": secs_to, "step_s_median": step_s,
            "steps": steps, "train_s": train_s,
            "curve": curve or [[50, 1.0, train_s / 2], [100, 0.9, train_s]]}  # fmt: skip


def test_seconds_at_interpolates_the_time_spent():
    curve = [[10, 5.0, 2.0], [20, 4.0, 6.0]]
    assert seconds_at(curve, 5) == 1.0 and seconds_at(curve, 15) == 4.0
    assert seconds_at(curve, 20) == 6.0 and seconds_at(curve, 30) == 6.0


def test_same_load_seconds_leave_out_a_load_change_after_the_crossing():
    """The baseline's second half ran 3x slower (the machine got busy): measured seconds put that
    on the baseline's total only; the same-load ratio compares the two over the same steps."""
    slow_end = [[50, 1.0, 5.0], [100, 0.9, 20.0]]
    base = result(100, 20.0, 0.2, train_s=20.0, curve=slow_end)
    arm = result(50, 5.5, 0.11)  # reached at step 50, 1.1x the baseline's time up to there
    s = summarize({"c": {"0": {"adamw": base, "muon": arm}}}, ["adamw", "muon"])
    row = s["c"]["muon"]["per_seed"]["0"]
    assert row["seconds_ratio"] == pytest.approx(5.5 / 20.0)
    assert row["same_load_seconds_ratio"] == pytest.approx(0.5 * 1.1)


def test_targets_must_hold_on_every_seed():
    good = {"adamw": result(100, 10.0, 0.1), "muon": result(70, 7.9, 0.11)}
    slow = {"adamw": result(100, 10.0, 0.1), "muon": result(70, 8.5, 0.12)}  # 0.85x seconds
    never = {"adamw": result(100, 10.0, 0.1), "muon": result(None, None, 0.1)}
    one = summarize({"c": {0: good, 1: good}}, ["adamw", "muon"])["c"]["muon"]
    assert one["targets_met_every_seed"]
    # the baseline's default curve spends its time evenly: the same-load ratio is 0.7 x 7.9 / 7
    assert one["per_seed"][0] == pytest.approx({"steps_ratio": 0.7, "seconds_ratio": 0.79,
                                                "same_load_seconds_ratio": 0.79,
                                                "step_time_ratio": 1.1})  # fmt: skip
    for bad in (slow, never):
        s = summarize({"c": {0: good, 1: bad}}, ["adamw", "muon"])["c"]["muon"]
        assert not s["targets_met_every_seed"]
    unreached = summarize({"c": {0: never}}, ["adamw", "muon"])["c"]["muon"]["per_seed"][0]
    assert unreached["steps_ratio"] is None and unreached["seconds_ratio"] is None


def test_gpt2_tokenizer_folder_is_the_real_tokenizer(shared_data, tmp_path):
    from transformers import AutoTokenizer

    out = gpt2_tokenizer_folder(shared_data / "gpt2", tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 50257 and tok("Hello world").input_ids == [15496, 995]


@pytest.mark.slow
def test_two_arms_in_lockstep_write_curves_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "res" / "ttl"
    settings = f"max_steps=4,data_cache_dir={tmp_path / 'cache'},log_interval_steps=2"
    assert main(["--cases", "demo", "--seeds", "0", "--set", settings, "--eval-every", "2",
                 "--work", str(tmp_path / "work"), "--out", str(out)]) == 0  # fmt: skip
    rec = json.loads(out.with_suffix(".json").read_text())
    runs = rec["results"]["demo"]["0"]
    assert set(runs) == {"adamw", "muon"} and rec["arms"]["muon"] == {"optimizer": "muon"}
    for arm, r in runs.items():
        assert [p[0] for p in r["curve"]] == [2, 4] and r["curve"][0][2] > 0, arm
        assert r["target"] == runs["adamw"]["final_eval_loss"]
    assert runs["adamw"]["steps_to_target"] <= 4  # the baseline reaches its own final loss
    assert runs["adamw"]["curve"] != runs["muon"]["curve"]  # two optimizers, not one twice
    md = out.with_suffix(".md").read_text()
    assert "| demo | 0 | muon |" in md and rec["env"]["torch"] in md
    assert out.with_suffix(".png").stat().st_size > 0
