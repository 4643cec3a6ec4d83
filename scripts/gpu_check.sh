#!/usr/bin/env bash
# One call on a lent GPU machine (torch, triton, transformers; no vLLM, no internet): the kernel
# tests compiled, the select-kernel sweep against its targets, and the HF prefill timing.
#
#   scripts/gpu_check.sh            # all three (about 5 minutes on an H200)
#   GPU_CHECK_SKIP_HF=1 scripts/gpu_check.sh   # kernel tests and sweep only
#
# Writes at most 8 files under $OUT (default /tmp/gpu-check), no deeper than $OUT/<device>/:
# env.txt, kernel_tests.txt, kernel_select.txt, hf_prefill.txt and the benchmarks' CSV / PNG
# in $OUT/<device>/. Commit them under benchmarks/results/<device>/ with this command named.
# The targets table (issue 16) is printed last. Runs from the source tree: vs_vllm.kernels is
# linked to kernels/ when the package is not installed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
[ -e vs_vllm/kernels ] || ln -s ../kernels vs_vllm/kernels
export TRITON_INTERPRET=0 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

{
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv
    "$PY" -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
    git log -1 --format='commit %H' 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
echo "[gpu_check] kernel tests, compiled"
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernel_score_select.py 2>&1 \
    | tee "$OUT/kernel_tests.txt" | tail -5 || status=1

if [ "${GPU_CHECK_SKIP_HF:-0}" != "1" ]; then
    echo "[gpu_check] HF prefill at Qwen2.5-VL-7B geometry"
    "$PY" benchmarks/hf_prefill.py --out "$OUT" > "$OUT/hf_prefill.txt" 2>&1 || status=1
    tail -25 "$OUT/hf_prefill.txt"
fi

echo "[gpu_check] select kernel sweep (bf16, D=3584, keep 0.2)"
"$PY" benchmarks/kernel_select.py --tokens 256,1024,4096,8192,16384 --hidden 3584 \
    --images 1,8,32 --out "$OUT" > "$OUT/kernel_select.txt" 2>&1 || status=1
sed -n '/^targets/,$p' "$OUT/kernel_select.txt"
exit $status
