"""Turn one GPU run's raw results into bench/results/<date>-<gpu>.json and .md.

    python -m bench.report --kernels kernels.json --e2e e2e.json [e2e_more.json ...] \
        --outdir bench/results

kernels.json is pytest-benchmark's --benchmark-json output, whose extra_info per case holds what
bench/conftest.py records (provider, shape, ms, GB/s, peak MiB); each e2e JSON is one
bench.train_throughput run's output (several: their rows are merged, in order, e.g. a run with
OCTO_TRITON_OP=1 beside one without). Both are copied into the result JSON; the Markdown holds the
tables a person reads.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from bench.common import env_info


def _kernel_rows(data: dict) -> list[dict]:
    rows = []
    for b in data.get("benchmarks", []):
        extra = b.get("extra_info", {})
        stats = b.get("stats", {})
        rows.append(
            {
                "group": b.get("group") or "",
                "name": b.get("name", ""),
                "provider": extra.get("provider", ""),
                "shape": extra.get("shape", ""),
                # CUDA cases record event-timed medians in extra_info; CPU cases use the host clock
                "ms": extra.get("ms", stats.get("median", float("nan")) * 1e3),
                "gbps": extra.get("gbps"),
                "peak_mib": extra.get("peak_mib"),
            }
        )
    return rows


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def kernel_table(rows: list[dict]) -> str:
    lines = ["| group | case | provider | ms | GB/s | peak MiB |", "|---|---|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["group"], str(r["shape"]), r["name"])):
        lines.append(
            f"| {r['group']} | {r['shape'] or r['name']} | {r['provider']} "
            f"| {_fmt(r['ms'], '.3f')} | {_fmt(r['gbps'], '.1f')} | {_fmt(r['peak_mib'], '.1f')} |"
        )
    return "\n".join(lines)


def e2e_table(e2e: dict, env: dict) -> str:
    """The harness's table, rebuilt from its results with this report's env (commit included)."""
    ok = [r for r in e2e.get("results", []) if "error" not in r]
    if not ok:
        return ""
    from bench.train_throughput import markdown

    failed = [f"{r['provider']} @ vocab {r['vocab_size']}: {r['error'][:200]}"
              for r in e2e["results"] if "error" in r]  # fmt: skip
    return markdown(ok, env) + "".join(f"\nFAILED: {f}\n" for f in failed)


def _read_json(path: Path | None) -> dict:
    """A results file, or {} when it is absent or was cut short (a phase hit its time limit)."""
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        print(f"warning: {path} is empty or truncated; its section is left out")
        return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=Path, help="pytest-benchmark JSON")
    ap.add_argument("--e2e", type=Path, nargs="*", default=[], help="bench.train_throughput JSONs")
    ap.add_argument("--tests-log", type=Path, help="output of the GPU tests")
    ap.add_argument("--outdir", type=Path, default=Path("bench/results"))
    ap.add_argument("--commit", help="the commit measured (the GPU copy of the tree has no .git)")
    args = ap.parse_args(argv)
    kernels = _read_json(args.kernels)
    runs = [run for run in map(_read_json, args.e2e) if run]
    e2e = {}
    if runs:
        e2e = {"env": runs[0]["env"], "results": [r for run in runs for r in run["results"]]}
    env = e2e.get("env") or env_info()  # the GPU machine's facts when its run is given
    if args.commit:
        env["commit"] = args.commit
    tests_summary = ""
    if args.tests_log and args.tests_log.is_file():
        tail = [ln for ln in args.tests_log.read_text().splitlines() if ln.strip()]
        tests_summary = tail[-1] if tail else ""
    rows = _kernel_rows(kernels)

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu", "cpu")).strip("-").lower()
    stem = f"{env['date'][:10]}-{gpu}"
    args.outdir.mkdir(parents=True, exist_ok=True)
    result = {"env": env, "gpu_tests": tests_summary, "kernels": rows, "e2e": e2e}
    (args.outdir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Octo GPU run: {env.get('gpu', 'CPU')}",
        "",
        "| fact | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in env.items()),
        "",
        f"GPU tests: `{tests_summary}`",
        "",
        "## End-to-end training throughput",
        "",
        e2e_table(e2e, env) or "(not run)",
        "",
        "## Kernels",
        "",
        kernel_table(rows) if rows else "(not run)",
        "",
    ]
    (args.outdir / f"{stem}.md").write_text("\n".join(md))
    print(f"wrote {args.outdir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
