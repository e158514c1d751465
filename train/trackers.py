"""Experiment trackers: the config key `report_to` sends a run's numbers to TensorBoard, Weights &
Biases and/or trackio, besides the run's own .log and .jsonl (train/metrics.py's RunLogger feeds
them every record it writes, on rank 0 only).

    report_to: "none" (default) | "tensorboard" | "wandb" | "trackio" | a list of them

What each gets: the resolved config once per start (with the model's fields, parameter count and
precision); at every log line train/loss, train/ppl, train/lr, train/grad_norm,
train/tokens_per_s, train/tokens_seen, train/nonfinite_skips and, where known (a GPU),
train/mfu and train/mem_gib; at every evaluation eval/loss and eval/ppl. The x axis is the
optimizer step.

One run, one curve, across resumes: a fresh run picks a run id ("<checkpoint_dir name>-<date>-
<time>-<4 hex>") and keeps it in {checkpoint_dir}/tracker_run.json; a resumed run reads it back
(also from beside resume_from) and continues that run: TensorBoard writes into the same folder,
{log_dir}/tensorboard/<run id>, with purge_step just after the resumed step (so points logged
after the checkpoint by the interrupted run are dropped by TensorBoard's reader and the curve
continues without a fork); W&B resumes the run with that id (resume="allow"; online it drops
re-logged steps it already has, with a warning); trackio resumes the run of that name (and keeps
such re-logged steps twice: it has no purge). After Ctrl-C or SIGTERM the checkpoint is at the
last logged step, so there are none. W&B keeps its files in {log_dir}/wandb; the project is
$WANDB_PROJECT (W&B's variable) or "octo", trackio's $TRACKIO_PROJECT or "octo".

Each library is imported only when named, at the run's start; check_installed() names a missing
one and its pip command before any data or model is built. A tracker that fails (a network, a
full disk, a library bug) is one warning line, and that tracker gets nothing more; training, the
run's log files and the checkpoints go on, as when the log file fails (RunLogger._write).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "trackio")
RUN_FILE = "tracker_run.json"  # in checkpoint_dir: the run id a resumed run continues

# record key -> tracker name, per record type; None values (mfu, memory on CPU) are left out
TRAIN_KEYS = {
    "loss": "train/loss", "ppl": "train/ppl", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s", "tokens_seen": "train/tokens_seen",
    "nonfinite_skips": "train/nonfinite_skips", "mfu": "train/mfu", "mem_gib": "train/mem_gib",
}  # fmt: skip
EVAL_KEYS = {"eval_loss": "eval/loss", "eval_ppl": "eval/ppl"}


def report_to_names(value: Any) -> list[str]:
    """The trackers `report_to` asks for, in order, without "none". ValueError (one line, the
    config key and the fix) for anything else than "none", a tracker name or a list of them."""
    names = [value] if isinstance(value, str) else value
    choices = ", ".join(("none", *TRACKERS))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"config key 'report_to' is {value!r}; use one of {choices} or a list")
    for name in names:
        if name not in ("none", *TRACKERS):
            raise ValueError(f"config key 'report_to' names {name!r}; choose from {choices}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"config key 'report_to' is {value!r}: 'none' cannot go with a tracker")
    return list(dict.fromkeys(n for n in names if n != "none"))


def check_installed(report_to: Any) -> None:
    """ValueError naming the first tracker of report_to whose library is not installed and the
    pip command; finds the library without importing it (an import costs seconds)."""
    for name in report_to_names(report_to):
        if importlib.util.find_spec(name) is None:
            raise ValueError(
                f"config key 'report_to' names {name}, which is not installed: pip install "
                f"{name} (or pip install 'octo-trainer[{name}]'), or leave {name} out"
            )


def metrics_of(event: dict[str, Any]) -> dict[str, float]:
    """A train or eval record's numbers under the trackers' names; {} for other records."""
    keys = {"train": TRAIN_KEYS, "eval": EVAL_KEYS}.get(event.get("type"), {})
    return {name: float(event[k]) for k, name in keys.items() if event.get(k) is not None}


def run_id(config: dict[str, Any], step: int, warn: Callable[[str], None]) -> str:
    """This run's tracker id. Resuming (step > 0): the one in checkpoint_dir's tracker_run.json,
    or beside resume_from (a run resumed into another checkpoint_dir continues the same curves,
    and that folder gets the file for its own resumes); without one (the first run reported
    nowhere), a new id with a warning. A fresh run: a new id. Written to checkpoint_dir."""
    ckpt = Path(config["checkpoint_dir"])
    found = None
    if step > 0:
        places = [ckpt]
        if config.get("resume_from"):
            places += [Path(config["resume_from"]), Path(config["resume_from"]).parent]
        for place in places:
            try:
                found = str(json.loads((place / RUN_FILE).read_text())["run_id"])
                break
            except (OSError, ValueError, KeyError, TypeError):
                continue
        else:
            warn(f"no {RUN_FILE} in {ckpt} to continue the trackers' run from; starting a new one")
        if found is not None and place == ckpt:
            return found
    if found is None:
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", ckpt.resolve().name).strip("-") or "octo"
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        found = f"{name}-{stamp}-{secrets.token_hex(2)}"
    ckpt.mkdir(parents=True, exist_ok=True)
    from octo.files import write_json  # lazy: octo imports torch; train.config imports this module

    write_json(ckpt / RUN_FILE, {"run_id": found}, indent=None)
    return found


# ----- one class per library ----------------------------------------------------------------------


class TensorBoardTracker:
    """torch.utils.tensorboard's SummaryWriter in {log_dir}/tensorboard/<run id>; flushed after
    every record, so a killed run loses no point the console showed."""

    def __init__(self, run: str, config: dict[str, Any], step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: optional extra (tensorboard)

        self.log_dir = Path(config["log_dir"]) / "tensorboard" / run
        # a resumed run (at `step`) logs from step + 1: TensorBoard's reader drops the points the
        # interrupted run logged from there on, so the curve continues without a fork
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step + 1 if step > 0 else None)
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", f"```\n{text}\n```", step)
        self.writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """wandb.init(id=<run id>, resume="allow"); files in {log_dir}/wandb. WANDB_MODE=offline
    writes there only (`wandb sync` uploads later)."""

    def __init__(self, run: str, config: dict[str, Any], step: int) -> None:
        import wandb  # lazy: optional extra

        project = os.environ.get("WANDB_PROJECT", "octo")
        Path(config["log_dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, id=run, name=run, resume="allow", config=config,
                              dir=config["log_dir"])  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """trackio.init(name=<run id>, resume="allow"): trackio's local database ($TRACKIO_DIR, by
    default under the Hugging Face cache), `trackio show` to look."""

    def __init__(self, run: str, config: dict[str, Any], step: int) -> None:
        import trackio  # lazy: optional extra

        project = os.environ.get("TRACKIO_PROJECT", "octo")
        self.trackio = trackio
        self.run = trackio.init(project=project, name=run, config=config, resume="allow",
                                embed=False)  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


class Trackers:
    """The trackers of one run, fed the RunLogger's records: "start" (its config's report_to says
    which; started then, with the run id), "train" and "eval" (their numbers at their step).
    warn: how a failure is shown (one line; the RunLogger's console and .log)."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.active: dict[str, Any] = {}

    def record(self, event: dict[str, Any]) -> None:
        if event.get("type") == "start":
            self._start(event)
        elif self.active and (metrics := metrics_of(event)):
            for name in list(self.active):
                self._call(name, "log", metrics, int(event["step"]))

    def _start(self, event: dict[str, Any]) -> None:
        self.close()
        config = event.get("config") or {}
        names = report_to_names(config.get("report_to", "none"))
        if not names:
            return
        step = int(event.get("step", 0))
        try:
            run = run_id(config, step, self.warn)
        except OSError as e:
            self.warn(f"writing {RUN_FILE} failed ({e.strerror or e}); no tracker reports this run")
            return
        full = {
            **config, "model": event.get("model_config"), "parameters": event.get("parameters"),
            "precision": event.get("precision"),
        }  # fmt: skip
        for name in names:
            try:
                self.active[name] = CLASSES[name](run, full, step)
            except Exception as e:  # any library error: the run goes on without this tracker
                self._failed(name, e)

    def _call(self, name: str, method: str, *args: Any) -> None:
        try:
            getattr(self.active[name], method)(*args)
        except Exception as e:  # a tracker never ends the run
            self.active.pop(name, None)
            self._failed(name, e)

    def _failed(self, name: str, e: Exception) -> None:
        what = " ".join(f"{type(e).__name__}: {e}".split())[:300]  # one line
        self.warn(f"the {name} tracker failed ({what}); it gets nothing more from this run "
                  "(training, the log files and checkpoints go on)")  # fmt: skip

    def close(self) -> None:
        """Finish every tracker (flush, upload); never raises."""
        for name in list(self.active):
            self._call(name, "close")
            self.active.pop(name, None)
