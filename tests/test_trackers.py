"""report_to: TensorBoard (read back with its own EventAccumulator), W&B (offline) and trackio
(local) get every log line's and eval's numbers at their steps, and a resumed run continues the
same run; a missing library is one line before any data; a failing tracker is one warning and
never the end of the run; only an enabled (rank 0) logger reports."""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.child_env import child_env
from tests.run_logs import records
from train import trackers
from train.__main__ import main
from train.config import ConfigError, TrainConfig
from train.metrics import RunLogger
from train.trackers import RUN_FILE, Trackers, report_to_names

STEPS, MID = 8, 4
INSTALLED = [n for n in ("tensorboard", "wandb", "trackio") if importlib.util.find_spec(n)]


def needs(name: str):
    return pytest.mark.skipif(
        name not in INSTALLED, reason=f"{name} is not installed (pip install {name})"
    )


# ----- the key --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,names",
    [("none", []), ("tensorboard", ["tensorboard"]), (["wandb", "trackio"], ["wandb", "trackio"]),
     (["tensorboard", "tensorboard"], ["tensorboard"]), ([], [])],
)  # fmt: skip
def test_report_to_names(value, names):
    assert report_to_names(value) == names
    TrainConfig(report_to=value)  # accepted


@pytest.mark.parametrize(
    "value,needle",
    [("tensorbord", "names 'tensorbord'; choose from none, tensorboard, wandb, trackio"),
     (["none", "wandb"], "'none' cannot go with a tracker"), ([1], "use one of")],
)  # fmt: skip
def test_bad_report_to_is_one_config_line(value, needle):
    with pytest.raises(ConfigError, match="config key 'report_to'") as e:
        TrainConfig(report_to=value)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_report_to_list_from_set():
    cfg = TrainConfig.load(None, ['report_to=["tensorboard", "wandb"]'])
    assert report_to_names(cfg.report_to) == ["tensorboard", "wandb"]


def test_missing_library_is_one_line_before_any_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # import trackio fails, find_spec is None
    cfg = {"dataset_name": str(tmp_path / "missing.txt"), "tokenizer_name": str(tmp_path / "no"),
           "log_dir": str(tmp_path / "logs"), "checkpoint_dir": str(tmp_path / "ckpt"),
           "block_size": 64, "report_to": ["trackio"]}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["--config", str(tmp_path / "c.json"), "--model-config", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key 'report_to' names trackio, which is not installed")
    assert "pip install trackio" in err and "\n" not in err
    assert not (tmp_path / "logs").exists()  # before the folders, the data and the model


def test_run_id_is_kept_in_checkpoint_dir_and_found_again(tmp_path):
    warnings: list[str] = []
    cfg = {"checkpoint_dir": str(tmp_path / "run"), "resume_from": None}
    first = trackers.run_id(cfg, 0, warnings.append)
    assert first.startswith("run-") and (tmp_path / "run" / RUN_FILE).is_file()
    assert (
        trackers.run_id({**cfg, "resume_from": str(tmp_path / "run")}, 5, warnings.append) == first
    )
    # resumed into another checkpoint_dir: the same run, and that folder now knows it too
    other = {"checkpoint_dir": str(tmp_path / "copy"),
             "resume_from": str(tmp_path / "run" / "checkpoint_step_5")}  # fmt: skip
    assert trackers.run_id(other, 5, warnings.append) == first
    assert json.loads((tmp_path / "copy" / RUN_FILE).read_text())["run_id"] == first
    assert warnings == []
    fresh = trackers.run_id(cfg, 0, warnings.append)  # a new run in the folder: a new id
    assert fresh != first
    lost = {"checkpoint_dir": str(tmp_path / "none"), "resume_from": str(tmp_path / "none")}
    assert trackers.run_id(lost, 3, warnings.append) not in (first, fresh)
    assert len(warnings) == 1 and "starting a new one" in warnings[0]


# ----- in-process: the RunLogger hook -----------------------------------------------------------


def start_event(tmp_path: Path, report_to, step: int = 0) -> dict:
    cfg = TrainConfig(report_to=report_to, log_dir=str(tmp_path / "logs"),
                      checkpoint_dir=str(tmp_path / "ckpt"))  # fmt: skip
    return {"type": "start", "step": step, "total_steps": 10, "parameters": 5,
            "precision": "fp32", "config": cfg.to_dict(),
            "model_config": {"hidden_size": 8}}  # fmt: skip


def train_event(step: int) -> dict:
    return {"type": "train", "step": step, "loss": 2.5, "ppl": 12.18, "lr": 1e-3,
            "grad_norm": 0.5, "tokens_per_s": 1000.0, "mfu": None, "mem_gib": None,
            "tokens_seen": 64 * step, "nonfinite_skips": 0, "eta_s": 3.0}  # fmt: skip


@needs("tensorboard")
def test_a_tracker_that_cannot_start_is_one_warning(tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "tensorboard").write_text("a file where the folder goes\n")
    log = RunLogger(tmp_path / "logs")
    log.record(start_event(tmp_path, "tensorboard"))
    for step in (1, 2):
        log.record(train_event(step))
    log.close()
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "the tensorboard tracker failed" in warnings[0], out
    assert "training, the log files and checkpoints go on" in warnings[0]
    jsonl = [json.loads(line) for line in log.jsonl_path.read_text().splitlines()]
    assert [r["type"] for r in jsonl] == ["start", "train", "train"]  # the log goes on
    assert warnings[0] in log.log_path.read_text()


class Flaky:
    """A tracker whose log fails at its second call."""

    calls: list = []

    def __init__(self, run, config, step):
        self.n = 0

    def log(self, metrics, step):
        self.n += 1
        if self.n == 2:
            raise RuntimeError("connection reset\nby peer")
        Flaky.calls.append((step, metrics))

    def close(self):
        Flaky.calls.append("closed")


def test_a_tracker_failing_during_training_is_one_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.CLASSES, "wandb", Flaky)
    Flaky.calls = []
    warnings: list[str] = []
    t = Trackers(warnings.append)
    t.record(start_event(tmp_path, "wandb"))
    for step in (1, 2, 3):
        t.record(train_event(step))
    t.record({"type": "eval", "step": 3, "eval_loss": 2.0, "eval_ppl": 7.39})
    t.close()
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "the wandb tracker failed (RuntimeError: connection reset by peer)" in warnings[0]
    assert [c[0] for c in Flaky.calls] == [1]  # nothing more after the failure, not even close
    assert Flaky.calls[0][1] == {
        "train/loss": 2.5, "train/ppl": 12.18, "train/lr": 1e-3, "train/grad_norm": 0.5,
        "train/tokens_per_s": 1000.0, "train/tokens_seen": 64.0, "train/nonfinite_skips": 0.0,
    }  # fmt: skip


@needs("tensorboard")
def test_only_an_enabled_logger_reports(tmp_path):
    log = RunLogger(tmp_path / "logs", enabled=False)  # ranks other than 0
    log.record(start_event(tmp_path, "tensorboard"))
    log.record(train_event(1))
    log.close()
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()


# ----- end to end: a run and its resume ----------------------------------------------------------


def train(corpus, run_dir: Path, *overrides: str, env: dict) -> None:
    settings = [
        f"dataset_name={corpus['data']}", f"tokenizer_name={corpus['tokenizer']}",
        f"data_cache_dir={corpus['cache']}", f"checkpoint_dir={run_dir / 'ckpt'}",
        f"log_dir={run_dir / 'logs'}", "device=cpu", "precision=fp32", "compile=off",
        "kernels=torch", "block_size=32", "batch_size=2", "gradient_accumulation_steps=1",
        f"max_steps={STEPS}", f"save_interval_steps={MID}", "eval_interval_steps=3",
        "eval_max_batches=2", "log_interval_steps=1", "warmup_steps=2", "pretokenize=false",
        "num_workers=0", "keep_last_checkpoints=10", "sample_max_new_tokens=1",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "train", "--model-config", "tiny", "--set", *settings, *overrides]
    r = subprocess.run(cmd, cwd=run_dir, env=child_env(**env), capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tracker failed" not in r.stdout, r.stdout


@pytest.fixture(scope="module")
def resumed_run(corpus, tmp_path_factory):
    """Every installed tracker on: 8 steps (checkpoints at 4 and 8), then the run resumed from
    step 4, as after a crash (steps 5 to 8 are logged twice). Returns (run folder, env,
    records of the first run, records of both with the resumed run's for steps 5 to 8)."""
    if "tensorboard" not in INSTALLED:
        pytest.skip("tensorboard is not installed (pip install tensorboard)")
    run_dir = tmp_path_factory.mktemp("tracked")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(run_dir / "tio")}
    report_to = f"report_to={json.dumps(INSTALLED)}"
    train(corpus, run_dir, report_to, env=env)
    first = records(run_dir)
    for log in (run_dir / "logs").glob("training_*"):  # records() reads only the next run's
        log.rename(log.with_name("first_" + log.name))
    train(corpus, run_dir, report_to, f"resume_from={run_dir / 'ckpt' / 'checkpoint_step_4'}",
          env=env)  # fmt: skip
    second = records(run_dir)
    both = {kind: {**first[kind], **second[kind]} for kind in ("train", "eval")}  # resumed wins
    return run_dir, env, first, both


def run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "ckpt" / RUN_FILE).read_text())["run_id"]


def expected(recs: dict, step: int) -> dict[str, float]:
    r = recs["train"][step]
    return {"train/loss": r["loss"], "train/ppl": r["ppl"], "train/lr": r["lr"],
            "train/grad_norm": r["grad_norm"], "train/tokens_per_s": r["tokens_per_s"],
            "train/tokens_seen": r["tokens_seen"]}  # fmt: skip


def test_tensorboard_curves_continue_across_the_resume(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    run_dir, _, first, both = resumed_run
    (tb,) = (run_dir / "logs" / "tensorboard").iterdir()  # one run: the resume found its id
    assert tb.name == run_id(run_dir)
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for step in range(1, STEPS + 1):
        for tag, value in expected(both, step).items():
            points = [e for e in acc.Scalars(tag) if e.step == step]
            assert len(points) == 1, (tag, step)  # once, though steps 5-8 were logged twice
            assert points[0].value == pytest.approx(value, rel=1e-6), (tag, step)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.step for e in acc.Scalars("eval/loss")] == [3, 6, 8]
    for e in acc.Scalars("eval/loss"):
        assert e.value == pytest.approx(both["eval"][e.step], rel=1e-6)
    assert "train/mfu" not in acc.Tags()["scalars"]  # unknown on a CPU: left out, not 0
    config = acc.Tensors("config/text_summary")
    assert [e.step for e in config] == [0, MID]  # the resolved config at each start
    assert b'"report_to"' in config[0].tensor_proto.string_val[0]
    # the resumed run's event file opens with the purge marker at the first step it logs
    newest = max(tb.iterdir(), key=lambda p: p.stat().st_mtime)
    starts = [e.step for e in EventFileLoader(str(newest)).Load()
              if e.HasField("session_log") and e.session_log.status == 1]  # fmt: skip
    assert starts == [MID + 1]
    assert first["train"][STEPS]["loss"] == both["train"][STEPS]["loss"]  # an exact resume


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B .wandb file (LevelDB log format: 7-byte file header, 32 KiB
    blocks of records with a 7-byte crc/length/type header, protobuf `Record`s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, rows, buf = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows


@needs("wandb")
def test_wandb_offline_run_is_resumed_with_its_id(resumed_run):
    run_dir, _, first, both = resumed_run
    runs = sorted(glob.glob(str(run_dir / "logs" / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(run_id(run_dir)) for r in runs)
    for run, recs, steps in ((runs[0], first, range(1, 9)), (runs[1], both, range(5, 9))):
        (file,) = Path(run).glob("run-*.wandb")
        rows = {row["_step"]: row for row in wandb_history(file)}
        assert sorted(rows) == list(steps)
        for step in steps:
            for tag, value in expected(recs, step).items():
                assert rows[step][tag] == pytest.approx(value, rel=1e-9), (tag, step)
        assert {s for s in steps if "eval/loss" in rows[s]} == {3, 6, 8} & set(steps)


@needs("trackio")
def test_trackio_local_run_is_resumed_by_name(resumed_run):
    run_dir, env, first, both = resumed_run
    code = (
        "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
        "print(json.dumps({r: S.get_logs('octo', r) for r in S.get_runs('octo')}))"
    )
    p = subprocess.run([sys.executable, "-c", code], env=child_env(**env), capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    runs = json.loads(p.stdout.splitlines()[-1])
    assert list(runs) == [run_id(run_dir)]  # the resumed run continued it
    logs = runs[run_id(run_dir)]
    train_steps = [r["step"] for r in logs if "train/loss" in r]
    assert train_steps == [*range(1, 9), *range(5, 9)]  # trackio keeps the re-logged steps
    rows = [r for r in logs if "train/loss" in r]
    for recs, part in ((first, rows[:STEPS]), (both, rows[STEPS:])):  # each run's own numbers
        for r in part:
            for tag, value in expected(recs, r["step"]).items():
                assert r[tag] == pytest.approx(value, rel=1e-9), (tag, r["step"])
    evals = [(r["step"], r["eval/loss"]) for r in logs if "eval/loss" in r]
    assert [s for s, _ in evals] == [3, 6, 8, 6, 8]
    for step, loss in evals:
        assert loss == pytest.approx(both["eval"][step], rel=1e-9)
