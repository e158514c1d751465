"""Without the Hugging Face Hub, a run that needs it stops at once with one line naming
HF_HUB_OFFLINE, local folders and the offline demo (it used to print a line per Hub retry for
most of a minute first). The child runs point HF_ENDPOINT at a closed local port, so the Hub is
unreachable on any machine; one more runs the seed config as it is where the Hub's name does not
resolve (this project's machines), the case a user without network meets."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.child_env import child_env
from train.data import DataError
from train.data.source import DocSource

ROOT = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused


def seed_run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "train", "--config", str(ROOT / "train" / "config.json"), "--set",
           f"checkpoint_dir={tmp_path / 'ckpt'}", f"log_dir={tmp_path / 'logs'}",
           f"data_cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    t0 = time.perf_counter()
    env = child_env(drop=("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"), **env)
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return p, time.perf_counter() - t0


def check_one_line(p: subprocess.CompletedProcess, endpoint: str) -> None:
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr[-2000:]  # no retry lines, no traceback
    line = lines[0]
    assert line.startswith(
        "error: tokenizer_name 'gpt2': no local file or folder of that name exists, and the "
        f"Hugging Face Hub, where it would be looked up, cannot be reached at {endpoint} ("
    ), line
    for needle in ("HF_HUB_OFFLINE=1", "local tokenizer folder",
                   "offline demo: python -m train --config train/configs/demo.json"):  # fmt: skip
        assert needle in line, line


def test_seed_config_without_the_hub_is_one_line_at_once(tmp_path):
    p, _ = seed_run(tmp_path, HF_ENDPOINT=CLOSED)
    check_one_line(p, CLOSED)
    assert not (tmp_path / "cache" / "pretok").exists()  # stopped before any data


def test_seed_config_where_the_hub_name_does_not_resolve(tmp_path):
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        pass
    else:
        pytest.skip("huggingface.co resolves here: the Hub may be reachable")
    p, seconds = seed_run(tmp_path)
    check_one_line(p, "https://huggingface.co")
    print(f"offline seed run failed in {seconds:.1f} s")  # the process start included


def test_hub_dataset_without_the_hub_is_one_line(monkeypatch):
    """A Hub dataset (with a local tokenizer) meets the same check before datasets retries."""
    from huggingface_hub import constants

    import train.data.hub

    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    monkeypatch.setattr(train.data.hub, "_reachable", None)
    with pytest.raises(DataError) as e:
        DocSource("roneneldan/TinyStories", "train", "text").open()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("dataset_name 'roneneldan/TinyStories': no local file or folder of "
                          "that name exists, and the Hugging Face Hub, where it would be looked "
                          f"up, cannot be reached at {CLOSED} (")  # fmt: skip
    assert "HF_HUB_OFFLINE=1" in msg and "offline demo" in msg
