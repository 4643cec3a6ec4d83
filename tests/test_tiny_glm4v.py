"""The tiny offline GLM-4.1V / GLM-4.5V builder: directories that transformers loads and runs with
an image and a video, placeholder counts, deterministic weights (no vLLM engine)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.tiny_model_checks import (
    IMAGE_SIZES,
    assert_mrope_fits,
    assert_seeded_weights,
    check_num_image_tokens,
    checked_config,
    forward_logits,
    greedy_new_tokens,
    read_json,
    read_weights,
    user_message,
    variant_fixtures,
)
from tiny_models.tiny_glm4v import (
    ARCHITECTURES,
    SPECIAL_TOKENS,
    TinyGlm4vSpec,
    build_tiny_glm4v,
    model_class,
    num_image_tokens,
    tiny_image,
    tiny_video,
    tiny_video_metadata,
    vllm_video_metadata,
)

SPEC = TinyGlm4vSpec()
VARIANTS = (False, True)  # moe
IDS = ("dense", "moe")
MODEL_TYPES = {False: "glm4v", True: "glm4v_moe"}
#: config.json fields that hold a special token's id (GLM-4.1V names).
TOKEN_FIELDS = {
    "image_token_id": "<|image|>",
    "video_token_id": "<|video|>",
    "image_start_token_id": "<|begin_of_image|>",
    "image_end_token_id": "<|end_of_image|>",
    "video_start_token_id": "<|begin_of_video|>",
    "video_end_token_id": "<|end_of_video|>",
}

model_dirs, processors, models = variant_fixtures(
    "tiny_glm4v", lambda path, moe: build_tiny_glm4v(path, moe=moe), VARIANTS, IDS, model_class
)


@pytest.mark.parametrize("moe", VARIANTS, ids=IDS)
def test_directory_layout_and_config(model_dirs, processors, moe) -> None:
    model_dir = model_dirs[moe]
    config, ids = checked_config(
        model_dir,
        processors[moe].tokenizer,
        SPECIAL_TOKENS,
        ARCHITECTURES[moe],
        TOKEN_FIELDS,
        model_type=MODEL_TYPES[moe],
    )
    text, vision = config["text_config"], config["vision_config"]
    assert text["attention_bias"] is True  # vLLM's GLM-4 reads it; transformers always has biases
    assert text["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert_mrope_fits(text)  # vLLM asserts this
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert vision["patch_size"] * vision["spatial_merge_size"] == 28
    assert vision["temporal_patch_size"] == 2
    if moe:
        assert text["n_routed_experts"] > text["num_experts_per_tok"]
        assert 0 < text["first_k_dense_replace"] < text["num_hidden_layers"]
    generation = read_json(model_dir, "generation_config.json")
    assert generation["eos_token_id"] == [
        ids["<|endoftext|>"],
        ids["<|user|>"],
        ids["<|observation|>"],
    ]
    processor = processors[moe]
    assert type(processor).__name__ == "Glm4vProcessor"
    assert type(processor.image_processor).__name__ == "Glm4vImageProcessor"
    assert type(processor.video_processor).__name__ == "Glm4vVideoProcessor"
    assert processor.image_token_id == ids["<|image|>"]


def test_moe_experts_use_the_hub_layout(model_dirs) -> None:
    weights = read_weights(model_dirs[True])
    prefix = f"model.language_model.layers.{SPEC.first_k_dense_replace}.mlp."
    for e in range(SPEC.num_experts):
        assert weights[f"{prefix}experts.{e}.gate_proj.weight"].shape == (
            SPEC.moe_intermediate,
            SPEC.text_hidden,
        )
    assert weights[prefix + "gate.weight"].shape == (SPEC.num_experts, SPEC.text_hidden)
    assert prefix + "shared_experts.down_proj.weight" in weights
    assert "model.language_model.layers.0.mlp.gate_up_proj.weight" not in weights
    assert "model.language_model.layers.0.mlp.gate_proj.weight" in weights


@pytest.mark.parametrize("moe", VARIANTS, ids=IDS)
def test_weights_are_deterministic(model_dirs, tmp_path: Path, moe) -> None:
    assert_seeded_weights(
        lambda path, seed: build_tiny_glm4v(path, moe=moe, seed=seed), model_dirs[moe], tmp_path
    )


@pytest.mark.parametrize("moe", VARIANTS, ids=IDS)
def test_transformers_runs_an_image(processors, models, moe) -> None:
    processor, model = processors[moe], models[moe]
    assert type(model).__name__ == ARCHITECTURES[moe]
    text = processor.apply_chat_template(
        user_message({"type": "image"}), add_generation_prompt=True
    )
    assert text == (
        "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>"
        "Describe this image.<|assistant|>\n"
    )
    inputs = processor(text=[text], images=[tiny_image(300, 200)], return_tensors="pt")
    n = num_image_tokens(300, 200)
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == n
    assert int((inputs["mm_token_type_ids"][0] == 1).sum()) == n
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 18]]
    forward_logits(model, inputs)
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
        )
    assert [tuple(x.shape) for x in features.pooler_output] == [(n, SPEC.text_hidden)]
    assert len(greedy_new_tokens(model, inputs, max_new_tokens=4)) == 4


@pytest.mark.parametrize("moe", VARIANTS, ids=IDS)
def test_transformers_runs_a_video(processors, models, moe) -> None:
    processor, model = processors[moe], models[moe]
    frames, width, height = 8, 300, 200
    text = processor.apply_chat_template(
        user_message({"type": "video"}, text="Describe this video."), add_generation_prompt=True
    )
    assert "<|begin_of_video|><|video|><|end_of_video|>Describe this video." in text
    inputs = processor(
        text=[text],
        videos=[tiny_video(frames, width, height)],
        video_metadata=[tiny_video_metadata(frames)],
        return_tensors="pt",
    )
    grid_t, grid_h, grid_w = inputs["video_grid_thw"][0].tolist()
    assert grid_t == frames // SPEC.temporal_patch_size
    per_frame = grid_h * grid_w // SPEC.spatial_merge_size**2
    ids = inputs["input_ids"][0]
    # Every temporal patch: <|begin_of_image|> + per_frame * <|image|> + <|end_of_image|> + "s".
    assert int((ids == model.config.image_token_id).sum()) == grid_t * per_frame
    assert int((ids == model.config.image_start_token_id).sum()) == grid_t
    assert int((ids == model.config.video_token_id).sum()) == 0
    assert int((inputs["mm_token_type_ids"][0] == 2).sum()) == grid_t * per_frame
    decoded = processor.tokenizer.decode(ids)
    for second in range(grid_t):  # 2 fps, 2 frames per temporal patch: one second each
        assert f"<|end_of_image|>{second}<|begin_of_image|>" in decoded or (
            f"<|end_of_image|>{second}<|end_of_video|>" in decoded
        )
    forward_logits(model, inputs)
    assert len(greedy_new_tokens(model, inputs, max_new_tokens=4)) == 4


def test_vllm_video_metadata_turns_frame_sampling_off() -> None:
    meta = vllm_video_metadata(6)
    assert meta == {**tiny_video_metadata(6), "do_sample_frames": False}
    assert meta["frames_indices"] == list(range(6))


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_num_image_tokens_matches_the_processor(processors, size) -> None:
    processor = processors[False]
    n = num_image_tokens(*size)
    check_num_image_tokens(processor, size, processor.image_token_id, n, SPEC.spatial_merge_size)
    assert n <= SPEC.max_image_tokens


@pytest.mark.parametrize(
    ("moe", "changes"),
    [
        (False, {"mrope_section": (4, 6, 6)}),
        (False, {"head_dim": 16}),
        (False, {"partial_rotary_factor": 1.0}),
        (True, {"num_experts_per_tok": 5}),
        (True, {"first_k_dense_replace": 2}),
        (False, {"vision_heads": 3}),
        (False, {"max_image_tokens": 2}),
    ],
)
def test_invalid_specs_are_rejected(tmp_path: Path, moe, changes) -> None:
    spec = dataclasses.replace(SPEC, **changes)
    with pytest.raises(ValueError):
        build_tiny_glm4v(tmp_path / "bad", moe=moe, spec=spec)
    assert not (tmp_path / "bad").exists()
