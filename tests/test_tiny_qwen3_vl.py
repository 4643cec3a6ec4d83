"""The tiny offline Qwen3-VL-family builder: dense, MoE and Qwen3.5 directories that transformers
loads and runs with an image, deterministic weights, placeholder counts (no vLLM engine)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.tiny_model_checks import (
    IMAGE_SIZES,
    QWEN_VL_TOKEN_FIELDS,
    assert_mrope_fits,
    assert_seeded_weights,
    check_num_image_tokens,
    checked_config,
    forward_logits,
    read_weights,
    user_message,
    variant_fixtures,
)
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

model_dirs, processors, models = variant_fixtures(
    "tiny_qwen3_vl",
    lambda path, variant: build_tiny_qwen3_vl(path, variant=variant),
    VARIANTS,
    VARIANTS,
    model_class,
)


@pytest.mark.parametrize("variant", VARIANTS)
def test_directory_layout_and_config(model_dirs, processors, variant) -> None:
    config, _ = checked_config(
        model_dirs[variant],
        processors[variant].tokenizer,
        SPECIAL_TOKENS,
        ARCHITECTURES[variant],
        QWEN_VL_TOKEN_FIELDS,
        model_type=MODEL_TYPES[variant],
    )
    text, vision = config["text_config"], config["vision_config"]
    assert "head_dim" in text
    assert text["rope_parameters"]["mrope_interleaved"] is True
    assert_mrope_fits(text)  # vLLM asserts this
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
    assert_seeded_weights(
        lambda path, seed: build_tiny_qwen3_vl(path, seed=seed, variant=variant),
        model_dirs[variant],
        tmp_path,
    )


def test_moe_experts_use_the_hub_layout(model_dirs) -> None:
    weights = read_weights(model_dirs["moe"])
    e, h, i = SPEC.num_experts, SPEC.text_hidden, SPEC.moe_intermediate
    prefix = "model.language_model.layers.0.mlp.experts."
    assert weights[prefix + "gate_up_proj"].shape == (e, h, 2 * i)
    assert weights[prefix + "down_proj"].shape == (e, i, h)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_runs_an_image(processors, models, variant) -> None:
    processor, model = processors[variant], models[variant]
    assert type(model).__name__ == ARCHITECTURES[variant]
    text = processor.apply_chat_template(
        user_message({"type": "image"}), add_generation_prompt=True
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text
    inputs = processor(text=[text], images=[tiny_image(300, 200)], return_tensors="pt")
    n = num_image_tokens(300, 200)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == n
    forward_logits(model, inputs)
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
        )
    assert [tuple(x.shape) for x in features.pooler_output] == [(n, SPEC.text_hidden)]
    deepstack = getattr(features, "deepstack_features", None)
    if variant == "qwen3_5":
        assert not deepstack
    else:
        assert len(deepstack) == len(SPEC.deepstack_visual_indexes)
        assert all(tuple(level[0].shape) == (n, SPEC.text_hidden) for level in deepstack)


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_num_image_tokens_matches_the_processor(processors, size) -> None:
    processor = processors["dense"]
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n = num_image_tokens(*size)
    check_num_image_tokens(processor, size, pad, n, SPEC.spatial_merge_size)
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
