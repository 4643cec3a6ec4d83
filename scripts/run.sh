#!/usr/bin/env bash
# The main job. Sets up .venv (scripts/setup-env.sh), then runs the selection demo: random
# images' visual tokens through every strategy and the fused select kernel, printing what each
# kept. Extra arguments go to `vs-vllm demo` (e.g. --keep-ratio 0.1 --tokens 1296,64).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-env.sh"
exec "$ROOT/.venv/bin/vs-vllm" demo "$@"
