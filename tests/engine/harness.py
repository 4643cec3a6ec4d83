"""Helpers for tests that run the real vLLM engine: the runner subprocess, the HF reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from vs_vllm.local_server import subprocess_env

RUNNER = Path(__file__).with_name("runner.py")
ROOT = Path(__file__).resolve().parents[2]


ONE = [[300, 200, 0]]
TWO = [[300, 200, 0], [120, 250, 1]]
DEFAULT_RATIO = 0.3
# Requests every engine configuration is checked on: 1 and 2 images, several ratios, the
# server default (ratio None), and an image of only 4 visual tokens.
REQUESTS = [
    *({"images": ONE, "text": "describe the picture", "ratio": r} for r in (0.1, 0.3, 1.0)),
    *({"images": TWO, "text": "compare them", "ratio": r} for r in (0.1, 0.3, 1.0)),
    {"images": ONE, "text": "describe the picture", "ratio": None},
    {"images": [[56, 56, 2]], "text": "tiny", "ratio": 0.5},
]
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank (see shared/docs/cpu-vllm.md)


def selector_overrides(scorer_path: Path | None = None, **settings: Any) -> dict[str, Any]:
    """``hf_overrides`` for the learned strategy at the default ratio, per-request ratios on."""
    base: dict[str, Any] = {
        "keep_ratio": DEFAULT_RATIO,
        "strategy": "learned",
        "request_ratios": True,
    }
    if scorer_path is not None:
        base["checkpoint"] = str(scorer_path)
    return {"vision_selector": {**base, **settings}}


def run_engine(
    tmp_path: Path,
    spec: dict[str, Any],
    *,
    plugins: bool = True,
    env: dict[str, str] | None = None,
    timeout: int = 600,
) -> dict[str, Any]:
    """Start one vLLM engine in a subprocess on ``spec`` and return its JSON results."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    env_vars = subprocess_env()
    env_vars.update(env or {})
    if not plugins:
        env_vars["VLLM_PLUGINS"] = ""
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(spec_path), str(out_path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_vars,
        cwd=ROOT,
    )
    (tmp_path / "engine.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise AssertionError(
            f"engine run failed ({proc.returncode}), log {tmp_path / 'engine.log'}:\n"
            f"{(proc.stdout + proc.stderr)[-6000:]}"
        )
    return json.loads(out_path.read_text())


def hf_inputs(processor: Any, request: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The unpruned processor outputs for a runner request (same prompt text and images)."""
    from transformers.video_utils import VideoMetadata

    from tests.engine.runner import build_prompt
    from tiny_models.tiny_qwen import tiny_image, tiny_video, tiny_video_metadata

    text = build_prompt({**request, "ratio": None, "video_ratio": None}, processor)["prompt"]
    images = [tiny_image(w, h, seed=s) for w, h, s in request["images"]]
    specs = request.get("videos", ())
    videos = [tiny_video(t, w, h, seed=s) for t, w, h, s in specs]
    kwargs: dict[str, Any] = {}
    if videos:
        meta = [tiny_video_metadata(t) for t, _, _, _ in specs]
        kwargs["videos"] = videos
        kwargs["videos_kwargs"] = {
            "video_metadata": [
                VideoMetadata(
                    total_num_frames=m["total_num_frames"],
                    fps=m["fps"],
                    frames_indices=m["frames_indices"],
                )
                for m in meta
            ],
            "do_sample_frames": False,
        }
    return processor(text=[text], images=images or None, return_tensors="pt", **kwargs)


def chat_image(
    client: Any,
    model: str,
    image: list[int],
    ratio: float | None,
    *,
    max_tokens: int,
    logprobs: bool = False,
) -> Any:
    """One greedy chat completion through an OpenAI-compatible vs-vllm server: the tiny image
    ``[w, h, seed]`` as a data URL, then "describe the picture" (a runner request with
    ``"content": [IMAGE, "describe the picture"]`` renders the same prompt), the request's own
    ``vision_keep_ratio`` when ``ratio`` is given, prompt and answer token ids returned."""
    from tiny_models.tiny_qwen import tiny_image
    from vs_vllm.local_server import data_url

    picture = tiny_image(image[0], image[1], seed=image[2])
    content = [
        {"type": "image_url", "image_url": {"url": data_url(picture)}},
        {"type": "text", "text": "describe the picture"},
    ]
    body: dict[str, Any] = {"return_token_ids": True}
    if ratio is not None:
        body["mm_processor_kwargs"] = {"vision_keep_ratio": ratio}
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        logprobs=logprobs,
        extra_body=body,
    )
