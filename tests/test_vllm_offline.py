"""The plugin on the real vLLM CPU engine, offline (`LLM.generate`), float32.

Each engine starts once per module (about half a minute on 2 cores) in its own process;
many checks share its results:
- prompt token count == text + sum(k_i) for 1 and 2 images at ratios 0.1 / 0.3 / 1.0 and the
  server default, several prompts in one batch;
- greedy tokens equal the HF-transformers path with the same weights and selection;
- ratio 1.0 and "plugin installed, no flag" both equal stock vLLM (plugins disabled), which
  equals transformers on the tiny model;
- a merged VisionSelector checkpoint serves without a separate scorer file.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.harness import DEFAULT_RATIO, REQUESTS, hf_inputs, run_engine, selector_overrides
from tiny_models.tiny_qwen import add_merged_scorer, num_image_tokens
from vs_vllm.checkpoint import load_scorer
from vs_vllm.hf import greedy_generate
from vs_vllm.selection import num_kept_tokens
from vs_vllm.strategies import build_strategy

pytestmark = pytest.mark.slow

EOS = "<|im_end|>"
FULL = [r for r in REQUESTS if r["ratio"] == 1.0]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(tiny_model_dir)


def _expected_prompt_len(processor, request) -> int:
    inputs = hf_inputs(processor, request)
    ratio = DEFAULT_RATIO if request["ratio"] is None else request["ratio"]
    sizes = [num_image_tokens(w, h) for w, h, _ in request["images"]]
    return inputs["input_ids"].shape[1] - sum(sizes) + sum(num_kept_tokens(n, ratio) for n in sizes)


def test_prompt_token_counts(plugin_run, hf_model):
    _, processor = hf_model
    got = [len(r["prompt_token_ids"]) for r in plugin_run["results"]]
    want = [_expected_prompt_len(processor, r) for r in REQUESTS]
    assert got == want
    # Sanity: selection really shortened the prompts (text 20 + 5 / 16 / 54 for one image).
    assert got[:3] == [25, 36, 74]


def test_greedy_tokens_equal_hf_path(plugin_run, hf_model, scorer_path, tiny_model_dir):
    model, processor = hf_model
    strategy = build_strategy("learned", load_scorer(scorer_path, 64))
    eos = processor.tokenizer.convert_tokens_to_ids(EOS)
    for request, result in zip(REQUESTS, plugin_run["results"], strict=True):
        inputs = hf_inputs(processor, request)
        ratio = DEFAULT_RATIO if request["ratio"] is None else request["ratio"]
        tokens = greedy_generate(
            model,
            inputs["input_ids"],
            inputs,
            strategy,
            ratio,
            max_new_tokens=len(result["token_ids"]) if result["token_ids"][-1] == eos else 6,
            eos_token_id=eos,
        )
        assert tokens == result["token_ids"], request


@pytest.fixture(scope="module")
def stock_run(tiny_model_dir, tmp_path_factory):
    requests = [{**r, "ratio": None} for r in FULL]
    spec = {"model": str(tiny_model_dir), "requests": requests}
    return run_engine(tmp_path_factory.mktemp("stock"), spec, plugins=False)


def test_stock_vllm_equals_transformers(stock_run, hf_model):
    """The tiny model itself, without the plugin: stock vLLM's prompt is transformers'
    processor output and its greedy tokens are transformers' ``generate`` (float32)."""
    model, processor = hf_model
    for request, result in zip(FULL, stock_run["results"], strict=True):
        inputs = hf_inputs(processor, request)
        assert result["prompt_token_ids"] == inputs["input_ids"][0].tolist(), request
        n = len(result["token_ids"])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        assert out[0, inputs["input_ids"].shape[1] :].tolist()[:n] == result["token_ids"], request


def test_ratio_one_equals_stock_vllm(plugin_run, stock_run):
    full = [
        res for req, res in zip(REQUESTS, plugin_run["results"], strict=True) if req["ratio"] == 1.0
    ]
    for ours, stock in zip(full, stock_run["results"], strict=True):
        assert ours["prompt_token_ids"] == stock["prompt_token_ids"]
        assert ours["token_ids"] == stock["token_ids"]
        torch.testing.assert_close(ours["logprobs"], stock["logprobs"], rtol=0, atol=1e-5)


def test_plugin_without_settings_is_stock_vllm(tiny_model_dir, stock_run, tmp_path_factory):
    requests = [{**r, "ratio": None} for r in FULL]
    spec = {"model": str(tiny_model_dir), "requests": requests}
    plain = run_engine(tmp_path_factory.mktemp("plain"), spec, plugins=True)
    for ours, stock in zip(plain["results"], stock_run["results"], strict=True):
        assert ours == stock  # identical, logprobs included


def test_merged_checkpoint_serves_without_scorer_file(
    tiny_model_dir, scorer_path, plugin_run, tmp_path_factory
):
    from safetensors.torch import load_file

    merged = add_merged_scorer(
        tiny_model_dir, load_file(scorer_path), tmp_path_factory.mktemp("merged") / "model"
    )
    spec = {"model": str(merged), "hf_overrides": selector_overrides(), "requests": REQUESTS[:4]}
    run = run_engine(tmp_path_factory.mktemp("merged-run"), spec)
    assert run["results"] == plugin_run["results"][:4]
