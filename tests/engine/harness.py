"""Helpers for tests that run the real vLLM engine: the runner subprocess, the HF reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

RUNNER = Path(__file__).with_name("runner.py")
ROOT = Path(__file__).resolve().parents[2]


def run_engine(
    tmp_path: Path, spec: dict[str, Any], *, plugins: bool = True, timeout: int = 600
) -> dict[str, Any]:
    """Start one vLLM engine in a subprocess on ``spec`` and return its JSON results."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not plugins:
        env["VLLM_PLUGINS"] = ""
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(spec_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(f"engine run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out_path.read_text())


def hf_inputs(processor: Any, request: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The unpruned processor outputs for a runner request (same prompt text and images)."""
    from tests.engine.runner import build_prompt
    from vs_vllm.testing.tiny_qwen import tiny_image

    text = build_prompt({**request, "images": request["images"], "ratio": None})["prompt"]
    images = [tiny_image(w, h, seed=s) for w, h, s in request["images"]]
    return processor(text=[text], images=images or None, return_tensors="pt")
