"""What a finished test run left behind, read back: its log records and its checkpoint tensors.
Shared by the resume and the distributed tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def records(run_dir: Path) -> dict[str, dict]:
    """step -> train record, step -> eval loss, and the end record of run_dir/logs' JSON lines
    (every run logged there: tests rename earlier runs' logs away when they need one run)."""
    out: dict[str, dict] = {"train": {}, "eval": {}, "end": {}}
    for log in sorted((run_dir / "logs").glob("training_*.jsonl")):
        for line in log.read_text().splitlines():
            r = json.loads(line)
            if r["type"] == "train":
                out["train"][r["step"]] = r
            elif r["type"] == "eval":
                out["eval"][r["step"]] = r["eval_loss"]
            elif r["type"] == "end":
                out["end"] = r
    return out


def tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's `prefix`-*.safetensors shards ("model" or "optimizer")."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob(f"{prefix}-*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out
