"""The tiny offline InternVL (HF format) builder: transformers loads, processes and runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_model_checks import (
    PROMPT,
    assert_seeded_weights,
    assert_tokenizer_round_trips,
    checked_config,
    forward_logits,
    greedy_new_tokens,
    read_json,
    single_model_fixtures,
    user_message,
)
from tiny_models.tiny_internvl import (
    ARCHITECTURE,
    SPECIAL_TOKENS,
    TinyInternVLSpec,
    build_tiny_internvl,
    num_image_tiles,
    num_image_tokens,
    tiny_image,
)

model_dir, processor, hf_model = single_model_fixtures(
    "tiny_internvl", build_tiny_internvl, ARCHITECTURE
)


def chat_inputs(processor, images: list) -> dict:
    parts = [{"type": "image", "image": image} for image in images]
    return processor.apply_chat_template(
        user_message(*parts),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def test_directory_layout_and_config(model_dir: Path, processor, hf_model) -> None:
    assert type(processor).__name__ == "InternVLProcessor"
    assert type(processor.image_processor).__name__ == "GotOcr2ImageProcessor"
    assert type(processor.video_processor).__name__ == "InternVLVideoProcessor"
    assert type(hf_model).__name__ == ARCHITECTURE

    spec = TinyInternVLSpec()
    tokenizer = processor.tokenizer
    config, ids = checked_config(
        model_dir,
        tokenizer,
        SPECIAL_TOKENS,
        ARCHITECTURE,
        {"image_token_id": "<IMG_CONTEXT>"},
        model_type="internvl",
    )
    assert config["image_token_id"] == processor.image_token_id
    assert config["image_seq_length"] == processor.image_seq_length == spec.tokens_per_tile == 64
    assert config["downsample_ratio"] == 0.5
    # The tokenizer attributes InternVLProcessor (and vLLM's InternS1 processor) read.
    assert processor.start_image_token == "<img>"
    assert processor.end_image_token == "</img>"
    assert processor.image_token == "<IMG_CONTEXT>"
    assert processor.video_token == "<video>"
    assert processor.start_image_token_id == ids["<img>"]
    assert processor.end_image_token_id == ids["</img>"]
    text = config["text_config"]
    assert text["model_type"] == "qwen2"
    assert (text["hidden_size"], text["num_hidden_layers"]) == (64, 2)
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (2, 1)
    assert text["rope_parameters"]["rope_type"] == "default"  # 1-D RoPE, no M-RoPE
    assert "mrope_section" not in text["rope_parameters"]
    assert text["eos_token_id"] == ids["<|im_end|>"] == tokenizer.eos_token_id
    assert text["pad_token_id"] == ids["<|endoftext|>"] == tokenizer.pad_token_id
    vision = config["vision_config"]
    assert vision["num_hidden_layers"] == 2
    assert vision["image_size"] == [spec.image_size] * 2
    assert vision["patch_size"] == [spec.patch_size] * 2
    image_processor = processor.image_processor
    assert image_processor.crop_to_patches is True
    assert (image_processor.min_patches, image_processor.max_patches) == (1, 4)
    assert image_processor.size.height == image_processor.size.width == spec.image_size
    generation = read_json(model_dir, "generation_config.json")
    assert generation["eos_token_id"] == ids["<|im_end|>"]
    assert generation["do_sample"] is False
    assert_tokenizer_round_trips(tokenizer, ids)


def test_spec_validation() -> None:
    TinyInternVLSpec().validate()
    with pytest.raises(ValueError, match="kv_heads"):
        TinyInternVLSpec(heads=2, kv_heads=3).validate()
    with pytest.raises(ValueError, match="patch_size"):
        TinyInternVLSpec(image_size=62).validate()
    with pytest.raises(ValueError, match="pixel shuffle"):
        TinyInternVLSpec(image_size=60, patch_size=4).validate()  # 15 x 15 patches
    with pytest.raises(ValueError, match="min_patches"):
        TinyInternVLSpec(min_patches=3, max_patches=2).validate()


def test_chat_template(processor) -> None:
    image = {"type": "image", "image": tiny_image(32, 32)}
    text = processor.apply_chat_template(
        user_message(image), add_generation_prompt=True, tokenize=False
    )
    assert text == f"<|im_start|>user\n<IMG_CONTEXT>\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    two = processor.apply_chat_template(user_message(image, image), tokenize=False)
    assert two.count("<IMG_CONTEXT>") == 2
    assert not two.endswith("<|im_start|>assistant\n")
    video = processor.apply_chat_template(
        user_message({"type": "video", "video": "x.mp4"}), tokenize=False
    )
    assert "<|im_start|>user\n<video>\n" in video


def test_num_image_tokens() -> None:
    assert num_image_tiles(64, 64) == 1  # one tile, no thumbnail
    assert num_image_tokens(64, 64) == 64
    assert num_image_tiles(200, 300) == 3  # 1 x 2 grid + thumbnail
    assert num_image_tiles(300, 200) == 5  # 2 x 2 grid + thumbnail
    assert max(num_image_tiles(w, h) for w in (10, 100, 640, 4000) for h in (10, 300)) == 5


@pytest.mark.parametrize("size", [(64, 64), (200, 300), (300, 200), (640, 160)])
def test_processor_expands_image_context(processor, size: tuple[int, int]) -> None:
    inputs = chat_inputs(processor, [tiny_image(*size)])
    ids = inputs["input_ids"][0].tolist()
    tiles = num_image_tiles(*size)
    assert ids.count(processor.image_token_id) == num_image_tokens(*size) == tiles * 64
    assert ids.count(processor.start_image_token_id) == 1
    assert ids.count(processor.end_image_token_id) == 1
    start = ids.index(processor.start_image_token_id)
    assert ids.index(processor.end_image_token_id) == start + num_image_tokens(*size) + 1
    assert tuple(inputs["pixel_values"].shape) == (tiles, 3, 64, 64)
    counted = processor._get_num_multimodal_tokens(image_sizes=[size[::-1]])
    assert counted.num_image_patches == [tiles]


def test_two_images_of_different_sizes(processor) -> None:
    inputs = chat_inputs(processor, [tiny_image(200, 300, seed=2), tiny_image(64, 64, seed=3)])
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == num_image_tokens(200, 300) + 64
    assert ids.count(processor.start_image_token_id) == 2
    assert inputs["pixel_values"].shape[0] == num_image_tiles(200, 300) + 1


def test_hf_forward_and_generate(processor, hf_model) -> None:
    inputs = chat_inputs(processor, [tiny_image(300, 200)])
    logits = forward_logits(hf_model, inputs)
    assert len(set(greedy_new_tokens(hf_model, inputs, max_new_tokens=8))) > 1
    # The image matters: another picture changes the logits at the last position.
    other = chat_inputs(processor, [tiny_image(300, 200, seed=5)])
    with torch.no_grad():
        other_logits = hf_model(**other).logits
    assert not torch.allclose(logits[0, -1], other_logits[0, -1])


def test_same_seed_same_weights(model_dir: Path, tmp_path: Path) -> None:
    ref = assert_seeded_weights(
        lambda path, seed: build_tiny_internvl(path, seed=seed), model_dir, tmp_path
    )
    # The CLS token and position embeddings are random, not transformers' zeros.
    for key in ("cls_token", "position_embeddings"):
        (name,) = [k for k in ref if k.endswith(f"vision_tower.embeddings.{key}")]
        assert ref[name].abs().sum() > 0, name
