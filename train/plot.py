"""`python -m train.plot LOG [--out PNG]`: train and eval loss, and throughput, against the step.

LOG is a run's `training_*.log` or the `.jsonl` beside it (the numbers are read from the JSON
lines), or a log_dir, meaning its newest run. The PNG goes beside it (`training_*.png`) unless
--out says otherwise. matplotlib is imported here only, so training never needs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run_records_path(path: str | Path) -> Path:
    """The .jsonl of a run named by its .log or .jsonl, or of a log_dir's newest run (the names'
    time stamps, YYYYMMDD_HHMMSS, sort as the runs started)."""
    path = Path(path)
    if path.is_dir():
        runs = sorted(path.glob("training_*.jsonl"))
        if not runs:
            raise FileNotFoundError(f"{path} holds no training_*.jsonl; pass a run's log file")
        return runs[-1]
    return path if path.suffix == ".jsonl" else path.with_suffix(".jsonl")


def read_records(path: str | Path) -> list[dict]:
    """The JSON records of a run, from its .log or .jsonl path or a log_dir (its newest run)."""
    jsonl = run_records_path(path)
    if not jsonl.is_file():
        raise FileNotFoundError(f"{jsonl} not found; pass a training_*.log or .jsonl of a run")
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def plot(path: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves to a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    path = run_records_path(path)
    records = read_records(path)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train and not evals:
        raise ValueError(f"{path} holds no train or eval records yet")
    fig, (ax_loss, ax_tps) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                     label="eval")  # fmt: skip
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_tps.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="C2")
    ax_tps.set_ylabel("tokens / s")
    ax_tps.set_xlabel("step")
    ax_tps.grid(alpha=0.3)
    fig.suptitle(Path(path).stem)
    fig.tight_layout()
    out = Path(out) if out is not None else Path(path).with_suffix(".png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("log", help="training_*.log or .jsonl, or a log_dir (its newest run)")
    parser.add_argument("--out", default=None, help="PNG path (default: beside the log)")
    args = parser.parse_args(argv)
    try:
        out = plot(args.log, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: matplotlib is not installed; pip install matplotlib", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
