"""train/run.py's early failures: folders that cannot be written (one line naming the config key,
exit 2, before the tokenizer or any data is read), a failed data-cache build (one DataError line,
no temporary folder left), a missing eval split reported before the train split is
pre-tokenized; and the command the resume line prints. In-process through `python -m train`'s
main(); every run fails in its first seconds."""

from __future__ import annotations

import errno
import json
import math
import resource
import shutil
import signal
from pathlib import Path

import pytest

from train.__main__ import main
from train.config import TrainConfig
from train.data import DataError
from train.data.cache import COMPLETE, build_once
from train.run import check_writable_folders


def run_main(tmp_path: Path, capsys, **keys) -> tuple[int, str]:
    """main() on a tiny config whose dataset and tokenizer do not exist (a check that ran late
    would fail on those instead); (exit code, stderr)."""
    cfg = {"dataset_name": str(tmp_path / "missing.txt"), "tokenizer_name": str(tmp_path / "no"),
           "log_dir": str(tmp_path / "logs"), "checkpoint_dir": str(tmp_path / "ckpt"),
           "data_cache_dir": str(tmp_path / "cache"), "block_size": 64, **keys}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    rc = main(["--config", str(tmp_path / "c.json"), "--model-config", "tiny"])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("key", ["checkpoint_dir", "log_dir", "data_cache_dir"])
@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_folder_is_one_line_before_any_data(tmp_path, capsys, key, where):
    (tmp_path / "afile").write_text("not a folder\n")
    path = tmp_path / "afile" / "sub" if where == "under_a_file" else tmp_path / "afile"
    rc, err = run_main(tmp_path, capsys, pretokenize=True, **{key: str(path)})
    reason = "Not a directory" if where == "under_a_file" else "a file of that name exists"
    assert rc == 2 and "\n" not in err, err
    assert err.startswith(f"error: config key {key!r} is {str(path)!r}, which cannot be written")
    assert f"({reason}); set {key} to a folder you can write to" in err, err


def test_data_cache_dir_is_checked_only_when_used(tmp_path, capsys):
    """Streaming from a local file with a local tokenizer writes nothing under data_cache_dir:
    an unwritable one is no error then (the run fails later, on the missing tokenizer)."""
    (tmp_path / "afile").write_text("not a folder\n")
    rc, err = run_main(tmp_path, capsys, pretokenize=False, data_cache_dir=str(tmp_path / "afile"))
    assert rc == 2 and err.startswith("error: tokenizer folder"), err


def test_cudagraphs_under_torchrun_is_one_line_before_any_data(tmp_path, capsys, monkeypatch):
    """compile=cudagraphs with several processes: refused right after the process group is
    joined (the dataset and tokenizer here do not exist, so a late check would fail on them)."""
    import train.run
    from train.distributed import DistEnv

    monkeypatch.setattr(train.run, "init_distributed", lambda device: DistEnv(world_size=2))
    rc, err = run_main(tmp_path, capsys, compile="cudagraphs")
    assert rc == 2 and "\n" not in err, err
    assert "compile 'cudagraphs' runs in one process only; use compile on under torchrun" in err


def test_cudagraphs_without_cuda_is_one_line_before_any_data(tmp_path, capsys):
    """compile=cudagraphs on a CPU: there is nothing to capture, and it compiled for minutes
    before training on; now one line at start (a Trainer built with graph_stand_in=True, for
    tests only, still takes it, so the loop's bookkeeping is tested on CPU: test_train_step)."""
    rc, err = run_main(tmp_path, capsys, compile="cudagraphs", device="cpu")
    assert rc == 2 and err == (
        "error: compile 'cudagraphs' captures CUDA graphs and needs a CUDA device, but the device "
        "is cpu; use compile on or off here"
    ), err


def test_a_device_string_torch_cannot_parse_is_named(tmp_path, capsys):
    """device=cuda:abc said "CUDA is not available" (on a machine with or without it)."""
    rc, err = run_main(tmp_path, capsys, device="cuda:abc")
    assert rc == 2 and err == (
        "error: config key 'device' is 'cuda:abc', which is not a device; use auto, cpu, cuda or "
        "cuda:N (N a GPU number)"
    ), err


def test_check_writable_folders_creates_them_and_leaves_no_file(tmp_path):
    cfg = TrainConfig(checkpoint_dir=str(tmp_path / "a" / "ckpt"), log_dir=str(tmp_path / "logs"),
                      data_cache_dir=str(tmp_path / "cache"), pretokenize=True)  # fmt: skip
    check_writable_folders(cfg)
    for name in ("a/ckpt", "logs", "cache"):
        assert (tmp_path / name).is_dir() and not any((tmp_path / name).iterdir()), name


def test_cache_build_write_error_is_one_data_error_line(tmp_path):
    """A real failed write (RLIMIT_FSIZE: EFBIG; a full disk cannot be made on a test machine)
    while a cache folder is built: DataError with the system's reason and the fix; the
    temporary folder is removed and nothing is marked complete."""

    def build(tmp: Path) -> None:
        (tmp / "shard.bin").write_bytes(bytes(1 << 16))

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 12, hard))
    try:
        with pytest.raises(DataError) as e:
            build_once(tmp_path / "part", build)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    msg = str(e.value)
    assert "\n" not in msg and "File too large" in msg and "ulimit -f" in msg, msg
    assert msg.startswith(f"building {tmp_path / 'part'} failed"), msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .tmp-*, no part, no part.lock


def test_cache_build_full_disk_names_the_fix(tmp_path):
    """The errno -> fix mapping for ENOSPC (raised by the builder, as a write would)."""

    def build(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "shard.bin"))

    with pytest.raises(DataError, match="free disk space or set data_cache_dir to a larger disk"):
        build_once(tmp_path / "part", build)
    assert not (tmp_path / "part").exists() and not list(tmp_path.glob("part.tmp-*"))
    built = build_once(tmp_path / "part", lambda tmp: (tmp / "x").write_text("x"))  # still works
    assert (built / COMPLETE).is_file()


def test_missing_eval_split_is_reported_before_train_is_pretokenized(tmp_path, capsys, corpus):
    rc, err = run_main(tmp_path, capsys, dataset_name=str(corpus["data"] / "train.jsonl"),
                       tokenizer_name=str(corpus["tokenizer"]), eval_split="validation",
                       pretokenize=True)  # fmt: skip
    assert rc == 2 and "\n" not in err, err
    assert "has no split 'validation' (it has: train); set eval_split" in err, err
    # build_once's folder and lock file of the train split: {name}-{split}-{key}
    assert not list((tmp_path / "cache").rglob("*-train-*")), "the train split was built first"


def test_resume_command_quotes_paths_and_names_the_launcher(monkeypatch):
    """It starts in the run's directory (the checkpoint path and the saved config's paths may be
    relative to it); the run from another directory: test_resume_leftovers."""
    from train.distributed import DistEnv
    from train.run import resume_command

    ckpt = Path("my runs/checkpoint_step_3")
    assert resume_command(ckpt, DistEnv(), cwd="/home/me/my project") == (
        "cd '/home/me/my project' && python -m train --config 'my runs/checkpoint_step_3/"
        "train_config.json' --set 'resume_from=my runs/checkpoint_step_3'"
    )
    monkeypatch.chdir("/")
    assert resume_command(ckpt, DistEnv()).startswith("cd / && python -m train --config 'my runs/")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    two = resume_command(ckpt, DistEnv(rank=0, world_size=2, group=True), cwd="/w")
    assert two.startswith("cd /w && torchrun --nproc_per_node=2 -m train --config 'my runs/"), two
    four = resume_command(ckpt, DistEnv(rank=0, world_size=4, group=True), cwd="/w")  # 2 nodes
    assert four.startswith("cd /w && torchrun (with this run's node options) -m train --config")


def test_existing_data_cache_dir_is_not_probed(tmp_path, monkeypatch):
    """A folder of complete caches may be read-only: the preflight writes only into folders it
    must create (a cache still to be built reports its own failed write: build_once)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    real = Path.write_bytes

    def read_only(self, data):
        if cache in self.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    cfg = TrainConfig(checkpoint_dir=str(tmp_path / "ckpt"), log_dir=str(tmp_path / "logs"),
                      data_cache_dir=str(cache), pretokenize=True)  # fmt: skip
    check_writable_folders(cfg)
    (tmp_path / "new").write_text("")
    with pytest.raises(Exception, match="data_cache_dir"):
        check_writable_folders(TrainConfig(data_cache_dir=str(tmp_path / "new"), pretokenize=True,
                                           checkpoint_dir=str(tmp_path / "ckpt"),
                                           log_dir=str(tmp_path / "logs")))  # fmt: skip


def test_resume_warnings_are_lines_of_the_run_log(corpus, tmp_path, capsys):
    """A streamed resume with another batch_size: one warning line in the resumed run's .log
    saying what changed and what the data does about it (the data stream used to warn too: two
    lines for one change); and the saved config names the data mode the run used (pretokenize
    null resolved to false: max_steps was set)."""
    common = ["--model-config", "tiny", "--set", f"dataset_name={corpus['data']}",
              f"tokenizer_name={corpus['tokenizer']}", f"data_cache_dir={corpus['cache']}",
              f"checkpoint_dir={tmp_path / 'ckpt'}", "device=cpu", "block_size=32",
              "batch_size=4", "max_steps=4", "save_interval_steps=2", "eval_interval_steps=100",
              "num_workers=0", "sample_max_new_tokens=2"]  # fmt: skip
    assert main([*common, f"log_dir={tmp_path / 'first'}", "max_steps=2"]) == 0
    ckpt = tmp_path / "ckpt" / "checkpoint_step_2"
    assert json.loads((ckpt / "train_config.json").read_text())["pretokenize"] is False
    assert main([*common, f"log_dir={tmp_path / 'second'}", "batch_size=2",
                 f"resume_from={ckpt}"]) == 0  # fmt: skip
    log = next((tmp_path / "second").glob("training_*.log")).read_text()
    warned = [line for line in log.splitlines() if line.startswith("warning:")]
    assert [line for line in warned if "batch_size" in line] == [
        "warning: resuming with batch_size=2, but the checkpoint was trained with 4 (each data "
        "stream restarts its current shuffle window, so up to 10000 blocks per stream are seen "
        "again); continuing"
    ], log
    capsys.readouterr()


@pytest.mark.parametrize("held", ["checkpoints_and_final", "final_only"])
def test_fresh_run_refuses_a_checkpoint_dir_holding_a_run(tmp_path, capsys, held):
    """A run that does not resume, into a folder with another run's complete checkpoints or final
    model: one line naming the folder, the newest one and the fixes, before any data is read (it
    used to replace that run's final model and same-step checkpoints, and leave its newer ones
    for a later resume_from=<folder> to pick). Unfinished saves (.tmp) are no run."""
    from octo.integrity import MARKER_NAME as MARKER

    ckpt = tmp_path / "ckpt"
    (ckpt / "final").mkdir(parents=True)
    (ckpt / "checkpoint_step_30.tmp").mkdir()
    if held == "checkpoints_and_final":
        for step in (10, 20):
            (ckpt / f"checkpoint_step_{step}").mkdir()
            (ckpt / f"checkpoint_step_{step}" / MARKER).write_text("{}")
    rc, err = run_main(tmp_path, capsys)
    assert rc == 2 and "\n" not in err, err
    if held == "checkpoints_and_final":
        assert err == (
            f"error: checkpoint_dir {ckpt} already holds a run's checkpoints (newest: "
            "checkpoint_step_20 and final) and this run starts from scratch; continue that run "
            f"with --set resume_from={ckpt}, or start over with another or an empty checkpoint_dir"
        )
    else:
        assert err == (
            f"error: checkpoint_dir {ckpt} already holds a run's checkpoints (newest: final) and "
            "this run starts from scratch; start over with another or an empty checkpoint_dir"
        )
    shutil.rmtree(ckpt / "final")
    shutil.rmtree(ckpt / "checkpoint_step_10", ignore_errors=True)
    shutil.rmtree(ckpt / "checkpoint_step_20", ignore_errors=True)
    rc, err = run_main(tmp_path, capsys)  # only an unfinished save left: the run goes on
    assert rc == 2 and err.startswith("error: tokenizer folder"), err


def test_perplexity_of_a_diverged_loss_is_short():
    """exp(loss) of a blown-up loss was printed as a 300-digit number."""
    from train.metrics import format_eval_line, format_log_line, perplexity

    r = {"step": 7, "loss": 50.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0}
    assert " ppl=5.18e+21 " in format_log_line({**r, "ppl": perplexity(50.0)})
    assert " ppl=inf " in format_log_line({**r, "loss": 800.0, "ppl": perplexity(800.0)})
    assert " ppl=nan " in format_log_line({**r, "loss": math.nan, "ppl": perplexity(math.nan)})
    assert " ppl=8.14 " in format_log_line({**r, "loss": 2.0973, "ppl": perplexity(2.0973)})
    assert format_eval_line({"step": 7, "eval_loss": 1e4, "eval_ppl": perplexity(1e4)}) == (
        "Eval at step 7: loss=10000.0000 ppl=inf"
    )


def test_run_log_close_that_fails_is_a_warning(tmp_path, capsys):
    """close() flushes; a full disk then was a second traceback while the run ended."""
    import io

    from train.metrics import RunLogger

    log = RunLogger(tmp_path, stream=io.StringIO())
    real = log._log

    class FullOnClose:
        name = real.name

        def write(self, text):
            return real.write(text)

        def close(self):
            real.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    log._log = FullOnClose()
    log.info("a line")
    log.close()
    log.close()  # twice is fine
    assert capsys.readouterr().err == (
        f"warning: writing the run log {log.log_path} failed (No space left on device); the "
        "run's .log and .jsonl are not written from here on (training, the console output and "
        "checkpoints go on): free space or set log_dir to another disk\n"
    )
