#!/usr/bin/env bash
# A second virtual environment with the official vllm==0.33.0 (the CUDA wheel, the line users
# serve on NVIDIA GPUs with Model Runner V2), for tests/test_vllm_compat.py. It installs and
# imports on a machine without a GPU; nothing in it runs on a GPU here.
#
#   scripts/setup-env-vllm033.sh            # -> .venv-vllm033
#   VENV033=/some/dir scripts/setup-env-vllm033.sh
#
# Idempotent: skipped when the environment already has vllm 0.33.0 and vs-vllm. The first
# build downloads about 6 GB (vllm brings torch 2.14 with its CUDA libraries); later builds
# come from pip's cache.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV033:-$ROOT/.venv-vllm033}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="0.33.0"

say() { printf '[setup-env-vllm033] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
cert=()
for c in "${PIP_CERT:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$c" ] && [ -f "$c" ]; then cert=(--cert "$c"); break; fi
done
# --isolated: ignore pip config / env that may point at a CPU-only torch wheel or cap torch.
PIP=("$PY" -m pip --disable-pip-version-check --isolated "${cert[@]}")

if "$PY" - "$VLLM_VERSION" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    ok = version("vllm") == sys.argv[1] and version("vs-vllm") and version("pytest")
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PYEOF
then
    say "vllm $VLLM_VERSION, vs-vllm and pytest already installed"
    exit 0
fi
say "installing vllm==$VLLM_VERSION (CUDA wheel and its requirements; several GB the first time)"
"${PIP[@]}" install -q "vllm==$VLLM_VERSION"
say "installing vs-vllm (editable, no extras) and pytest"
"${PIP[@]}" install -q --no-deps -e "$ROOT"
"${PIP[@]}" install -q pytest pytest-timeout
say "done: $("$PY" -c 'import vllm, torch; print(f"vllm {vllm.__version__}, torch {torch.__version__}")' 2>/dev/null | tail -1)"
