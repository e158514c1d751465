"""Pre-tokenizing when a worker dies or a stop signal comes, and `python -m train.prepare`'s stop
signals, each in a child process under a hard time limit (tests/test_signals.py's helpers):

    a worker killed       SIGKILL (the out-of-memory killer) to the busy worker or to the idle
                          one: one DataError line, exit 2, no cache folder, no process left
    a stop signal         SIGINT or SIGTERM to the building process while a worker is busy: the
                          workers end at once, exit 130, no cache folder
    train.prepare         a stop signal while torch imports, inside an import, and inside the
                          build: one line, exit 130, nothing half-written left
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.child_env import child_env
from tests.test_signals import CHILD, children, group_is_gone, kill_group, run_bounded

PREPARE_STOPPED = "interrupted; nothing half-written was left (a cache printed above is complete)"


def start_stalled_build(corpus, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """The child building a cache with one worker stalled in its batch, and that worker's pid."""
    pidfile = tmp_path / "busy.pid"
    cmd = [sys.executable, str(CHILD), "stall", str(corpus["data"] / "train.jsonl"),
           str(corpus["tokenizer"]), str(tmp_path), str(pidfile)]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not pidfile.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            kill_group(p.pid)
            pytest.fail(f"no worker stalled (exit {p.poll()}): {p.communicate()[1][-3000:]}")
        time.sleep(0.1)
    return p, int(pidfile.read_text())


def finish(p: subprocess.Popen, within: float, what: str) -> tuple[str, bool]:
    """p's stderr once it exits within `within` seconds (else the test fails: a hang), and
    whether its process group (the pool's workers) is gone soon after."""
    try:
        _, err = p.communicate(timeout=within)
        return err, group_is_gone(p.pid, within=10)
    except subprocess.TimeoutExpired:
        kill_group(p.pid)
        pytest.fail(f"the build hung after {what} (killed after {within} s)")
    finally:
        kill_group(p.pid)


def no_cache_folder(tmp_path: Path) -> bool:
    pretok = tmp_path / "cache" / "pretok"
    return not pretok.exists() or not [d for d in pretok.iterdir() if d.is_dir()]


@pytest.mark.parametrize("victim", ["busy", "idle"])
def test_a_killed_worker_fails_the_build_in_one_line(corpus, tmp_path, victim):
    """multiprocessing.Pool replaced a killed worker but never completed its task, so the build
    waited forever ("busy"); a worker killed while waiting for a task held the task queue's lock,
    so the other workers (and Pool.terminate) waited forever ("idle"; the busy one here sleeps
    past the time limit). Now the death fails the build: one line, exit 2, nothing left."""
    p, busy = start_stalled_build(corpus, tmp_path)
    victims = [busy] if victim == "busy" else [c for c in children(p.pid) if c != busy]
    assert victims, "no idle worker"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    err, gone = finish(p, 60, f"SIGKILL to the {victim} worker")
    assert p.returncode == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: pre-tokenizing dataset "), lines[0]
    assert "a tokenizer process was lost (killed by SIGKILL; most likely the out-of-memory " \
           "killer); pre-tokenize with fewer processes (python -m train.prepare --config " \
           "CONFIG --processes 1) or with more free memory" in lines[0]  # fmt: skip
    assert no_cache_folder(tmp_path)
    assert gone, "a worker outlived the build"


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_pre_tokenizing_ends_the_busy_workers(corpus, tmp_path, name):
    """The building process's stop signal ends the pool at once: a worker busy with its batch
    (here for 10 minutes) is terminated, not waited for."""
    p, _ = start_stalled_build(corpus, tmp_path)
    os.kill(p.pid, signal.Signals[name])
    err, gone = finish(p, 60, name)
    assert p.returncode == 130 and err.strip() == "interrupted", err[-3000:]
    assert no_cache_folder(tmp_path)
    assert gone, "a worker outlived the build"


def prepare_config(corpus, tmp_path: Path) -> Path:
    conf = tmp_path / "c.json"
    fields = {"dataset_name": str(corpus["data"] / "train.jsonl"),
              "tokenizer_name": str(corpus["tokenizer"]), "data_cache_dir": str(tmp_path / "cache"),
              "pretokenize": True, "eval_split": None}  # fmt: skip
    conf.write_text(json.dumps(fields))
    return conf


@pytest.mark.parametrize(
    "module, sig, when",
    [
        ("torch", "SIGTERM", "raise"),  # was: killed silently, exit 143
        ("transformers", "SIGINT", "swallow"),  # was: swallowed, and the cache built, exit 0
        ("datasets", "SIGTERM", "raise"),  # inside the build (its temporary folder exists)
        ("datasets", "SIGINT", "raise"),  # was: a KeyboardInterrupt traceback
    ],
)
def test_prepare_stop_signal_is_one_line_and_130(corpus, tmp_path, module, sig, when):
    conf = prepare_config(corpus, tmp_path)
    cmd = [sys.executable, str(CHILD), "import-prepare", module, sig, when, "--config", str(conf),
           "--processes", "2"]  # fmt: skip
    r = run_bounded(cmd, tmp_path, timeout=300)
    assert r.returncode == 130, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == PREPARE_STOPPED, r.stderr[-3000:]
    if when == "raise":  # a swallowed one is reported by Python itself before the line
        assert len(lines) == 1, r.stderr[-3000:]
    assert no_cache_folder(tmp_path) and not list((tmp_path / "cache").glob("pretok/*.tmp-*"))
