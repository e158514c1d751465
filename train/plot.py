"""`python -m train.plot LOG [--out PNG]`: train and eval loss, and throughput, against the step.

LOG is a run's `training_*.log` or the `.jsonl` beside it (the numbers are read from the JSON
lines), or a log_dir, meaning its newest run with a loss logged (a run that stopped before its
first log line, or a resume of a finished run, logs none). The PNG goes beside it
(`training_*.png`) unless --out says otherwise. matplotlib is imported here only, so training
never needs it.
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
    """The JSON records of a run, from its .log or .jsonl path or a log_dir (its newest run).

    A last line without its newline that does not parse is one the run is still writing (or was
    killed while writing): it is left out with a note on stderr, so a live or killed run still
    plots. Any other line that is not JSON is a ValueError naming the file and line. Lines that
    are JSON but not objects are left out (the plot reads only objects' fields)."""
    jsonl = run_records_path(path)
    if not jsonl.is_file():
        raise FileNotFoundError(f"{jsonl} not found; pass a training_*.log or .jsonl of a run")
    lines = jsonl.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: a partial write
                print(f"note: {jsonl} line {number} is incomplete (the run is still writing it, "
                      "or was killed); plotting without it", file=sys.stderr)  # fmt: skip
                continue
            raise ValueError(
                f"{jsonl} line {number} is not JSON ({e}); delete or fix that line"
            ) from None
        if isinstance(record, dict):
            records.append(record)
    return records


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def points(records: list[dict], kind: str, field: str) -> tuple[list, list]:
    """(steps, values) of the records of type `kind` that hold a numeric step and `field`; the
    others (another version's or a foreign record shape) are left out rather than failing."""
    pairs = [
        (r["step"], r[field])
        for r in records
        if r.get("type") == kind and _is_number(r.get("step")) and _is_number(r.get(field))
    ]
    return [s for s, _ in pairs], [v for _, v in pairs]


def draw(records: list[dict], title: str):
    """The figure of a run's records: train loss (a marker per log line) and eval loss on a log
    axis, so the late, slow decline is not squashed flat under the first steps' fall (the losses
    are cross-entropies, positive); throughput below. The caller closes it (plt.close)."""
    import matplotlib  # lazy: an optional extra (dev); training never needs it

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt  # lazy: after use("Agg")

    train_loss = points(records, "train", "loss")
    train_tps = points(records, "train", "tokens_per_s")
    evals = points(records, "eval", "eval_loss")
    fig, (ax_loss, ax_tps) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax_loss.plot(*train_loss, ".-", markersize=4, label="train")
    if evals[0]:
        ax_loss.plot(*evals, "o-", label="eval")
    ax_loss.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 0.6, 2: not 6x10^-1
    ax_loss.yaxis.set_major_formatter(plain)
    ax_loss.yaxis.set_minor_formatter(plain)
    ax_loss.set_ylabel("loss (nats / token, log scale)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3, which="both")
    ax_tps.plot(*train_tps, ".-", markersize=4, color="C2")
    ax_tps.set_ylabel("tokens / s")
    ax_tps.set_xlabel("step")
    ax_tps.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def has_loss(records: list[dict]) -> bool:
    return bool(points(records, "train", "loss")[0] or points(records, "eval", "eval_loss")[0])


def plot(path: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves to a PNG; returns its path. For a log_dir, its newest run with a loss
    (newer ones without are named in a note on stderr)."""
    folder = Path(path) if Path(path).is_dir() else None
    path = run_records_path(path)
    records = read_records(path)
    if folder is not None and not has_loss(records):
        for older in sorted(folder.glob("training_*.jsonl"), reverse=True)[1:]:
            older_records = read_records(older)
            if has_loss(older_records):
                print(f"note: {path.name} logged no loss yet (a run stopped before its first log "
                      f"line, or a finished run resumed); plotting {older.name}",
                      file=sys.stderr)  # fmt: skip
                path, records = older, older_records
                break
    if not has_loss(records):
        raise ValueError(f"{path} holds no train or eval records with a loss yet")
    out = Path(out) if out is not None else Path(path).with_suffix(".png")
    if not out.suffix:  # matplotlib would write OUT.png: name the file it writes
        out = out.with_suffix(".png")
    fig = draw(records, path.stem)
    import matplotlib.pyplot as plt  # lazy: optional, and after draw() chose the backend

    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise OSError(
            f"cannot write the plot to {out} ({e.strerror or e}); pass --out a .png path in a "
            "writable folder"
        ) from None
    finally:
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
    except (OSError, ValueError) as e:  # a missing or unreadable log, an unwritable --out
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: matplotlib is not installed; pip install matplotlib", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
