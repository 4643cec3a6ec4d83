#!/usr/bin/env bash
# The main job. Sets up .venv (scripts/setup-env.sh), then `vs-vllm quickstart`:
#
#   scripts/run.sh                 # the bundled demo model (demo/ring, no download): two real
#                                  # vLLM servers at keep 0.1 (trained scorer / random), its
#                                  # held-out questions in three modes, accuracy, prompt tokens,
#                                  # time to first token, and one PNG per mode of what was kept
#   MODEL=Qwen/Qwen2.5-VL-7B-Instruct scripts/run.sh --vision-selector scorer.safetensors
#                                  # any supported model: one image at ratio 1.0 and 0.3
#
# Extra arguments go to `vs-vllm quickstart` (see `vs-vllm quickstart --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-env.sh"
model_args=()
if [ -n "${MODEL:-}" ]; then model_args=(--model "$MODEL"); fi
exec "$ROOT/.venv/bin/vs-vllm" quickstart "${model_args[@]}" "$@"
