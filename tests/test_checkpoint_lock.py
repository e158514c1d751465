"""A run owns its checkpoint_dir (issue 14, section 2): a second run on the folder, fresh or
resuming, is one line naming the holder (PID, host) and exit 2, and the holder goes on
undisturbed; the lock dies with its holder, kill -9 included, even while workers it forked live
on. (Two runs at once used to delete each other's temporary folders with tracebacks, overwrite
each other's checkpoints, and fail a resume with a wrong message.) Under torchrun:
tests/test_distributed.py."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.child_env import child_env
from tests.run_logs import records
from train.checkpoint import complete_checkpoints
from train.checkpoint.lock import LOCK_NAME, holder, lock_folder

# Holds argv[1]'s lock, forks a child that lives on (as a DataLoader or pool worker does), prints
# the child's PID and waits.
HOLD = """
import os, sys, time
from train.checkpoint.lock import lock_folder
assert lock_folder(sys.argv[1]) is not None
worker = os.fork()
if worker == 0:
    time.sleep(300)
    os._exit(0)
print(worker, flush=True)
time.sleep(300)
"""


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_lock_names_its_holder_and_dies_with_it_not_with_its_workers(tmp_path):
    """The holder's PID and host are named; after kill -9 of the holder the lock is free at
    once, though its forked worker still runs (an flock, shared with forked children, stayed
    held until the last of them exited)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                         text=True, env=child_env())  # fmt: skip
    worker = None
    try:
        ready, _, _ = select.select([p.stdout], [], [], 120)
        assert ready, "the holder did not start"
        worker = int(p.stdout.readline())
        assert lock_folder(tmp_path) is None
        who = holder(tmp_path / LOCK_NAME)
        assert who.startswith(f"PID {p.pid} on host {socket.gethostname()}, since "), who
        p.kill()
        p.wait(timeout=60)
        os.kill(worker, 0)  # the worker lives on
        lock = lock_folder(tmp_path)
        assert lock is not None
        lock.release()
        assert not (tmp_path / LOCK_NAME).exists()  # released: nothing left behind
    finally:
        p.kill()
        if worker is not None:
            _kill(worker)


def test_a_process_cannot_take_its_own_lock_twice(tmp_path):
    """A second try in the holding process is refused without opening the file (closing any
    descriptor of it would drop the process's POSIX lock: another process still sees it held)."""
    check = "import sys; from train.locks import try_lock; print(try_lock(sys.argv[1]) is None)"
    with lock_folder(tmp_path):
        assert lock_folder(tmp_path) is None
        assert holder(tmp_path / LOCK_NAME).startswith(f"PID {os.getpid()} on host ")
        r = subprocess.run([sys.executable, "-c", check, str(tmp_path / LOCK_NAME)],
                           capture_output=True, text=True, env=child_env(), timeout=60)  # fmt: skip
        assert r.stdout.strip() == "True", r.stderr
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_folder_resumed_from_is_held_until_loaded(tmp_path):
    """resume_from in another run's checkpoint_dir: refused while that run holds it (its rotation
    could remove the checkpoint being read), and this run's own lock is let go again; once
    free, it is held until release_source() (after the load), then only checkpoint_dir."""
    from train.checkpoint import CheckpointError
    from train.checkpoint.lock import own_run_folders
    from train.distributed import DistEnv

    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    (theirs / "checkpoint_step_2").mkdir(parents=True)
    source = str(theirs / "checkpoint_step_2")
    with lock_folder(theirs):
        with pytest.raises(CheckpointError) as e:
            own_run_folders(str(mine), source, DistEnv())
        assert str(e.value).startswith(
            f"resume_from {source} is in {theirs}, which another run is writing (PID "
            f"{os.getpid()} on host "
        )
        assert not (mine / LOCK_NAME).exists()  # let go again
    locks = own_run_folders(str(mine), source, DistEnv())
    assert lock_folder(theirs) is None and lock_folder(mine) is None
    locks.release_source()
    with lock_folder(theirs) as lock:
        assert lock is not None
    assert lock_folder(mine) is None
    locks.release()
    assert not any(p.name == LOCK_NAME for d in (mine, theirs) for p in d.iterdir())


def _settings(corpus: dict[str, Path], run_dir: Path) -> list[str]:
    return [
        f"dataset_name={corpus['data']}", f"tokenizer_name={corpus['tokenizer']}",
        f"data_cache_dir={corpus['cache']}", f"checkpoint_dir={run_dir / 'ckpt'}",
        f"log_dir={run_dir / 'logs'}", "device=cpu", "precision=fp32", "compile=off",
        "kernels=torch", "block_size=32", "batch_size=2", "log_interval_steps=1",
        "eval_interval_steps=100000", "save_interval_steps=2", "pretokenize=false",
        "num_workers=2", "sample_max_new_tokens=2",
    ]  # fmt: skip


def _main_here(*args: str) -> int:
    """`python -m train` inside this process (its environment restored after)."""
    from train.__main__ import main

    saved = dict(os.environ)
    try:
        return main(["--model-config", "tiny", "--set", *args])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _steps(run_dir: Path) -> int:
    """The newest train step in run_dir's log so far (0 while a line is half written)."""
    try:
        return max(records(run_dir)["train"], default=0)
    except ValueError:
        return 0


def _wait(what, deadline: float, p: subprocess.Popen, out: Path):
    while not what():
        assert p.poll() is None and time.time() < deadline, out.read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.slow  # a training process, then a resumed one: ~60 s on the shared 2-core CPU
def test_second_run_is_refused_and_the_lock_dies_with_a_killed_run(corpus, tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    ckpt, out = run / "ckpt", tmp_path / "holder.out"
    cmd = [sys.executable, "-m", "train", "--model-config", "tiny", "--set",
           *_settings(corpus, run), "max_steps=100000"]  # fmt: skip
    with open(out, "w") as f:
        p = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(drop=("OCTO_CRASH_AT",)),
                             stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.time() + 300
        _wait(lambda: complete_checkpoints(ckpt), deadline, p, out)
        line = (f"error: checkpoint_dir {ckpt} is in use by another run (PID {p.pid} on host "
                f"{socket.gethostname()}, since ")  # fmt: skip
        fix = "); wait for that run to end or stop it, or set checkpoint_dir to another folder\n"
        mine = [f"checkpoint_dir={ckpt}", f"log_dir={other / 'logs'}"]
        for extra in ([], [f"resume_from={ckpt}"]):  # a fresh run, a resume
            assert _main_here(*_settings(corpus, other), *mine, *extra) == 2
            err = capsys.readouterr().err
            assert err.startswith(line) and err.endswith(fix) and err.count("\n") == 1, err
        assert not any((other / "logs").iterdir())  # refused before any log was opened
        seen = _steps(run)
        _wait(lambda: _steps(run) > seen + 2, deadline, p, out)  # it trains on
        # what the run printed while it ran: no traceback. (After the kill -9 below, an orphaned
        # DataLoader worker may print one of its own: its fd-sharing thread's connection to the
        # dead parent is reset; that is the kill's doing, not the run's, and its timing is a race.)
        assert "Traceback" not in out.read_text()
        p.kill()  # kill -9: its DataLoader workers may outlive it for a moment
        p.wait(timeout=60)
        assert (ckpt / LOCK_NAME).exists()  # left by the kill, unlocked: taken over below
        newest = complete_checkpoints(ckpt)[-1][0]
        # its own process: DataLoader workers forked from this (threaded) test process can hang
        r = subprocess.run(cmd[:-1] + [f"resume_from={ckpt}", f"max_steps={newest + 1}"],
                           cwd=tmp_path, env=child_env(drop=("OCTO_CRASH_AT",)),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert f"Resumed from {ckpt / f'checkpoint_step_{newest}'}" in r.stdout
        assert not (ckpt / LOCK_NAME).exists()
    finally:
        p.kill()
        p.wait(timeout=60)
