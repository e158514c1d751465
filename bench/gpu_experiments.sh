#!/usr/bin/env bash
# The open issue-8 experiments, in one GPU call (phase limits 150 + 200 + 150 s; never run yet):
# does Octo's compiled step stop being host bound
#   (a) with CUDA graphs (compile=cudagraphs),
#   (b) with the RMSNorm/RoPE ops as triton_ops that Inductor launches itself (OCTO_TRITON_OP=1),
#   (c) with both, and how does (d) Octo with the reference kernels under torch.compile compare?
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
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_inline_triton.py \
    tests/test_train_step.py -k "cuda_graph or launches_the_kernels or eagerly" 2>&1 \
    | tee "$work/experiment_tests.log" | tail -n 30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== end to end: custom ops (today) vs CUDA graphs vs compiled references vs HF compiled"
timeout 200 python3 -m bench.train_throughput --vocabs "$VOCABS" \
    --providers octo-triton-compiled,octo-triton-cudagraphs,octo-reference-compiled,hf-llama-compiled \
    --out "$work/e2e_custom_op.json" 2>&1 | tee "$work/e2e_custom_op.log" | tail -n 20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== end to end: the same with OCTO_TRITON_OP=1"
OCTO_TRITON_OP=1 timeout 150 python3 -m bench.train_throughput --vocabs "$VOCABS" \
    --providers octo-triton-compiled,octo-triton-cudagraphs \
    --out "$work/e2e_triton_op.json" 2>&1 | tee "$work/e2e_triton_op.log" | tail -n 20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
