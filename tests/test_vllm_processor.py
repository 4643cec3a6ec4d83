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

from tiny_models.tiny_qwen import num_image_tokens, tiny_image
from vs_vllm.media_segments import IMAGE_SEGMENTS, carried_segments
from vs_vllm.selection import num_kept_tokens

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
    # The counts the processor computed once travel with each item: what the model reads.
    carried = [carried_segments(i[IMAGE_SEGMENTS]) for i in out["mm_kwargs"]["image"]]
    assert carried == [
        ((num_image_tokens(w, h), k),) for (w, h), k in zip(sizes, want, strict=True)
    ]
    pad = selector.info.get_tokenizer().convert_tokens_to_ids("<|image_pad|>")
    assert out["prompt_token_ids"].count(pad) == sum(want)


def test_placeholders_are_the_carried_counts(selector, monkeypatch):
    """The prompt's placeholders come from the carried counts, not from a second derivation:
    counts changed on the item (as the model would read them) change the placeholders."""
    import torch

    from vs_vllm.vllm_plugin import processor as plugin_processor

    real = plugin_processor.segments_tensor
    monkeypatch.setattr(plugin_processor, "segments_tensor", lambda segs: real(((segs[0][0], 3),)))
    out = _apply(selector, [(300, 200), (120, 250)], {"vision_keep_ratio": 0.5})
    assert [p.length for p in out["mm_placeholders"]["image"]] == [3, 3]
    assert all(
        torch.equal(i[IMAGE_SEGMENTS].data[:, 1], torch.tensor([3]))
        for i in out["mm_kwargs"]["image"]
    )


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
    assert IMAGE_SEGMENTS not in out["mm_kwargs"]["image"][0]


@pytest.mark.parametrize("bad", [0, -1, 1.01, "0.2", True, None])
def test_bad_request_ratio(selector, bad):
    with pytest.raises(ValueError, match=r"mm_processor_kwargs\.vision_keep_ratio"):
        _apply(selector, [(300, 200)], {"vision_keep_ratio": bad})


def test_ratio_above_server_budget_needs_request_ratios(fixed):
    assert _apply(fixed, [(300, 200)], {"vision_keep_ratio": 0.1})["mm_placeholders"]
    with pytest.raises(ValueError, match="--trust-request-mm-kwargs"):
        _apply(fixed, [(300, 200)], {"vision_keep_ratio": 0.5})


# -- videos (--video-keep-ratio) -----------------------------------------------------------

VIDEO_PAD = "<|vision_start|><|video_pad|><|vision_end|>"


def _apply_video(proc, kwargs=None, frames=4, size=(168, 112)):
    from tiny_models.tiny_qwen import tiny_video, tiny_video_metadata

    tok = proc.info.get_tokenizer()
    ids = tok.encode(PROMPT.format(VIDEO_PAD))
    video = (tiny_video(frames, *size), tiny_video_metadata(frames))
    items = proc.info.parse_mm_data({"video": [video]})
    inputs = ProcessorInputs(prompt=ids, mm_data_items=items, hf_processor_mm_kwargs=kwargs or {})
    return proc.apply(inputs, TimingContext())


@pytest.fixture(scope="module")
def video_selector(tiny_model_dir):
    settings = {"keep_ratio": 0.3, "strategy": "norm", "request_ratios": True}
    return {
        mode: _processor(
            tiny_model_dir, {**settings, "video_keep_ratio": 0.25, "video_selection": mode}
        )
        for mode in ("per-video", "per-frame")
    }


@pytest.mark.parametrize("mode", ["per-video", "per-frame"])
@pytest.mark.parametrize("ratio", [None, 0.1, 1.0])
def test_video_placeholders_follow_k(video_selector, stock, mode, ratio):
    from vs_vllm.keep_ratio import video_kept_tokens

    full = _apply_video(stock)
    (grid,) = [item["video_grid_thw"].data.tolist() for item in full["mm_kwargs"]["video"]]
    assert full["mm_placeholders"]["video"][0].length == grid[0] * grid[1] * grid[2] // 4
    out = _apply_video(video_selector[mode], None if ratio is None else {"video_keep_ratio": ratio})
    r = 0.25 if ratio is None else ratio
    k = video_kept_tokens(grid[0], grid[1] * grid[2] // 4, r, per_frame=mode == "per-frame")
    assert out["mm_placeholders"]["video"][0].length == k
    assert float(out["mm_kwargs"]["video"][0]["video_keep_ratio"].data) == r
    pad = video_selector[mode].info.get_tokenizer().convert_tokens_to_ids("<|video_pad|>")
    assert out["prompt_token_ids"].count(pad) == k


def test_per_frame_keeps_tokens_in_every_frame():
    from vs_vllm.keep_ratio import video_kept_tokens, video_segments

    assert video_segments(3, 10, 0.05, per_frame=True) == [(10, 1)] * 3
    assert video_segments(3, 10, 0.05, per_frame=False) == [(30, 1)]
    assert video_kept_tokens(3, 10, 0.05, per_frame=True) == 3
    assert video_kept_tokens(3, 10, 0.05, per_frame=False) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.01, "0.2", True, None])
def test_bad_request_video_ratio(video_selector, bad):
    with pytest.raises(ValueError, match=r"mm_processor_kwargs\.video_keep_ratio"):
        _apply_video(video_selector["per-video"], {"video_keep_ratio": bad})


def test_video_ratio_on_a_server_that_does_not_select_videos(selector):
    with pytest.raises(ValueError, match="--video-keep-ratio"):
        _apply_video(selector, {"video_keep_ratio": 0.5})
    # Without the flag videos keep every token, as stock vLLM.
    out = _apply_video(selector)
    grid = out["mm_kwargs"]["video"][0]["video_grid_thw"].data.tolist()
    assert out["mm_placeholders"]["video"][0].length == grid[0] * grid[1] * grid[2] // 4


def test_video_budgets(tiny_model_dir, stock):
    full = stock.info.get_mm_max_tokens_per_item(2048, {"video": 1})["video"]
    fixed = _processor(
        tiny_model_dir, {"keep_ratio": 0.3, "strategy": "norm", "video_keep_ratio": 0.25}
    )
    assert fixed.info.get_mm_max_tokens_per_item(2048, {"video": 1})["video"] == (
        num_kept_tokens(full, 0.25)
    )


def test_bad_video_settings_are_refused():
    from vs_vllm.vllm_plugin.settings import SelectorSettings

    with pytest.raises(ValueError, match="video_keep_ratio"):
        SelectorSettings(video_keep_ratio=0)
    with pytest.raises(ValueError, match="video_selection"):
        SelectorSettings(video_keep_ratio=0.5, video_selection="per-second")
