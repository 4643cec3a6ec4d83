#!/usr/bin/env bash
# The test command: sets up .venv (scripts/setup-env.sh), checks lint and formatting, runs
# pytest. Triton kernels run under TRITON_INTERPRET=1 on a machine without a GPU.
# Extra arguments go to pytest (e.g. -k kernel, -x). pytest exits non-zero (5) when it
# collects no test, so an empty run fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup-env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
