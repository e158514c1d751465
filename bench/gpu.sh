#!/usr/bin/env bash
# One command for a GPU machine (no network needed): environment check, the GPU tests, the kernel
# benchmarks and the end-to-end training benchmark; writes bench/results/<date>-<gpu>.json/.md.
#
#   bash bench/gpu.sh            # everything (under ~10 minutes on one H100)
#   OUT=/some/dir bash bench/gpu.sh   # also copy the results and logs there
#   OCTO_COMMIT=$(git rev-parse --short HEAD) ...   # where the tree has no .git (a copied tree)
# The experiments' GPU tests (CUDA graphs, OCTO_TRITON_OP) run in bench/gpu_experiments.sh.
#
# Runs from the source tree (PYTHONPATH=.), so it needs no `pip install` of the project: the
# GPU images have torch, Triton, transformers and pytest-benchmark, but may lack `datasets`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work="${OUT:-$(mktemp -d)}"   # logs and raw JSON (OUT: keep them)
# Per-phase limits in seconds, so one slow phase cannot eat the others' time; 560 s in all, so
# the whole script stays under 10 minutes (measured phases: 38 s, ~255 s, ~200 s on an H100).
T_TESTS=${T_TESTS:-80} T_BENCH=${T_BENCH:-265} T_E2E=${T_E2E:-215}
status=0

echo "== check.py"
python3 check.py || status=1

echo "== GPU tests (pytest -m gpu)"
timeout "$T_TESTS" python3 -m pytest -q -m gpu -p no:cacheprovider tests/ \
    -k "not cuda_graph and not launches_the_kernels" 2>&1 | tee "$work/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== kernel benchmarks"
timeout "$T_BENCH" python3 -m pytest -q -p no:cacheprovider bench/test_bench_rmsnorm.py \
    bench/test_bench_rope.py bench/test_bench_cross_entropy.py bench/test_bench_linear_ce.py \
    -k "not triton_compiled" \
    --benchmark-json="$work/kernels.json" \
    --benchmark-min-rounds=3 --benchmark-max-time=0.5 --benchmark-warmup=on 2>&1 \
    | tee "$work/bench.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== end-to-end training throughput"
timeout "$T_E2E" python3 -m bench.train_throughput --out "$work/train_throughput.json" 2>&1 | tee "$work/e2e.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== report"
python3 -m bench.report --kernels "$work/kernels.json" --e2e "$work/train_throughput.json" \
    --tests-log "$work/gpu_tests.log" --outdir bench/results || status=1
if [ -n "${OUT:-}" ]; then  # the report too, beside the logs
    cp "$(ls -t bench/results/*.json | head -1)" "$(ls -t bench/results/*.md | head -1)" "$OUT"/
fi
exit $status
