#!/usr/bin/env bash
# The main job. Sets up .venv (scripts/setup-env.sh), then `vs-vllm quickstart`: starts the
# real vLLM OpenAI server with --vision-keep-ratio 0.3, sends one chat request with an image
# at ratio 1.0 and at 0.3, prints the answers and prompt tokens, and stops the server.
#
#   scripts/run.sh                                  # tiny local model (no download)
#   MODEL=Qwen/Qwen2.5-VL-7B-Instruct scripts/run.sh --vision-selector scorer.safetensors
#
# Extra arguments go to `vs-vllm quickstart` (see `vs-vllm quickstart --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-env.sh"
model_args=()
if [ -n "${MODEL:-}" ]; then model_args=(--model "$MODEL"); fi
exec "$ROOT/.venv/bin/vs-vllm" quickstart "${model_args[@]}" "$@"
