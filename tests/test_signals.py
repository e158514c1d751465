"""Stop signals where they used to go wrong (train/signals.py), each in child processes under a
hard time limit (a hung child and everything in its process group is killed, and the test fails):

    pre-tokenizing        30 cache builds on a 2-process pool with run()'s handlers in place:
                          none hangs, no worker prints a traceback, no worker outlives its build
    start-up              SIGTERM while torch imports, SIGINT while run() imports its modules,
                          and a SIGINT or SIGTERM that an import swallows: one line, exit 130
    the process group     SIGTERM or SIGINT to the whole group (timeout, SLURM, systemd, a
                          terminal) while training on streamed data with 2 DataLoader workers:
                          the step finishes, a checkpoint is saved, exit 0, no process is left
    torchrun              SIGTERM to torchrun (forwarded to each rank's group) or to the ranks:
                          both ranks save one checkpoint, no rank prints a traceback
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
from train.checkpoint import complete_checkpoints

CHILD = Path(__file__).resolve().with_name("signal_child.py")
BEFORE_TRAINING = "interrupted before training started; nothing was saved"


def run_bounded(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """cmd in a new session, ended with its whole process group if it outlives `timeout`
    (a test failure: a hang, not a slow machine, at these sizes)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p.pid)
        out, err = p.communicate()
        pytest.fail(f"{cmd[1:4]} hung (killed after {timeout} s); stderr:\n{err[-3000:]}")
    finally:
        kill_group(p.pid)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_is_gone(pgid: int, within: float) -> bool:
    """True once no process of group pgid is left (polled for up to `within` seconds)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# ----- the mechanisms, in this process ----------------------------------------------------------


def test_stop_signal_raises_and_is_recorded_until_the_outermost_exit():
    """A stop signal whose KeyboardInterrupt something swallowed is raised again by
    raise_if_interrupted(), in nested uses too; the outermost exit clears the record and every
    exit restores the handlers it replaced."""
    from train.signals import raise_if_interrupted, stop_signals_interrupt

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with stop_signals_interrupt():
        with stop_signals_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs between these bytecodes
                    pass
            except KeyboardInterrupt:
                pass  # swallowed, as an import's weakref callback would
            else:
                pytest.fail("SIGTERM raised no KeyboardInterrupt")
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()  # the inner exit keeps the record
    raise_if_interrupted()  # the outermost exit cleared it
    assert {sig: signal.getsignal(sig) for sig in before} == before


def _worker(ready) -> None:
    from train.signals import init_worker_signals

    init_worker_signals()
    ready.set()
    time.sleep(60)  # a SIGTERM from the parent ends it before


def test_worker_ignores_stop_signals_from_others_and_ends_on_its_parents_sigterm():
    """A worker forked inside forking_workers() that ran init_worker_signals(): SIGINT and a
    SIGTERM from another process (what a signal to the process group is) leave it running; its
    parent's SIGTERM (Pool.terminate, the DataLoader's shutdown) ends it at once, status 0."""
    import multiprocessing

    from train.signals import forking_workers

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with forking_workers():
        p = ctx.Process(target=_worker, args=(ready,), daemon=True)
        p.start()
    try:
        assert ready.wait(30), "the worker did not start"
        for sig in (signal.SIGINT, signal.SIGTERM):
            subprocess.run([sys.executable, "-c", f"import os; os.kill({p.pid}, {int(sig)})"],
                           check=True, timeout=60)  # fmt: skip
        p.join(1.0)
        assert p.is_alive(), f"a stop signal from another process ended it ({p.exitcode})"
        t0 = time.monotonic()
        p.terminate()  # SIGTERM from its parent
        p.join(30)
        assert p.exitcode == 0, p.exitcode
        assert time.monotonic() - t0 < 5
    finally:
        p.kill()
        p.join(10)


# ----- pre-tokenizing ---------------------------------------------------------------------------


def test_pretokenizing_never_hangs_nor_prints_worker_tracebacks(corpus, tmp_path):
    """The pool's workers were forked with the trainer's SIGTERM -> KeyboardInterrupt handler:
    Pool.terminate()'s SIGTERM made them print `Process ForkPoolWorker-N: Traceback ...
    KeyboardInterrupt` (about 1 build in 3 here), and one that landed just before a worker's
    blocking wait was never acted on, so terminate() waited forever (1 in about 20 builds).
    Now a finished pool is closed and joined, and the workers take no handler from the trainer.
    """
    cmd = [sys.executable, str(CHILD), "pretok", "30", str(corpus["data"] / "train.jsonl"),
           str(corpus["tokenizer"]), str(tmp_path)]  # fmt: skip
    r = run_bounded(cmd, tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr[-3000:]
    assert len(list((tmp_path / "cache0" / "pretok").glob("*/meta.json"))) == 1


# ----- start-up ---------------------------------------------------------------------------------


def small_run(corpus, tmp_path: Path, *extra: str) -> list[str]:
    """python -m train arguments: a tiny model on the test corpus, streamed, 2 steps."""
    return ["--model-config", "tiny", "--set",
            f"dataset_name={corpus['data'] / 'train.jsonl'}",
            f"tokenizer_name={corpus['tokenizer']}",
            f"checkpoint_dir={tmp_path / 'ckpt'}", f"log_dir={tmp_path / 'logs'}",
            f"data_cache_dir={tmp_path / 'cache'}", "device=cpu", "precision=fp32", "compile=off",
            "kernels=torch", "block_size=32", "batch_size=2", "gradient_accumulation_steps=1",
            "max_steps=2", "warmup_steps=1", "log_interval_steps=1", "eval_split=null",
            "pretokenize=false", "num_workers=0", "sample_max_new_tokens=2", *extra]  # fmt: skip


@pytest.mark.parametrize(
    "module, sig, when",
    [
        # python -m train's handlers came after torch's import: SIGTERM killed the process (143)
        ("torch", "SIGTERM", "raise"),
        # run() imported these before its try: the KeyboardInterrupt escaped (traceback, -2)
        ("train.checkpoint", "SIGINT", "raise"),
        # swallowed as "Exception ignored in ...": the run went on, trained and exited 0
        ("transformers", "SIGINT", "swallow"),
        ("transformers", "SIGTERM", "swallow"),
    ],
)
def test_signal_during_start_up_is_one_line_and_130(corpus, tmp_path, module, sig, when):
    cmd = [sys.executable, str(CHILD), "import", module, sig, when, *small_run(corpus, tmp_path)]
    r = run_bounded(cmd, tmp_path, timeout=300)
    assert r.returncode == 130, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == BEFORE_TRAINING, r.stderr[-3000:]
    if when == "raise":  # a swallowed one is reported by Python itself before the line
        assert len(lines) == 1, r.stderr[-3000:]
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


# ----- the whole process group ------------------------------------------------------------------


def wait_for_line(path: Path, prefix: str, p: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            pytest.fail(f"the run ended (exit {p.returncode}) before printing {prefix!r}")
        if path.exists() and any(ln.startswith(prefix) for ln in path.read_text().splitlines()):
            return
        time.sleep(0.2)
    pytest.fail(f"no line starting with {prefix!r} within {timeout} s")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_signal_to_the_process_group_while_streaming_saves(corpus, tmp_path, name):
    """`setsid python -m train ... & kill -TERM -- -PID` on streamed data with 2 DataLoader
    workers: the workers died of the SIGTERM, the main process then raised "DataLoader worker
    (pid N) is killed by signal: Terminated" inside its checkpoint save (exit 1, nothing saved).
    Now the workers leave the stop to the main process: it finishes the step and saves."""
    sig = signal.Signals[name]
    args = small_run(corpus, tmp_path, "max_steps=100000", "num_workers=2", "buffer_size=64",
                     "save_interval_steps=100000", "eval_interval_steps=100000")  # fmt: skip
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=tmp_path,
                             env=child_env(), stdout=o, stderr=e,
                             start_new_session=True)  # fmt: skip
    try:
        wait_for_line(out, "Step 3:", p, timeout=300)
        os.killpg(p.pid, sig)
        p.wait(timeout=120)
        gone = group_is_gone(p.pid, within=20)  # the workers too
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit within 120 s of {sig.name}; stderr:\n{err.read_text()[-3000:]}")
    finally:
        kill_group(p.pid)
    stdout, stderr = out.read_text(), err.read_text()
    assert p.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    stopped = [ln for ln in stdout.splitlines() if ln.startswith(f"Stopped by {sig.name} at step")]
    assert stopped, stdout[-3000:]
    saved = complete_checkpoints(tmp_path / "ckpt")
    assert len(saved) == 1, saved
    step, ckpt = saved[0]
    assert stopped[0].startswith(f"Stopped by {sig.name} at step {step}; checkpoint saved to ")
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step >= 3
    assert gone, "a process of the run's group outlived it"


# ----- torchrun ---------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


@pytest.mark.parametrize("target", ["torchrun", "ranks"])
def test_sigterm_under_torchrun_saves_on_every_rank(corpus, tmp_path, target):
    """Streamed data, 2 ranks, 2 DataLoader workers each. SIGTERM to torchrun: it forwards the
    signal to each rank's process group, workers included (which used to kill them and the
    ranks' save); both ranks stop at one step and save one checkpoint, and torchrun then reports
    its own signal as an error (SignalException, exit 1: torch's launcher, which Octo cannot
    change; the README says so). SIGTERM to the ranks (`pkill -TERM -P <torchrun's pid>`, the
    README's way to stop a torchrun job): the same checkpoint, and torchrun exits 0."""
    args = small_run(corpus, tmp_path, "max_steps=100000", "num_workers=2", "buffer_size=64",
                     "save_interval_steps=100000", "eval_interval_steps=100000")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train", *args]  # fmt: skip
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    env = child_env(drop=("OCTO_CRASH_AT", "WORLD_SIZE"), OMP_NUM_THREADS="1")
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=o, stderr=e,
                             start_new_session=True)  # fmt: skip
    ranks: list[int] = []
    try:
        wait_for_line(out, "Step 3:", p, timeout=400)
        ranks = children(p.pid)  # each in its own session, with its DataLoader workers
        assert len(ranks) == 2, ranks
        for pid in [p.pid] if target == "torchrun" else ranks:
            os.kill(pid, signal.SIGTERM)
        p.wait(timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not exit within 150 s; stderr:\n{err.read_text()[-3000:]}")
    finally:
        for pgid in [p.pid, *ranks]:
            kill_group(pgid)
    stdout, stderr = out.read_text(), err.read_text()
    if target == "ranks":
        assert p.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    else:  # torchrun's own report of its signal, and nothing from the ranks
        assert p.returncode == 1 and stderr.count("Traceback") == 1, stderr[-3000:]
        assert "SignalException: Process" in stderr, stderr[-3000:]
    saved = complete_checkpoints(tmp_path / "ckpt")
    assert len(saved) == 1, saved
    step, _ = saved[0]
    assert f"Stopped by SIGTERM at step {step}; checkpoint saved to " in stdout, stdout[-3000:]
