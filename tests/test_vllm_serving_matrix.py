"""Serving matrix on the real vLLM CPU engine: tensor and data parallelism behind the
OpenAI server, budgets for the largest image, chunked prefill, prefix caching and the
multimodal processor cache, all with per-request ratios.

Three servers with the same flags (`--vision-keep-ratio 0.1 --trust-request-mm-kwargs
--max-num-batched-tokens 16 --mm-processor-cache-gb 0`): one process, TP=2, DP=2 (one core per
rank). The single-process server carries most checks; TP and DP must give the same answers.
"""

from __future__ import annotations

import re
import urllib.request

import openai
import pytest

from tests.engine.harness import TP2_ENV
from tiny_models.tiny_qwen import num_image_tokens, tiny_image
from vs_vllm.local_server import data_url, served
from vs_vllm.selection import num_kept_tokens

pytestmark = pytest.mark.slow

FLAGS = (
    "--dtype",
    "float32",
    "--max-model-len",
    "2048",
    "--enforce-eager",
    "--vision-keep-ratio",
    "0.1",
    "--vision-selector-strategy",
    "norm",
    "--trust-request-mm-kwargs",
    "--max-num-batched-tokens",
    "16",
    "--mm-processor-cache-gb",
    "0",
    "--max-num-seqs",
    "8",
)
LARGEST = (448, 448)  # at the tiny model's max_pixels (28*28*64): 64 visual tokens, the maximum
# (layout of images, ratio) for the TP / DP comparison
CASES = [
    ([(300, 200)], None),
    ([(300, 200)], 0.5),
    ([(300, 200), (120, 250)], 0.3),
    ([LARGEST], 1.0),
    ([(56, 56)], 0.25),
]


def _messages(sizes, text="what is in the picture?"):
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(tiny_image(w, h, seed=i))}}
        for i, (w, h) in enumerate(sizes)
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _chat(client, sizes, ratio=None, max_tokens=4, text="what is in the picture?"):
    body = {} if ratio is None else {"mm_processor_kwargs": {"vision_keep_ratio": ratio}}
    resp = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=_messages(sizes, text),
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        extra_body=body,
    )
    choice = resp.choices[0]
    return {
        "prompt_tokens": resp.usage.prompt_tokens,
        "text": choice.message.content,
        "logprobs": [t.logprob for t in choice.logprobs.content],
    }


def _run_cases(client):
    return [_chat(client, sizes, ratio) for sizes, ratio in CASES]


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("single") / "server.log"
    with served(tiny_model_dir, *FLAGS, log=log) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        yield client, url, log, _run_cases(client)


def _parallel_results(tiny_model_dir, tmp_path_factory, name, *flags):
    log = tmp_path_factory.mktemp(name) / "server.log"
    with served(tiny_model_dir, *FLAGS, *flags, log=log, extra_env=TP2_ENV) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        results = _run_cases(client)
        # Read while serving: stopping the server makes vLLM log a traceback by itself.
        assert "Traceback" not in log.read_text()
    return results


def _text_tokens(client, sizes):
    full = _chat(client, sizes, 1.0, max_tokens=1)["prompt_tokens"]
    return full - sum(num_image_tokens(w, h) for w, h in sizes)


def _expected(client, sizes, ratio):
    return _text_tokens(client, sizes) + sum(
        num_kept_tokens(num_image_tokens(w, h), ratio) for w, h in sizes
    )


def test_counts_at_the_server_default_and_per_request(single):
    client, *_ = single
    for sizes, ratio in CASES:
        got = _chat(client, sizes, ratio)["prompt_tokens"]
        assert got == _expected(client, sizes, 0.1 if ratio is None else ratio)


def test_largest_image_at_full_ratio_on_a_0_1_server_with_chunked_prefill(single):
    """Budgets are sized for the largest k a request may ask for: the whole largest image."""
    client, *_ = single
    assert num_image_tokens(*LARGEST) == 64
    out = _chat(client, [LARGEST], 1.0, max_tokens=4)
    assert out["prompt_tokens"] == _text_tokens(client, [LARGEST]) + 64
    assert len(out["logprobs"]) == 4


def _prefix_cache_hits(url) -> float:
    with urllib.request.urlopen(f"{url}/metrics") as r:
        text = r.read().decode()
    return sum(
        float(v) for v in re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)", text, re.M)
    )


# Longer than the CPU backend's 128-token KV blocks, so the image sits inside cached blocks.
LONG = "please describe every part of the picture in detail " * 30


def test_prefix_cache_hit_gives_identical_output(single):
    client, url, *_ = single
    sizes = [(300, 200), (120, 250)]
    first = _chat(client, sizes, 0.7, max_tokens=6, text=LONG)
    hits = _prefix_cache_hits(url)
    again = _chat(client, sizes, 0.7, max_tokens=6, text=LONG)
    assert _prefix_cache_hits(url) > hits  # the second request reused cached blocks
    assert again == first


def test_two_ratios_of_one_image_never_share_blocks_wrongly(single):
    client, *_ = single
    sizes = [(448, 336)]
    at_06 = _chat(client, sizes, 0.6, max_tokens=6, text=LONG)
    at_04 = _chat(client, sizes, 0.4, max_tokens=6, text=LONG)  # same image, other k
    assert at_04["prompt_tokens"] - at_06["prompt_tokens"] == (
        num_kept_tokens(54, 0.4) - num_kept_tokens(54, 0.6)
    )
    # Each ratio, asked again after the other, answers exactly as before: no block of one
    # ratio was handed to the other (both sit in the prefix cache by now).
    assert _chat(client, sizes, 0.6, max_tokens=6, text=LONG) == at_06
    assert _chat(client, sizes, 0.4, max_tokens=6, text=LONG) == at_04


def test_processor_cache_off_mixed_ratios_same_image(single):
    client, *_ = single
    sizes = [(300, 200)]
    for ratio in (0.2, 0.9, 0.2, 0.55, 0.9):
        assert _chat(client, sizes, ratio, max_tokens=1)["prompt_tokens"] == _expected(
            client, sizes, ratio
        )


def _assert_same_answers(results, reference):
    for ours, ref in zip(results, reference, strict=True):
        assert ours["prompt_tokens"] == ref["prompt_tokens"]
        assert ours["text"] == ref["text"]
        assert ours["logprobs"] == pytest.approx(ref["logprobs"], abs=1e-4)


def test_tensor_parallel_2_server(single, tiny_model_dir, tmp_path_factory):
    tp = _parallel_results(tiny_model_dir, tmp_path_factory, "tp2", "--tensor-parallel-size", "2")
    _assert_same_answers(tp, single[3])


def test_data_parallel_2_server(single, tiny_model_dir, tmp_path_factory):
    dp = _parallel_results(tiny_model_dir, tmp_path_factory, "dp2", "--data-parallel-size", "2")
    _assert_same_answers(dp, single[3])


def test_single_server_log_is_clean(single):
    assert "Traceback" not in single[2].read_text()  # the server is still running here
