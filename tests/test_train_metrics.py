"""train/metrics.py and the command-line wrappers: the log line, MFU's flop count and GPU table,
the out-of-memory line, and `python train/train.py` / `./train.sh` doing what `python -m train`
does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from octo import OctoConfig, OctoForCausalLM
from train.metrics import flops_per_token, format_log_line, matmul_params, peak_tflops

ROOT = Path(__file__).resolve().parents[1]


def test_log_line_gpu_and_cpu():
    r = {"step": 100, "loss": 8.12344, "ppl": 3378.454, "lr": 3e-4, "grad_norm": 1.0234,
         "tokens_per_s": 412_345.0, "mfu": 0.3814, "mem_gib": 4.21,
         "mem_total_gib": 79.6}  # fmt: skip
    assert format_log_line(r) == (
        "Step 100: loss=8.1234 ppl=3378.45 lr=3.0e-04 grad_norm=1.02 tok/s=412k mfu=38.1% "
        "mem=4.2GB/80GB"
    )
    cpu = {**r, "mfu": None, "mem_gib": None, "tokens_per_s": 1234.0, "eta_s": 3725.0,
           "nonfinite_skips": 2}  # fmt: skip
    assert format_log_line(cpu) == (
        "Step 100: loss=8.1234 ppl=3378.45 lr=3.0e-04 grad_norm=1.02 tok/s=1.2k skipped=2 eta=1h02m"
    )


def test_flops_per_token_is_6n_plus_attention():
    cfg = OctoConfig.preset("seed", vocab_size=16000)
    model = OctoForCausalLM(cfg)
    n = matmul_params(model)  # all but the (untied) input embedding
    assert n == model.num_parameters() - 16000 * 768
    c, kv = 768, 3 * 64  # hidden, key/value width (3 KV heads of 64)
    per_layer = c * c * 2 + c * kv * 2 + 3 * c * 3072 + 2 * c  # q, o; k, v; MLP; two norms
    assert n == 12 * per_layer + c + 16000 * c  # + final norm + lm_head
    assert flops_per_token(n, 12, 512, 768) == 6 * n + 12 * 12 * 512 * 768
    tied = OctoForCausalLM(OctoConfig.preset("tiny", tie_word_embeddings=True))
    assert matmul_params(tied) == tied.num_parameters()  # the shared matrix multiplies (lm_head)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA GeForce GTX 1080", None),
])  # fmt: skip
def test_gpu_peak_table(name, tflops):
    assert peak_tflops(name) == tflops


def test_out_of_memory_is_one_line_naming_the_knobs(monkeypatch, capsys, tmp_path):
    import train.run as run_mod
    from train.config import TrainConfig
    from train.metrics import RunLogger

    class OOMTrainer:
        step = 7
        log = RunLogger(tmp_path, enabled=False)

        def fit(self):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run_mod, "build_trainer", lambda *a: OOMTrainer())
    cfg = TrainConfig(device="cpu", log_dir=str(tmp_path), checkpoint_dir=str(tmp_path))
    assert run_mod.run(cfg, {}) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: CUDA out of memory at step 7")
    for knob in ("batch_size", "gradient_accumulation_steps", "use_gradient_checkpointing",
                 "block_size"):  # fmt: skip
        assert knob in err


@pytest.mark.parametrize("launcher", [["python", "train/train.py"], ["./train.sh"],
                                      ["python", "-m", "train"]])  # fmt: skip
def test_entry_points_agree(launcher, tmp_path):
    """The three spellings parse and validate alike (a config error needs no torch, so fast)."""
    cmd = [sys.executable if launcher[0] == "python" else launcher[0], *launcher[1:]]
    p = subprocess.run([*cmd, "--set", "lerning_rate=1e-3", "batch_size=2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 2
    assert (
        p.stderr.strip()
        == "error: --set: unknown key 'lerning_rate'; did you mean 'learning_rate'?"
    )


def test_module_warnings_reach_the_run_log_once(tmp_path):
    """A warning of a train.* module (a corrupt checkpoint skipped, a changed batch size) is a
    "warning: ..." line on rank 0's console and in its .log file; ranks other than 0 drop it; after
    close() nothing is routed any more."""
    import io
    import logging

    from train.metrics import RunLogger

    console = io.StringIO()
    run_log = RunLogger(tmp_path, stream=console)
    other_rank = RunLogger(tmp_path / "r1", enabled=False)
    logging.getLogger("train.checkpoint").warning("skipping %s: truncated", "checkpoint_step_4")
    logging.getLogger("train.checkpoint").info("not shown")
    run_log.close()
    other_rank.close()
    logging.getLogger("train.checkpoint").warning("after close")
    line = "warning: skipping checkpoint_step_4: truncated\n"
    assert console.getvalue() == line
    assert run_log.log_path.read_text() == line


def test_plot_a_log_dir_draws_its_newest_run(tmp_path):
    """`python -m train.plot logs/demo` after several runs: the newest one, PNG beside it."""
    pytest.importorskip("matplotlib")
    from train.plot import main

    for stamp, loss in (("20261125_100000", 9.0), ("20261125_110000", 3.0)):
        rec = {"type": "train", "step": 1, "loss": loss, "tokens_per_s": 1.0}
        (tmp_path / f"training_{stamp}.jsonl").write_text(json.dumps(rec) + "\n")
    assert main([str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.glob("*.png")] == ["training_20261125_110000.png"]
    assert main([str(tmp_path / "empty")]) == 2


def test_plot_loss_axis_is_log_with_a_point_per_log_line():
    """600 steps logged every 50: the loss axis is logarithmic (on a linear one everything after
    the first fall was a flat line) and each log line is a marked point."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from train.plot import draw

    recs = [{"type": "train", "step": s, "loss": 8.0 / s**0.5, "tokens_per_s": 1e3}
            for s in range(50, 601, 50)]  # fmt: skip
    recs += [{"type": "eval", "step": s, "eval_loss": 8.0 / s**0.5} for s in (200, 400, 600)]
    fig = draw(recs, "run")
    try:
        ax_loss, ax_tps = fig.axes
        assert ax_loss.get_yscale() == "log"
        train_line, eval_line = ax_loss.get_lines()
        assert list(train_line.get_xdata()) == list(range(50, 601, 50))
        assert train_line.get_marker() not in ("None", "", None)
        assert list(eval_line.get_xdata()) == [200, 400, 600]
        assert ax_tps.get_lines()[0].get_marker() not in ("None", "", None)
    finally:
        plt.close(fig)


def test_plot_a_log_dir_skips_newer_runs_without_a_loss(tmp_path, capsys):
    """A resume of a finished run (or a run stopped before its first log line) leaves a newer
    log with no loss: `python -m train.plot logs/demo` draws the newest run that has one, with a
    note (it was an error)."""
    pytest.importorskip("matplotlib")
    from train.plot import main

    rec = {"type": "train", "step": 1, "loss": 3.0, "tokens_per_s": 1.0}
    (tmp_path / "training_20261125_100000.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "training_20261125_110000.jsonl").write_text("")
    assert main([str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.glob("*.png")] == ["training_20261125_100000.png"]
    assert capsys.readouterr().err == (
        "note: training_20261125_110000.jsonl logged no loss yet (a run stopped before its first "
        "log line, or a finished run resumed); plotting training_20261125_100000.jsonl\n"
    )
    assert main([str(tmp_path / "training_20261125_110000.jsonl")]) == 2  # named: no loss


def test_plot_skips_a_partial_last_line_and_odd_records(tmp_path, capsys):
    """A run still writing (or killed mid-write) leaves a last line without its newline: the plot
    draws the rest with a note. JSON that is not an object, or a record without the plotted
    fields, is left out (they were an AttributeError or KeyError traceback)."""
    pytest.importorskip("matplotlib")
    from train.plot import main

    recs = [{"type": "train", "step": s, "loss": 5.0 - s, "tokens_per_s": 9.0} for s in (1, 2)]
    lines = [json.dumps(r) for r in recs] + ["[1, 2]", '{"type": "train", "step": 3}']
    lines += ['{"type": "eval", "step": 2, "eval_loss": 3.5}', '{"type": "train", "st']
    log = tmp_path / "training_1.jsonl"
    log.write_text("\n".join(lines))  # the last line has no newline yet
    assert main([str(log), "--out", str(tmp_path / "p")]) == 0
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'p.png'}\n" and (tmp_path / "p.png").stat().st_size > 0
    assert err == (
        f"note: {log} line 6 is incomplete (the run is still writing it, or was killed); "
        "plotting without it\n"
    )


def test_plot_errors_are_one_line(tmp_path, capsys):
    """A corrupt line before the last is an error naming the file and line; an --out under a
    regular file was a NotADirectoryError traceback."""
    pytest.importorskip("matplotlib")
    from train.plot import main

    rec = json.dumps({"type": "train", "step": 1, "loss": 2.0, "tokens_per_s": 9.0})
    log = tmp_path / "training_1.jsonl"
    log.write_text(f'{rec}\n{{"type": "tr\n{rec}\n')
    assert main([str(log)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {log} line 2 is not JSON (") and err.count("\n") == 1
    log.write_text(rec + "\n")
    (tmp_path / "afile").write_text("")
    assert main([str(log), "--out", str(tmp_path / "afile" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the plot to {tmp_path / 'afile' / 'x.png'}")
    assert err.count("\n") == 1 and not (tmp_path / "training_1.png").exists()
    log.write_text('[1]\n{"type": "train", "step": 1}\n')
    assert main([str(log)]) == 2
    assert "holds no train or eval records with a loss yet" in capsys.readouterr().err
