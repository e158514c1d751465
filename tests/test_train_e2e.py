"""`python -m train` end to end on CPU: the demo config, shortened (loss falls, the log line, JSON
metrics, the plot, the final folder in Octo and transformers), and SIGTERM (checkpoint, exit 0, the
resume line, and the resumed run continuing)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from octo import OctoForCausalLM
from tests.child_env import child_env
from train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "train" / "configs" / "demo.json"
LINE = re.compile(
    r"^Step (\d+): loss=(\d+\.\d{4}) ppl=(\d+\.\d{2}) lr=(\d\.\de[-+]\d\d) grad_norm=(\d+\.\d{2}) "
    r"tok/s=\d+(\.\d+)?[kM]?( skipped=\d+)? eta=\d+[hm]\d\d[ms]$"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The demo corpus and tokenizer, built once for this module (data_cache_dir)."""
    return tmp_path_factory.mktemp("data_cache")


def command(tmp: Path, cache: Path, *overrides: str) -> list[str]:
    """The demo config (or, until it exists, the same kind of run spelled out), shortened."""
    cmd = [sys.executable, "-m", "train"]
    if DEMO.is_file():
        cmd += ["--config", str(DEMO)]
    else:
        cmd += ["--model-config", "tiny", "--set", "dataset_name=octo-demo",
                "tokenizer_name=octo-demo", "block_size=64", "batch_size=8",
                "gradient_accumulation_steps=1", "learning_rate=3e-3",
                "warmup_steps=5"]  # fmt: skip
    return cmd + [
        "--set", f"data_cache_dir={cache}", f"log_dir={tmp / 'logs'}",
        f"checkpoint_dir={tmp / 'ckpt'}", "num_workers=0", "eval_max_batches=4",
        "sample_max_new_tokens=16", *overrides,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("demo_run")
    cmd = command(tmp, cache, "max_steps=40", "warmup_steps=10", "log_interval_steps=10",
                  "eval_interval_steps=20", "save_interval_steps=1000")  # fmt: skip
    p = subprocess.run(cmd, cwd=tmp, env=child_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (log,) = (tmp / "logs").glob("training_*[0-9].log")
    records = [json.loads(line) for line in log.with_suffix(".jsonl").read_text().splitlines()]
    return tmp, p.stdout, log, records


def test_loss_falls_and_evals_run(demo_run):
    _, _, _, records = demo_run
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert [r["step"] for r in evals] == [20, 40]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # nats: the model learns
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert records[0]["type"] == "start" and records[-1]["type"] == "end"
    assert records[-1]["status"] == "completed" and records[-1]["step"] == 40


def test_log_lines_and_json_agree(demo_run):
    tmp, stdout, log, records = demo_run
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("Step ")]
    train = [r for r in records if r["type"] == "train"]
    assert len(lines) == len(train) == 4
    for line, r in zip(lines, train):
        m = LINE.match(line)
        assert m, line  # no mfu= or mem= on CPU
        assert int(m[1]) == r["step"] and m[2] == f"{r['loss']:.4f}" and m[3] == f"{r['ppl']:.2f}"
        assert m[4] == f"{r['lr']:.1e}" and m[5] == f"{r['grad_norm']:.2f}"
    for key in ("parameters", "Tokens per step", "Planned steps: 40 (max_steps)",
                "precision: fp32", "Kernels: ", "Checkpoints: "):  # fmt: skip
        assert key in text, key
    for line in text.splitlines():  # the console shows the same lines, plain (not a terminal)
        assert line in stdout
    assert "\r" not in stdout


def test_resolved_config_written(demo_run):
    tmp, _, log, _ = demo_run
    cfg = TrainConfig.load(log.with_name(log.stem + "_config.json"))
    assert cfg.max_steps == 40 and cfg.checkpoint_dir == str(tmp / "ckpt")
    assert TrainConfig.load(tmp / "ckpt" / "checkpoint_step_40" / "train_config.json") == cfg
    assert json.loads(log.with_name(log.stem + "_model.json").read_text())["vocab_size"] > 0


def test_plot_written(demo_run):
    _, _, log, _ = demo_run
    p = subprocess.run([sys.executable, "-m", "train.plot", str(log)], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    png = log.with_suffix(".png")
    assert p.stdout.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_final_folder_loads_in_octo_and_transformers(demo_run):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tmp, stdout, _, _ = demo_run
    final = tmp / "ckpt" / "final"
    assert f"Samples from {Path('ckpt') / 'final'}" in stdout or f"Samples from {final}" in stdout
    assert "[1] Once upon a time" in stdout and "[3] Once upon a time" in stdout  # a few stories
    model = OctoForCausalLM.from_pretrained(final).eval()
    last = OctoForCausalLM.from_pretrained(tmp / "ckpt" / "checkpoint_step_40")
    for (k, v), w in zip(model.state_dict().items(), last.state_dict().values()):
        assert torch.equal(v, w), k
    tok = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tok.encode("Once upon a time, Lily had a red ball.")])
    hf = LlamaForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_model_card_beside_the_final_model(demo_run):
    """final/README.md says what the run's log says: parameters, tokens and steps, the last log
    line's and the last evaluation's loss; with the plot, the loading lines and the config."""
    tmp, _, _, records = demo_run
    final = tmp / "ckpt" / "final"
    card = (final / "README.md").read_text()
    model = OctoForCausalLM.from_pretrained(final)
    train = [r for r in records if r["type"] == "train"][-1]
    ev = [r for r in records if r["type"] == "eval"][-1]
    end = records[-1]
    assert train["step"] == ev["step"] == end["step"] == 40
    n = model.num_parameters()
    assert f"| parameters | {n:,} ({n / 1e6:.2f}M) |" in card
    assert f"| vocabulary | {model.config.vocab_size:,} ids; tokenizer: " in card
    assert f"| trained | {end['tokens_seen']:,} tokens in 40 optimizer steps (" in card
    assert (f"| final train loss | {train['loss']:.4f} (perplexity {train['ppl']:.2f}), mean of "
            "steps 31-40 |") in card  # fmt: skip
    assert (f"| final eval loss | {ev['eval_loss']:.4f} (perplexity {ev['eval_ppl']:.2f}) at step "
            "40, on up to 4 batches |") in card  # fmt: skip
    assert "| data | `octo-demo` (split 'train', eval split 'validation', column 'text') |" in card
    assert re.search(r"^\| hardware \| CPU: .+ \(\d+ threads\) \|$", card, re.M), card
    wall = r"^\| wall time \| \d+m\d\ds \(start of training to final save\) \|$"
    assert re.search(wall, card, re.M), card
    assert "![train and eval loss, and throughput, by step](loss.png)" in card
    assert (final / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for use in (
        "OctoForCausalLM.from_pretrained(",
        "LlamaForCausalLM.from_pretrained(",
        f"python -m octo.export_gguf {final} model.gguf",
        "llama-completion -m model.gguf -no-cnv",
    ):
        assert use in card, use
    config = card.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(config) == json.loads((final / "train_config.json").read_text())
    assert f"python -m train --config {final}/train_config.json --set resume_from=null" in card


def stop_after(cmd: list[str], cwd: Path, step_line: str) -> tuple[str, str, int]:
    """Run cmd until it prints a line starting with step_line, then SIGTERM it: (stdout, stderr,
    exit code)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    head = []
    for line in p.stdout:
        head.append(line)
        if line.startswith(step_line):
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=300)
    return "".join(head) + out, err, p.returncode


STOPPED = re.compile(r"^Stopped by SIGTERM at step (\d+); checkpoint saved to (\S+)\. Resume with: "
                     r"(?:cd \S+ && )?(python -m train .*)$", re.M)  # fmt: skip


def test_sigterm_saves_exits_0_and_the_printed_command_resumes(tmp_path, cache):
    """The resume line is run as printed (not rebuilt by the test): it continues from the
    checkpoint with every setting of the stopped run (--config, --model-config and --set ones
    alike), so its own next checkpoint holds the same config and the same model."""
    cmd = command(tmp_path, cache, "max_steps=100000", "log_interval_steps=1",
                  "save_interval_steps=100000", "eval_interval_steps=100000")  # fmt: skip
    out, err, rc = stop_after(cmd, tmp_path, "Step 3:")
    assert rc == 0, err[-3000:]
    m = STOPPED.search(out)
    assert m, out
    step, ckpt = int(m[1]), tmp_path / m[2]
    assert step >= 3 and (ckpt / "trainer_state.json").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    assert not (tmp_path / "ckpt" / "final").exists()  # stopped, not finished

    printed = shlex.split(m[3])
    assert printed[:3] == ["python", "-m", "train"], m[3]
    out2, err2, rc2 = stop_after([sys.executable, *printed[1:]], tmp_path, f"Step {step + 1}:")
    assert rc2 == 0, err2[-3000:]
    assert f"Resumed from {ckpt} at step {step}" in out2
    assert re.search(rf"^Step {step + 1}: ", out2, re.M), out2
    m2 = STOPPED.search(out2)
    assert m2 and int(m2[1]) > step, out2
    ckpt2 = tmp_path / m2[2]
    first, again = (json.loads((c / "train_config.json").read_text()) for c in (ckpt, ckpt2))
    assert first["resume_from"] is None and again["resume_from"] == str(ckpt)
    assert {**again, "resume_from": None} == first  # every setting, the model's included
    assert (ckpt2 / "config.json").read_text() == (ckpt / "config.json").read_text()
