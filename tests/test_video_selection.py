"""Video token selection (``--video-keep-ratio``) on the real vLLM CPU engine, both families.

Videos are made in the test (``tiny_video``: deterministic frames, no download). Qwen2.5-VL:
one engine with per-request video ratios carries the checks (one video at several ratios, a
video after an image, two videos of different lengths): prompt token counts are exact and
greedy tokens and logprobs equal the HF transformers path (same weights, same selection,
float32); a second engine checks ``per-frame`` selection. Qwen3-VL (frames are separate
placeholder runs after their timestamp text, deepstack on 2 levels): per-frame selection, the
same checks. Positions of pruned videos against transformers' ``get_rope_index`` are in
tests/test_positions.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.harness import hf_inputs, run_engine, selector_overrides
from vs_vllm.checkpoint import load_scorer
from vs_vllm.hf import greedy_decode_logprobs, select_inputs
from vs_vllm.keep_ratio import video_kept_tokens
from vs_vllm.strategies import build_strategy

pytestmark = pytest.mark.slow

EOS = "<|im_end|>"
SERVER_VIDEO_RATIO = 0.25
# [frames, width, height, seed]: 4 frames of 168x112 -> grid (2, 8, 12): 2 x 24 tokens.
SHORT = [4, 168, 112, 0]
LONG = [6, 224, 112, 1]  # grid (3, 8, 16): int((T - 1) * t_factor) < max(H', W')
REQUESTS = [
    {"images": [], "videos": [SHORT], "text": "what happens?", "video_ratio": r, "ratio": None}
    for r in (0.1, None, 1.0)
] + [
    {
        "images": [[300, 200, 0]],
        "videos": [SHORT],
        "text": "and now?",
        "video_ratio": 0.2,
        "ratio": 0.3,
    },
    {"images": [], "videos": [LONG, SHORT], "text": "compare", "video_ratio": 0.3, "ratio": None},
]
LIMITS = {"limit_mm_per_prompt": {"image": 2, "video": 2}}


def _video_k(inputs, request, per_frame: bool) -> list[int]:
    ratio = request["video_ratio"] or SERVER_VIDEO_RATIO
    out = []
    for t, h, w in inputs["video_grid_thw"].tolist():
        out.append(video_kept_tokens(t, h * w // 4, ratio, per_frame=per_frame))
    return out


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from vs_vllm.hf import load_hf_model

    return load_hf_model(tiny_model_dir)


def _run(model_dir, scorer_path, tmp_path_factory, name, requests=REQUESTS, **settings):
    spec = {
        "model": str(model_dir),
        "hf_overrides": selector_overrides(
            scorer_path, video_keep_ratio=SERVER_VIDEO_RATIO, **settings
        ),
        "requests": requests,
        "llm_kwargs": LIMITS,
    }
    return run_engine(tmp_path_factory.mktemp(name), spec)


@pytest.fixture(scope="module")
def per_video_run(tiny_model_dir, scorer_path, tmp_path_factory):
    return _run(tiny_model_dir, scorer_path, tmp_path_factory, "video-per-video")


def _check_against_hf(run, hf_model, scorer_path, per_frame: bool, requests=REQUESTS) -> None:
    model, processor = hf_model
    strategy = build_strategy("learned", load_scorer(scorer_path, 64))
    eos = processor.tokenizer.convert_tokens_to_ids(EOS)
    for request, result in zip(requests, run["results"], strict=True):
        hf = hf_inputs(processor, request)
        inputs = select_inputs(
            model,
            hf["input_ids"],
            hf,
            strategy,
            request["ratio"] or 0.3,
            video_keep_ratio=request["video_ratio"] or SERVER_VIDEO_RATIO,
            video_selection="per-frame" if per_frame else "per-video",
        )
        assert [i.numel() for i in inputs.video_kept_indices] == _video_k(hf, request, per_frame)
        assert inputs.input_ids[0].tolist() == result["prompt_token_ids"], request
        tokens, logprobs = greedy_decode_logprobs(
            model, inputs, len(result["token_ids"]), eos_token_id=eos
        )
        assert tokens == result["token_ids"], request
        torch.testing.assert_close(logprobs, result["logprobs"], rtol=0, atol=2e-4)


def test_prompt_counts_and_outputs_equal_hf_per_video(per_video_run, hf_model, scorer_path):
    _check_against_hf(per_video_run, hf_model, scorer_path, per_frame=False)
    lengths = [len(r["prompt_token_ids"]) for r in per_video_run["results"][:3]]
    assert lengths[0] < lengths[1] < lengths[2]  # video ratios 0.1 < 0.25 < 1.0


def test_per_frame_selection_equals_hf(tiny_model_dir, scorer_path, tmp_path_factory, hf_model):
    run = _run(
        tiny_model_dir,
        scorer_path,
        tmp_path_factory,
        "video-per-frame",
        video_selection="per-frame",
    )
    _check_against_hf(run, hf_model, scorer_path, per_frame=True)


# Qwen3-VL: frames of 192x128 at patch 16 -> 8 x 12 patches, 24 tokens per frame.
QWEN3_REQUESTS = [
    {
        "images": [],
        "videos": [[4, 192, 128, 0]],
        "text": "what happens?",
        "video_ratio": r,
        "ratio": None,
    }
    for r in (0.1, None, 1.0)
] + [
    {
        "images": [[300, 200, 0]],
        "videos": [[4, 192, 128, 0]],
        "text": "and now?",
        "video_ratio": 0.2,
        "ratio": 0.3,
    },
    {
        "images": [],
        "videos": [[6, 128, 128, 1], [4, 192, 128, 0]],
        "text": "compare",
        "video_ratio": 0.3,
        "ratio": None,
    },
]


def test_qwen3_vl_per_frame_video_selection_equals_hf(scorer_path, tmp_path_factory):
    from tiny_models.tiny_qwen3_vl import build_tiny_qwen3_vl
    from vs_vllm.hf import load_hf_model

    model_dir = build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl-video"))
    run = _run(
        model_dir,
        scorer_path,
        tmp_path_factory,
        "qwen3-video",
        QWEN3_REQUESTS,
        video_selection="per-frame",
    )
    _check_against_hf(
        run, load_hf_model(model_dir), scorer_path, per_frame=True, requests=QWEN3_REQUESTS
    )


# ----------------------------------------------------------------------------------------
# The OpenAI server: videos as data URLs (an MP4 written here with OpenCV, which vLLM's
# video loader decodes)


def test_server_video_counts_and_400s(tiny_model_dir, scorer_path, tmp_path_factory):
    """``vs-vllm serve --video-keep-ratio 0.25``: usage counts follow k per video for the
    server default and per-request ratios; bad ratios get 400 naming the field and the server
    keeps serving."""
    import openai

    from tiny_models.tiny_qwen import tiny_video
    from vs_vllm.local_server import mp4_data_url, served

    url_video = mp4_data_url(tiny_video(*SHORT))
    args = [
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--vision-keep-ratio",
        "0.3",
        "--video-keep-ratio",
        str(SERVER_VIDEO_RATIO),
        "--vision-selector",
        str(scorer_path),
        "--trust-request-mm-kwargs",
        "--limit-mm-per-prompt",
        '{"image": 1, "video": 1}',
    ]
    log = tmp_path_factory.mktemp("video-server") / "server.log"
    with served(tiny_model_dir, *args, log=log) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        model = client.models.list().data[0].id

        def usage(ratio=None, **extra):
            body = {} if ratio is None else {"mm_processor_kwargs": {"video_keep_ratio": ratio}}
            content = [
                {"type": "video_url", "video_url": {"url": url_video}},
                {"type": "text", "text": "what happens?"},
            ]
            resp = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": content}],
                max_tokens=2,
                temperature=0,
                extra_body=body,
            )
            return resp.usage.prompt_tokens

        full = usage(1.0)
        n = 2 * 8 * 12 // 4  # SHORT: 4 frames of 168x112 -> grid (2, 8, 12)
        for ratio in (None, 0.1, 0.5):
            r = SERVER_VIDEO_RATIO if ratio is None else ratio
            assert usage(ratio) == full - n + video_kept_tokens(2, n // 2, r, per_frame=False)
        for bad in (0, 1.5, "0.3"):
            with pytest.raises(openai.BadRequestError) as err:
                usage(bad)
            assert err.value.status_code == 400 and "video_keep_ratio" in str(err.value)
        assert usage(0.1) == full - n + video_kept_tokens(2, n // 2, 0.1, per_frame=False)
        # read while the server still runs: stopping it with SIGTERM can log vLLM's own
        # EngineDeadError from the API server's output handler (a teardown race, not a request)
        assert "Traceback" not in log.read_text()
