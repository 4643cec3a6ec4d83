"""The plugin's multimodal processor, built by vLLM's own registry for the tiny model (no
engine): placeholders per image follow k, the ratio travels as a per-image field and into the
multimodal hash, budgets follow the largest k, bad ratios raise naming the field."""

from __future__ import annotations

import pytest
from vllm.config import ModelConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import TimingContext
from vllm.multimodal.processing.inputs import ProcessorInputs
from vllm.plugins import load_general_plugins

from vs_vllm.selection import num_kept_tokens
from vs_vllm.testing.tiny_qwen import num_image_tokens, tiny_image

PROMPT = "<|im_start|>user\n{}hi<|im_end|>\n"
PAD = "<|vision_start|><|image_pad|><|vision_end|>"


def _processor(model_dir, settings=None):
    load_general_plugins()
    overrides = {} if settings is None else {"vision_selector": settings}
    config = ModelConfig(
        model=str(model_dir), dtype="float32", max_model_len=2048, hf_overrides=overrides
    )
    return MULTIMODAL_REGISTRY.create_processor(config)


@pytest.fixture(scope="module")
def selector(tiny_model_dir):
    return _processor(
        tiny_model_dir, {"keep_ratio": 0.3, "strategy": "norm", "request_ratios": True}
    )


@pytest.fixture(scope="module")
def fixed(tiny_model_dir):
    return _processor(tiny_model_dir, {"keep_ratio": 0.3, "strategy": "norm"})


@pytest.fixture(scope="module")
def stock(tiny_model_dir):
    return _processor(tiny_model_dir)


def _apply(proc, sizes, kwargs=None):
    tok = proc.info.get_tokenizer()
    ids = tok.encode(PROMPT.format(PAD * len(sizes)))
    images = [tiny_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    items = proc.info.parse_mm_data({"image": images})
    inputs = ProcessorInputs(prompt=ids, mm_data_items=items, hf_processor_mm_kwargs=kwargs or {})
    return proc.apply(inputs, TimingContext())


@pytest.mark.parametrize("ratio", [None, 0.1, 0.5, 1.0])
def test_placeholders_follow_k(selector, ratio):
    sizes = [(300, 200), (120, 250)]
    out = _apply(selector, sizes, None if ratio is None else {"vision_keep_ratio": ratio})
    r = 0.3 if ratio is None else ratio
    want = [num_kept_tokens(num_image_tokens(w, h), r) for w, h in sizes]
    assert [p.length for p in out["mm_placeholders"]["image"]] == want
    assert [float(item["vision_keep_ratio"].data) for item in out["mm_kwargs"]["image"]] == [r, r]
    pad = selector.info.get_tokenizer().convert_tokens_to_ids("<|image_pad|>")
    assert out["prompt_token_ids"].count(pad) == sum(want)


def test_ratio_is_part_of_the_multimodal_hash(selector):
    h = {
        r: _apply(selector, [(300, 200)], {"vision_keep_ratio": r})["mm_hashes"]["image"][0]
        for r in (0.3, 0.5)
    }
    assert h[0.3] != h[0.5]
    again = _apply(selector, [(300, 200)], {"vision_keep_ratio": 0.3})["mm_hashes"]["image"][0]
    assert again == h[0.3]


def test_budgets(selector, fixed, stock):
    n_max = stock.info.get_mm_max_tokens_per_item(2048, {"image": 1})["image"]
    assert n_max == 64
    assert fixed.info.get_mm_max_tokens_per_item(2048, {"image": 1})["image"] == 19
    assert selector.info.get_mm_max_tokens_per_item(2048, {"image": 1})["image"] == 64


def test_stock_processor_is_untouched(stock):
    out = _apply(stock, [(300, 200)])
    assert out["mm_placeholders"]["image"][0].length == num_image_tokens(300, 200)
    assert "vision_keep_ratio" not in out["mm_kwargs"]["image"][0]


@pytest.mark.parametrize("bad", [0, -1, 1.01, "0.2", True, None])
def test_bad_request_ratio(selector, bad):
    with pytest.raises(ValueError, match=r"mm_processor_kwargs\.vision_keep_ratio"):
        _apply(selector, [(300, 200)], {"vision_keep_ratio": bad})


def test_ratio_above_server_budget_needs_request_ratios(fixed):
    assert _apply(fixed, [(300, 200)], {"vision_keep_ratio": 0.1})["mm_placeholders"]
    with pytest.raises(ValueError, match="--trust-request-mm-kwargs"):
        _apply(fixed, [(300, 200)], {"vision_keep_ratio": 0.5})
