"""Run the real vLLM CPU engine once on a list of requests and write the results as JSON.

    python tests/engine/runner.py SPEC.json OUT.json

Runs in its own process (vLLM's CPU engine spawns workers; a test process should not keep
an engine alive). SPEC: {"model", "hf_overrides", "requests": [{"images": [[w, h, seed]],
"text", "ratio"}], "max_tokens", "llm_kwargs"}. Set VLLM_PLUGINS="" in the environment to
run stock vLLM without the plugin.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# Run as a script (its folder is sys.path[0]): the repo root holds tiny_models (not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


IMAGE = "<image>"  # an image part of a request's "content"
VIDEO = "<video>"  # a video part of a request's "content"


def chat_text(processor, content: list[str]) -> str:
    """The model's own chat template on one user turn of ``content`` (text, IMAGE for the next
    image or VIDEO for the next video), with the generation prompt: how any family's prompt is
    written."""
    media = {IMAGE: "image", VIDEO: "video"}
    parts = [{"type": media[c]} if c in media else {"type": "text", "text": c} for c in content]
    return processor.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False
    )


def build_prompt(request: dict, processor=None) -> dict:
    """A request {"images": [[w, h, seed]], "videos": [[frames, w, h, seed]], "text",
    "ratio", "video_ratio"} as a vLLM prompt: images first, then videos, then the text, in
    Qwen's chat format. A request with "content" (text parts and IMAGE / VIDEO markers, media
    taken in order) is written with the model's own chat template (``processor``), its videos
    with frame sampling off (every frame is used, as ``hf_inputs`` gives transformers)."""
    from tiny_models.tiny_qwen import tiny_image, tiny_video, tiny_video_metadata

    images = [tiny_image(w, h, seed=s) for w, h, s in request["images"]]
    sampling = {"do_sample_frames": False} if request.get("content") else {}
    videos = [
        (tiny_video(t, w, h, seed=s), {**tiny_video_metadata(t), **sampling})
        for t, w, h, s in request.get("videos", ())
    ]
    if request.get("content"):
        text = chat_text(processor, request["content"])
    else:
        pads = "<|vision_start|><|image_pad|><|vision_end|>" * len(images)
        pads += "<|vision_start|><|video_pad|><|vision_end|>" * len(videos)
        text = f"<|im_start|>user\n{pads}{request['text']}<|im_end|>\n<|im_start|>assistant\n"
    prompt: dict = {"prompt": text}
    data: dict = {}
    if images:
        data["image"] = images if len(images) > 1 else images[0]
    if videos:
        data["video"] = videos if len(videos) > 1 else videos[0]
    if data:
        prompt["multi_modal_data"] = data
    kwargs = {}
    if request.get("ratio") is not None:
        kwargs["vision_keep_ratio"] = request["ratio"]
    if request.get("video_ratio") is not None:
        kwargs["video_keep_ratio"] = request["video_ratio"]
    if kwargs:
        prompt["mm_processor_kwargs"] = kwargs
    return prompt


def main() -> None:
    # Only as the runner process: tests import this module (build_prompt), and the test
    # process's TRITON_INTERPRET (conftest) must stay for the kernel tests.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.pop("TRITON_INTERPRET", None)
    spec = json.loads(Path(sys.argv[1]).read_text())
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    kwargs = {
        "dtype": "float32",
        "max_model_len": 2048,
        "max_num_seqs": 16,
        "limit_mm_per_prompt": {"image": 3},
        "enforce_eager": True,
        "seed": 0,
        "hf_overrides": spec.get("hf_overrides"),
    }
    llm = LLM(model=spec["model"], **{**kwargs, **spec.get("llm_kwargs", {})})
    startup = time.perf_counter() - start
    processor = None
    if any(r.get("content") for r in spec["requests"]):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(spec["model"])
    prompts = [build_prompt(r, processor) for r in spec["requests"]]
    params = SamplingParams(max_tokens=spec.get("max_tokens", 6), temperature=0, logprobs=1)
    outputs = llm.generate(prompts, params)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        results.append(
            {
                "prompt_token_ids": list(out.prompt_token_ids),
                "token_ids": list(completion.token_ids),
                "logprobs": [
                    lp[t].logprob
                    for lp, t in zip(completion.logprobs, completion.token_ids, strict=True)
                ],
            }
        )
    Path(sys.argv[2]).write_text(json.dumps({"startup_s": startup, "results": results}))


if __name__ == "__main__":
    main()
