"""The tiny offline Qwen3-VL-family builder: dense, MoE and Qwen3.5 directories that transformers
loads and runs with an image, deterministic weights, placeholder counts (no vLLM engine)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tiny_models.tiny_qwen3_vl import (
    ARCHITECTURES,
    SPECIAL_TOKENS,
    VARIANTS,
    TinyQwen3VLSpec,
    build_tiny_qwen3_vl,
    model_class,
    num_image_tokens,
    tiny_image,
)

SPEC = TinyQwen3VLSpec()
MODEL_TYPES = {"dense": "qwen3_vl", "moe": "qwen3_vl_moe", "qwen3_5": "qwen3_5"}


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def image_message(text: str = "Describe this image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_qwen3_vl")
    return {v: build_tiny_qwen3_vl(root / v, variant=v) for v in VARIANTS}


@pytest.fixture(scope="session")
def processors(model_dirs: dict[str, Path]) -> dict[str, object]:
    from transformers import AutoProcessor

    return {v: AutoProcessor.from_pretrained(d) for v, d in model_dirs.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_directory_layout_and_config(model_dirs, processors, variant) -> None:
    model_dir = model_dirs[variant]
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[variant]]
    assert config["model_type"] == MODEL_TYPES[variant]
    tokenizer = processors[variant].tokenizer
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert config["image_token_id"] == ids["<|image_pad|>"]
    assert config["video_token_id"] == ids["<|video_pad|>"]
    assert config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert config["vision_end_token_id"] == ids["<|vision_end|>"]
    text, vision = config["text_config"], config["vision_config"]
    assert text["vocab_size"] >= len(tokenizer)
    rope = text["rope_parameters"]
    assert rope["mrope_interleaved"] is True
    rotary_dim = int(text["head_dim"] * rope.get("partial_rotary_factor", 1.0))
    assert sum(rope["mrope_section"]) * 2 == rotary_dim  # vLLM asserts this
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert vision["patch_size"] * vision["spatial_merge_size"] == 32
    assert int(vision["num_position_embeddings"] ** 0.5) ** 2 == vision["num_position_embeddings"]
    if variant == "qwen3_5":
        assert "deepstack_visual_indexes" not in vision
        assert set(text["layer_types"]) == {"linear_attention", "full_attention"}
    else:
        levels = vision["deepstack_visual_indexes"]
        assert len(levels) >= 2 and len(levels) <= text["num_hidden_layers"]
    if variant == "moe":
        assert text["num_experts_per_tok"] < text["num_local_experts"]
        assert text["norm_topk_prob"] is True
    processor = processors[variant]
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert type(processor.video_processor).__name__ == "Qwen3VLVideoProcessor"
    assert processor.image_processor.patch_size == SPEC.patch_size


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_are_deterministic(model_dirs, tmp_path: Path, variant) -> None:
    first = read_weights(model_dirs[variant])
    again = read_weights(build_tiny_qwen3_vl(tmp_path / "again", variant=variant))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = read_weights(build_tiny_qwen3_vl(tmp_path / "seed1", seed=1, variant=variant))
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert all(t.dtype == torch.float32 for t in first.values())


def test_moe_experts_use_the_hub_layout(model_dirs) -> None:
    weights = read_weights(model_dirs["moe"])
    e, h, i = SPEC.num_experts, SPEC.text_hidden, SPEC.moe_intermediate
    prefix = "model.language_model.layers.0.mlp.experts."
    assert weights[prefix + "gate_up_proj"].shape == (e, h, 2 * i)
    assert weights[prefix + "down_proj"].shape == (e, i, h)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_runs_an_image(model_dirs, processors, variant) -> None:
    processor = processors[variant]
    model = model_class(variant).from_pretrained(model_dirs[variant]).eval()
    assert type(model).__name__ == ARCHITECTURES[variant]
    text = processor.apply_chat_template(image_message(), add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text
    inputs = processor(text=[text], images=[tiny_image(300, 200)], return_tensors="pt")
    n = num_image_tokens(300, 200)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == n
    with torch.no_grad():
        logits = model(**inputs).logits
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
        )
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert [tuple(x.shape) for x in features.pooler_output] == [(n, SPEC.text_hidden)]
    deepstack = getattr(features, "deepstack_features", None)
    if variant == "qwen3_5":
        assert not deepstack
    else:
        assert len(deepstack) == len(SPEC.deepstack_visual_indexes)
        assert all(tuple(level[0].shape) == (n, SPEC.text_hidden) for level in deepstack)


@pytest.mark.parametrize(
    "size", [(300, 200), (120, 250), (56, 56), (16, 16), (1000, 40), (2000, 1500)]
)
def test_num_image_tokens_matches_the_processor(processors, size) -> None:
    width, height = size
    processor = processors["dense"]
    text = processor.apply_chat_template(image_message(), add_generation_prompt=True)
    inputs = processor(text=[text], images=[tiny_image(width, height)], return_tensors="pt")
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n = num_image_tokens(width, height)
    assert int((inputs["input_ids"] == pad).sum()) == n
    assert int(inputs["image_grid_thw"].prod()) // SPEC.spatial_merge_size**2 == n
    assert SPEC.min_pixels // 32**2 <= n <= SPEC.max_pixels // 32**2


@pytest.mark.parametrize(
    ("variant", "changes"),
    [
        ("dense", {"mrope_section": (4, 6, 7)}),
        ("dense", {"deepstack_visual_indexes": (0, 5)}),
        ("dense", {"deepstack_visual_indexes": (0, 1, 2)}),
        ("dense", {"num_position_embeddings": 60}),
        ("moe", {"moe_intermediate": 32}),
        ("qwen3_5", {"qwen35_mrope_section": (6, 5, 5)}),
        ("qwen3_5", {"qwen35_layer_types": ("linear_attention",)}),
        ("nope", {}),
    ],
)
def test_invalid_specs_are_rejected(tmp_path: Path, variant, changes) -> None:
    spec = dataclasses.replace(SPEC, **changes)
    with pytest.raises(ValueError):
        build_tiny_qwen3_vl(tmp_path / "bad", spec=spec, variant=variant)
    assert not (tmp_path / "bad").exists()
