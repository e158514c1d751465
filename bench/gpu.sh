#!/usr/bin/env bash
# Everything a GPU session measures, in ONE call of the device tool. A session gets 15 minutes of
# device time, the machine's start (a minute or more) included, and at most 10 minutes a command,
# so there is room for one full call and little else: this script is that call.
#
#   OCTO_COMMIT=<commit> OUT=/some/dir bash bench/gpu.sh    # the device tool's copy has no .git
#
# Phases, the most decision-relevant first; each runs under `timeout min(its cap, what is left of
# BUDGET)`, so the script ends inside BUDGET (default 540 s) whatever hangs, and a phase that no
# longer fits is skipped with a line:
#   1. check.py, and every GPU test (pytest -m gpu: kernels, model, trainer, CUDA graphs,
#      OCTO_TRITON_OP)                                                                cap 150 s
#   2. end to end at vocab 16000 (issue 8): Octo compiled (the default), + the micro-batch
#      captured as one CUDA graph (compile=graph), + Inductor's CUDA graphs (compile=cudagraphs),
#      with the reference kernels compiled; transformers' Llama eager and compiled; last, Octo
#      compiled with optimizer muon (issue 17's step-time target, beside the first row)  cap 240 s
#   3. the three Triton Octo rows again with OCTO_TRITON_OP=1 (Inductor launches the
#      RMSNorm/RoPE kernels itself)                                                   cap 110 s
#   4. kernel benchmarks, forward+backward (issue 3's targets; the 65536 x 4096 linear +
#      cross-entropy is left out: ~0.6 s a call)                                      cap 150 s
#   5. end to end at vocab 50304, with what time is left                             cap 120 s
# Then bench/report.py writes bench/results/<date>-<gpu>.json and .md. $OUT receives 4 files (the
# device tool brings back at most 8): gpu.log (all output), kernels.json (pytest-benchmark's raw
# JSON) and the report's .json and .md, to commit under bench/results/.
#
# Runs from the source tree (PYTHONPATH=.), so it needs no `pip install` of the project: the GPU
# image has torch, Triton, transformers and pytest-benchmark, but may lack `datasets`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-540}
RESERVE=15  # seconds kept for the report
out="${OUT:-$(mktemp -d)}"
work=$(mktemp -d)  # the raw files the report is made from
mkdir -p "$out"
status=0

# run NAME CAP CMD...: CMD under `timeout min(CAP, seconds left)`, its output also in
# $work/NAME.log; skipped (with a line) when under 20 s would be left for it.
run() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - RESERVE - SECONDS))
    local limit=$((left < cap ? left : cap))
    if ((limit < 20)); then
        echo "== $name: SKIPPED, ${left} s of the ${BUDGET} s budget left"
        status=1
        return
    fi
    echo "== $name (limit ${limit} s; ${SECONDS} s since start)"
    timeout "$limit" "$@" 2>&1 | tee "$work/$name.log"
    local rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        echo "== $name: exit code $rc$( ((rc == 124)) && echo ', cut at its time limit')"
        status=1
    fi
}

e2e() {  # e2e NAME CAP VOCAB PROVIDERS
    run "$1" "$2" python3 -m bench.train_throughput --vocabs "$3" --providers "$4" \
        --out "$work/$1.json"
}

main() {
    run check 30 python3 check.py
    run gpu_tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/
    e2e e2e_16000 240 16000 \
        octo-triton-compiled,octo-triton-graph,octo-triton-cudagraphs,octo-reference-compiled,hf-llama-eager,hf-llama-compiled,octo-triton-compiled-muon
    OCTO_TRITON_OP=1 e2e e2e_16000_triton_op 110 16000 \
        octo-triton-compiled,octo-triton-graph,octo-triton-cudagraphs
    run kernels 150 python3 -m pytest -q -p no:cacheprovider bench/test_bench_rmsnorm.py \
        bench/test_bench_rope.py bench/test_bench_cross_entropy.py bench/test_bench_linear_ce.py \
        -k "fwd+bwd and not (linear and large)" --benchmark-json="$work/kernels.json" \
        --benchmark-min-rounds=3 --benchmark-max-time=0.5 --benchmark-warmup=on
    e2e e2e_50304 120 50304 \
        octo-triton-compiled,octo-triton-graph,octo-triton-cudagraphs,hf-llama-eager

    echo "== report (${SECONDS} s since start)"
    python3 -m bench.report --kernels "$work/kernels.json" --tests-log "$work/gpu_tests.log" \
        --e2e "$work/e2e_16000.json" "$work/e2e_16000_triton_op.json" "$work/e2e_50304.json" \
        --outdir bench/results || status=1
    cat "$(ls -t bench/results/*.md | head -1)"  # the tables, at the end of the call's output
    cp "$work/kernels.json" "$out"/ 2>/dev/null
    cp "$(ls -t bench/results/*.json | head -1)" "$(ls -t bench/results/*.md | head -1)" "$out"/
    echo "== done in ${SECONDS} s, exit status $status"
    return $status
}

main 2>&1 | tee -a "$out/gpu.log"
exit "${PIPESTATUS[0]}"
