#!/usr/bin/env bash
# The open issue-3/8 experiments, in one GPU call (phase limits 140+160+110+2x75 s; never run yet):
# does Octo's compiled step stop being host bound
#   (a) with CUDA graphs (compile=cudagraphs),
#   (b) with the RMSNorm/RoPE ops as triton_ops that Inductor launches itself (OCTO_TRITON_OP=1),
#   (c) with both, and how does (d) Octo with the reference kernels under torch.compile compare?
#   (e) RMSNorm/RoPE at the seed shape inside torch.compile (as the model runs them), with custom
#       ops and with triton_ops, against torch.compile(reference) (issue 3's seed-shape target).
# Each row is measured side by side with octo-triton-compiled (today's default) and
# hf-llama-compiled in the same call. Writes $OUT (or a temp dir): the logs and JSON.
#
#   OUT=/some/dir bash bench/gpu_experiments.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work="${OUT:-$(mktemp -d)}"
VOCABS=${VOCABS:-16000}
status=0

echo "== GPU tests of the experiments (CUDA graphs step, triton_op ops)"
timeout 140 python3 -m pytest -q -p no:cacheprovider tests/test_inline_triton.py \
    tests/test_train_step.py -k "cuda_graph or launches_the_kernels or eagerly" 2>&1 \
    | tee "$work/experiment_tests.log" | tail -n 30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== end to end: custom ops (today) vs CUDA graphs vs compiled references vs HF compiled"
timeout 160 python3 -m bench.train_throughput --vocabs "$VOCABS" \
    --providers octo-triton-compiled,octo-triton-cudagraphs,octo-reference-compiled,hf-llama-compiled \
    --out "$work/e2e_custom_op.json" 2>&1 | tee "$work/e2e_custom_op.log" | tail -n 20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== end to end: the same with OCTO_TRITON_OP=1"
OCTO_TRITON_OP=1 timeout 110 python3 -m bench.train_throughput --vocabs "$VOCABS" \
    --providers octo-triton-compiled,octo-triton-cudagraphs \
    --out "$work/e2e_triton_op.json" 2>&1 | tee "$work/e2e_triton_op.log" | tail -n 20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for op in custom_op triton_op; do
    echo "== RMSNorm / RoPE at the seed shape: eager and compiled Triton vs compiled reference ($op)"
    flag=0; [ "$op" = triton_op ] && flag=1
    OCTO_TRITON_OP=$flag timeout 75 python3 -m pytest -q -p no:cacheprovider \
        bench/test_bench_rmsnorm.py bench/test_bench_rope.py -k "seed and (triton or compile)" \
        --benchmark-json="$work/kernels_seed_$op.json" --benchmark-min-rounds=3 \
        --benchmark-max-time=0.5 --benchmark-warmup=on 2>&1 | tee "$work/kernels_seed_$op.log" \
        | tail -n 25
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
