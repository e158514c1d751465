"""Time to a target loss: Muon beside AdamW, the same model from the same seed, side by side.

    python -m bench.time_to_loss [--cases demo,shakespeare] [--seeds 0,1,2] [--threads 1]
                                 [--arm LABEL:key=value,... ...] [--out bench/results/NAME]

For each case and seed, every arm (default: `adamw` = optimizer adamw, `muon` = optimizer muon,
each with the config's other keys as they are) gets its own Trainer, built from the same seed
(the same initial weights and batch order), and the arms train in LOCKSTEP: one optimizer step of
each in turn (the order alternating every step), so a load that comes and goes on a shared
machine slows them alike. Every `eval_every` steps and at the end each is evaluated on the same
eval batches (evaluation time is left out of the seconds). Reported per arm and seed:
    the eval loss curve (step, loss, training seconds so far)
    steps and seconds to reach the FIRST arm's final eval loss (the target; same seed), linearly
        interpolated between the two evaluations around the crossing, or null if never reached
    the median step time (on a GPU each step is followed by a synchronize, so it is timed whole)
and the ratios to the first arm. Targets of issue 17 (every seed): Muon reaches AdamW's final
eval loss in <= 0.75x its steps and <= 0.8x its seconds.

Cases:
    demo         train/configs/demo.json as it is (600 steps, its BPE and generated stories)
    shakespeare  tiny-shakespeare with the real GPT-2 tokenizer (../shared/data; skipped, with
                 the reason, when absent), the "tiny" preset model (hidden 64, 2 layers: 92k
                 parameters in Muon's matrices, 6.4M in the embedding and lm_head), 8 x 64
                 tokens a step, 300 steps, learning_rate 3e-3; 5% of the paragraphs held out

Writes NAME.json, NAME.md and NAME.png (the curves) when --out is given. On a GPU the same
command runs with device auto (bf16, compile as the configs say): add --set precision=bf16 etc.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import env_info, gpt2_tokenizer_folder
from octo import OctoConfig
from train.config import TrainConfig
from train.data import build_eval_batches, build_train_data, load_tokenizer
from train.loop import Trainer
from train.model_config import load_model_config, resolve_vocab_size
from train.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_ARMS = ["adamw:optimizer=adamw", "muon:optimizer=muon"]
TARGET_STEPS, TARGET_SECONDS = 0.75, 0.8


def parse_pairs(text: str) -> dict[str, Any]:
    """ "a=1,b=x" -> {"a": 1, "b": "x"} (values parsed as JSON where they parse, as --set does)."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def case_config(case: str, work: Path, overrides: dict[str, Any]) -> tuple[TrainConfig, str]:
    """(the case's TrainConfig, tokenizer folder or name), or raises FileNotFoundError saying why
    the case cannot run here."""
    common = dict(log_dir=str(work / "logs"), checkpoint_dir=str(work / "ckpt"), num_workers=0)
    if case == "demo":
        cfg = TrainConfig.load(ROOT / "train" / "configs" / "demo.json")
        cfg = dataclasses.replace(cfg, **common, **overrides)
        return cfg, cfg.tokenizer_name
    if case == "shakespeare":
        text = SHARED / "text" / "tinyshakespeare.txt"
        if not (SHARED / "gpt2" / "vocab.json").is_file() or not text.is_file():
            raise FileNotFoundError(f"real data not found at {SHARED} (see its README)")
        tok = gpt2_tokenizer_folder(SHARED / "gpt2", work / "gpt2_tokenizer")
        cfg = TrainConfig(
            dataset_name=str(text), tokenizer_name=str(tok), eval_split=None,
            eval_holdout_fraction=0.05, model_config="tiny", block_size=64, batch_size=8,
            gradient_accumulation_steps=1, max_steps=300, warmup_steps=20, learning_rate=3e-3,
            eval_max_batches=20, pretokenize=True, use_mixed_precision=False,
            data_cache_dir="data_cache", **common,
        )  # fmt: skip
        return dataclasses.replace(cfg, **overrides), str(tok)
    raise ValueError(f"unknown case {case!r}; choose demo or shakespeare")


def crossing(curve: list[list[float]], target: float) -> tuple[float, float] | None:
    """(step, seconds) where the eval loss first reaches target, interpolated linearly between
    the evaluation before (or the start, loss +inf: the first one) and the one at or below it."""
    prev = None
    for step, loss, secs in curve:
        if loss <= target:
            if prev is None or prev[1] <= loss:
                return step, secs
            f = (prev[1] - target) / (prev[1] - loss)
            return prev[0] + f * (step - prev[0]), prev[2] + f * (secs - prev[2])
        prev = (step, loss, secs)
    return None


def run_seed(case: str, seed: int, arms: list[tuple[str, dict]], args: argparse.Namespace,
             work: Path) -> dict[str, dict]:  # fmt: skip
    """Train every arm of one seed in lockstep; returns {label: result}."""
    base, tok_name = case_config(case, work, {**args.overrides, "seed": seed})
    tok = load_tokenizer(tok_name, cache_dir=base.data_cache_dir)
    fields = load_model_config(base)
    model_cfg = OctoConfig.from_dict({**fields, "vocab_size": resolve_vocab_size(None, tok)})
    evals = build_eval_batches(base, tok)
    runs = []
    for label, over in arms:
        cfg = dataclasses.replace(base, **over)
        rt = Runtime.build(cfg)  # as run() does: the device decides pinned host batches
        data = build_train_data(cfg, tok, pin_memory=rt.pin_memory)
        tr = Trainer(cfg, model_cfg, runtime=rt, train_data=data, eval_data=evals)
        runs.append({"label": label, "tr": tr, "data": iter(tr.train_data), "times": [],
                     "curve": [], "cfg": {k: getattr(cfg, k) for k in over}})  # fmt: skip
    steps, accum = base.max_steps, base.gradient_accumulation_steps
    sync = torch.cuda.synchronize if runs[0]["tr"].device.type == "cuda" else (lambda: None)
    for step in range(1, steps + 1):
        for r in runs if step % 2 else runs[::-1]:
            micro = list(itertools.islice(r["data"], accum))
            sync()
            t0 = time.perf_counter()
            r["tr"].train_step(micro)
            sync()
            r["times"].append(time.perf_counter() - t0)
        if step % args.eval_every == 0 or step == steps:
            for r in runs:
                r["curve"].append([step, r["tr"].evaluate()["eval_loss"], sum(r["times"])])
            print(f"{case} seed {seed} step {step}: "
                  + "  ".join(f"{r['label']} {r['curve'][-1][1]:.4f}" for r in runs),
                  flush=True)  # fmt: skip
    target = runs[0]["curve"][-1][1]
    out = {}
    for r in runs:
        hit = crossing(r["curve"], target)
        out[r["label"]] = {
            "overrides": r["cfg"], "curve": r["curve"], "final_eval_loss": r["curve"][-1][1],
            "step_s_median": statistics.median(r["times"]), "train_s": sum(r["times"]),
            "steps_to_target": hit[0] if hit else None,
            "seconds_to_target": hit[1] if hit else None, "target": target, "steps": steps,
        }  # fmt: skip
    return out


def seconds_at(curve: list[list[float]], step: float) -> float:
    """Training seconds an arm had spent by (fractional) `step`, linearly interpolated between
    its evaluations (and the start: step 0 at 0 s)."""
    prev = (0.0, 0.0)
    for s, _, secs in curve:
        if step <= s:
            return prev[1] + (step - prev[0]) / (s - prev[0]) * (secs - prev[1])
        prev = (s, secs)
    return prev[1]


def summarize(results: dict[str, dict], arms: list[str]) -> dict[str, Any]:
    """Per case and arm (vs the first arm, per seed): steps_ratio (steps to the target over the
    first arm's steps), seconds_ratio (seconds to it over the first arm's training seconds, as
    measured), same_load_seconds_ratio (steps_ratio x the two arms' time ratio over the steps up
    to the crossing, which ran in lockstep: a load that changed later in the run, which only the
    first arm's total still includes, drops out), step_time_ratio (median step times); and
    whether issue 17's targets held on every seed (steps, and measured seconds)."""
    out = {}
    for case, seeds in results.items():
        base = arms[0]
        rows = {}
        for arm in arms[1:]:
            per_seed = {}
            for seed, res in seeds.items():
                b, a = res[base], res[arm]
                hit, secs = a["steps_to_target"], a["seconds_to_target"]
                steps_ratio = None if hit is None else hit / b["steps"]
                per_seed[seed] = {
                    "steps_ratio": steps_ratio,
                    "seconds_ratio": None if secs is None else secs / b["train_s"],
                    "same_load_seconds_ratio": None if hit is None
                    else steps_ratio * secs / seconds_at(b["curve"], hit),
                    "step_time_ratio": a["step_s_median"] / b["step_s_median"],
                }  # fmt: skip
            met = all(
                s["steps_ratio"] is not None and s["steps_ratio"] <= TARGET_STEPS
                and s["seconds_ratio"] <= TARGET_SECONDS for s in per_seed.values()
            )  # fmt: skip
            rows[arm] = {"per_seed": per_seed, "targets_met_every_seed": met}
        out[case] = rows
    return out


def _cell(value: float | None, ratio: float | None = None) -> str:
    if value is None:
        return "not reached"
    return f"{value:.0f}" + ("" if ratio is None else f" ({ratio:.2f}x)")


def markdown(results: dict, summary: dict, env: dict, arms: list[str], eval_every: int) -> str:
    hw = env.get("gpu") or f"{env['cpu']}, {env['cpu_threads']} thread(s)"
    lines = [
        f"Hardware: {hw}; torch {env['torch']}, commit {env['commit']}, {env['date']}. "
        f"Arms in lockstep, eval every {eval_every} steps (crossings interpolated between "
        "evaluations); seconds are training time only. Same-load x: the step ratio times the "
        f"arms' time ratio up to the crossing (see bench/time_to_loss.py summarize).",
        "",
        f"| case | seed | arm | final eval loss | steps to {arms[0]}'s final (x) | seconds to it "
        "(x) | same-load x | step ms (x) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for case, seeds in results.items():
        for seed, res in seeds.items():
            for arm in arms:
                r = res[arm]
                s = summary[case][arm]["per_seed"][seed] if arm != arms[0] else {}
                steps = _cell(r["steps_to_target"], s.get("steps_ratio"))
                secs = _cell(r["seconds_to_target"], s.get("seconds_ratio"))
                same = s.get("same_load_seconds_ratio")
                same = "" if same is None else f"{same:.2f}x"
                ms = f"{1e3 * r['step_s_median']:.1f}"
                ms += f" ({s['step_time_ratio']:.2f}x)" if s else ""
                lines.append(f"| {case} | {seed} | {arm} | {r['final_eval_loss']:.4f} | "
                             f"{steps} | {secs} | {same} | {ms} |")  # fmt: skip
    lines.append("")
    for case, rows in summary.items():
        for arm, row in rows.items():
            verdict = "met" if row["targets_met_every_seed"] else "NOT met"
            lines.append(f"- {case}, {arm}: targets (<= {TARGET_STEPS}x steps and <= "
                         f"{TARGET_SECONDS}x seconds, every seed) {verdict}")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict, arms: list[str], path: Path) -> None:
    """Eval loss against step (top) and training seconds (bottom), one column per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results)
    fig, axes = plt.subplots(2, len(cases), figsize=(6 * len(cases), 8), squeeze=False)
    colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for j, case in enumerate(cases):
        for seed, res in results[case].items():
            for arm in arms:
                c = res[arm]["curve"]
                for i, x in ((0, 0), (1, 2)):
                    axes[i][j].plot([p[x] for p in c], [p[1] for p in c], color=colors[arm],
                                    alpha=0.8, label=arm if seed == next(iter(results[case]))
                                    else None)  # fmt: skip
            axes[0][j].axhline(res[arms[0]]["target"], color="gray", lw=0.5)
        axes[0][j].set(title=f"{case}: eval loss", xlabel="step")
        axes[1][j].set(xlabel="training seconds", ylabel="eval loss")
        lo = min(p[1] for r in results[case].values() for a in arms for p in r[a]["curve"])
        hi = max(r[arms[0]]["target"] for r in results[case].values())
        for ax in axes[:, j]:  # the end of the curves, where the target is crossed
            ax.set_ylim(lo - 0.02, hi + max(0.3, 2 * (hi - lo)))
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write(out: Path, record: dict) -> str:
    """OUT.json (record, its summary recomputed), OUT.md (the table) and OUT.png (the curves);
    returns the table."""
    labels, results = list(record["arms"]), record["results"]
    record["summary"] = summarize(results, labels)
    md = markdown(results, record["summary"], record["env"], labels, record["eval_every"])
    md += "".join(f"- {case}: skipped: {why}\n" for case, why in record["skipped"].items())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    if results:
        plot(results, labels, out.with_suffix(".png"))
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="demo,shakespeare")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arm", action="append", help="LABEL:key=value,... (the first is the "
                    f"baseline; default {' '.join(DEFAULT_ARMS)})")  # fmt: skip
    ap.add_argument("--set", default="", help="key=value,... for every arm (e.g. max_steps=300)")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--work", default="runs/time_to_loss", help="logs and tokenizer go here")
    ap.add_argument("--out", help="write OUT.json, OUT.md and OUT.png")
    ap.add_argument("--report", help="only redo the table and plot of a saved OUT.json, in place")
    args = ap.parse_args(argv)
    if args.report:
        out = Path(args.report)
        print(write(out.with_suffix(""), json.loads(out.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    args.overrides = parse_pairs(args.set)
    arms = [(a.split(":", 1)[0], parse_pairs(a.split(":", 1)[1])) for a in args.arm or DEFAULT_ARMS]
    env, results, skipped = env_info(), {}, {}
    for case in args.cases.split(","):
        work = Path(args.work) / case
        try:
            case_config(case, work, {})
        except FileNotFoundError as e:
            skipped[case] = str(e)
            print(f"{case}: skipped: {e}")
            continue
        results[case] = {}
        for seed in (int(s) for s in args.seeds.split(",")):
            results[case][str(seed)] = run_seed(case, seed, arms, args, work)
    record = {"env": env, "arms": dict(arms), "set": args.overrides,
              "eval_every": args.eval_every, "threads": args.threads, "results": results,
              "skipped": skipped}  # fmt: skip
    if args.out:
        print(write(Path(args.out), record))
    else:
        labels = list(record["arms"])
        print(markdown(results, summarize(results, labels), env, labels, args.eval_every))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
