"""The tiny offline Qwen2.5-VL builder: transformers loads and runs it (stock vLLM serving it,
equal to transformers in float32: ``tests/test_vllm_offline.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny_model_checks import (
    PROMPT,
    QWEN_VL_TOKEN_FIELDS,
    assert_mrope_fits,
    assert_seeded_weights,
    assert_tokenizer_round_trips,
    checked_config,
    forward_logits,
    greedy_new_tokens,
    read_json,
    read_weights,
    single_model_fixtures,
    user_message,
)
from tiny_models.tiny_qwen import (
    SPECIAL_TOKENS,
    TinyQwenSpec,
    add_merged_scorer,
    build_tiny_qwen25_vl,
    num_image_tokens,
    tiny_image,
)

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
PREFIX = "model.visual.importance_scorer."
SCORER_KEYS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")

model_dir, processor, hf_model = single_model_fixtures(
    "tiny_qwen", build_tiny_qwen25_vl, ARCHITECTURE
)


def random_scorer_state(dim: int, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    half = dim // 2
    return {
        "q_proj.weight": torch.randn(half, dim, generator=gen),
        "q_proj.bias": torch.randn(half, generator=gen),
        "k_proj.weight": torch.randn(half, dim, generator=gen),
        "k_proj.bias": torch.randn(half, generator=gen),
    }


def test_directory_layout_and_config(model_dir: Path, processor) -> None:
    tokenizer = processor.tokenizer
    config, ids = checked_config(
        model_dir, tokenizer, SPECIAL_TOKENS, ARCHITECTURE, QWEN_VL_TOKEN_FIELDS
    )
    text = config["text_config"]
    assert text["eos_token_id"] == ids["<|im_end|>"] == tokenizer.eos_token_id
    assert text["pad_token_id"] == ids["<|endoftext|>"] == tokenizer.pad_token_id
    spec = TinyQwenSpec()
    assert text["rope_parameters"]["mrope_section"] == list(spec.mrope_section)
    assert "head_dim" not in text and "partial_rotary_factor" not in text["rope_parameters"]
    assert_mrope_fits(text)  # sum(mrope_section) * 2 == hidden_size // num_attention_heads
    assert config["vision_config"]["out_hidden_size"] == text["hidden_size"]
    generation = read_json(model_dir, "generation_config.json")
    assert generation["eos_token_id"] == ids["<|im_end|>"]
    assert generation["do_sample"] is False
    assert_tokenizer_round_trips(tokenizer, ids)
    assert 500 <= len(tokenizer) <= 1000


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="mrope_section"):
        TinyQwenSpec(mrope_section=(4, 4, 4)).validate()
    with pytest.raises(ValueError, match="kv_heads"):
        TinyQwenSpec(heads=2, kv_heads=3).validate()
    TinyQwenSpec().validate()


@pytest.mark.parametrize("part_type", ["image", "image_url"])
def test_chat_template_writes_one_image_pad_per_image(processor, part_type: str) -> None:
    part = {"type": "image", "image": tiny_image(32, 32)}
    if part_type == "image_url":
        part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    text = processor.apply_chat_template(
        user_message(part), add_generation_prompt=True, tokenize=False
    )
    assert text.count("<|image_pad|>") == 1
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert text.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n" in (
        text
    )
    assert text.endswith("<|im_start|>assistant\n")
    without = processor.apply_chat_template(user_message(part), tokenize=False)
    assert not without.endswith("<|im_start|>assistant\n")
    two = user_message(part, part)
    assert processor.apply_chat_template(two, tokenize=False).count("<|image_pad|>") == 2
    plain = [{"role": "user", "content": "hi"}]
    assert processor.tokenizer.apply_chat_template(plain, tokenize=False).endswith(
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_num_image_tokens_bounds() -> None:
    assert num_image_tokens(300, 200) == 54
    assert num_image_tokens(28 * 8, 28 * 8) == 64
    assert num_image_tokens(4000, 3000) <= 64
    assert num_image_tokens(10, 10) >= 4
    small = TinyQwenSpec(max_pixels=28 * 28 * 16)
    assert num_image_tokens(1000, 1000, small) == 16


@pytest.mark.parametrize("size", [(300, 200), (56, 56), (640, 480), (100, 500)])
def test_processor_expands_image_pads(processor, size: tuple[int, int]) -> None:
    image = tiny_image(*size)
    text = processor.apply_chat_template(
        user_message({"type": "image", "image": image}), add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n = num_image_tokens(*size)
    assert int((inputs["input_ids"][0] == image_id).sum()) == n
    assert int(inputs["image_grid_thw"].prod()) == n * 4


def test_hf_forward_and_generate(processor, hf_model) -> None:
    image = tiny_image(300, 200)
    text = processor.apply_chat_template(
        user_message({"type": "image", "image": image}), add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    forward_logits(hf_model, inputs)
    new = greedy_new_tokens(hf_model, inputs, max_new_tokens=8)
    assert len(set(new)) > 1  # the random init is scaled so greedy decoding does not repeat


def test_same_seed_same_weights(model_dir: Path, tmp_path: Path) -> None:
    assert_seeded_weights(
        lambda path, seed: build_tiny_qwen25_vl(path, seed=seed), model_dir, tmp_path
    )


def test_tiny_image_is_deterministic() -> None:
    a, b, c = tiny_image(300, 200), tiny_image(300, 200), tiny_image(300, 200, seed=1)
    assert a.size == (300, 200) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    with pytest.raises(ValueError):
        tiny_image(0, 10)


def nested(key: str) -> str:
    """transformers' module name of a legacy Qwen2.5-VL checkpoint key."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    return key


@pytest.mark.parametrize(
    ("prefix", "num_shards", "rename"),
    [(PREFIX, 3, nested), ("visual.importance_scorer.", 2, lambda key: key)],
)
def test_add_merged_scorer(
    model_dir: Path, tmp_path: Path, prefix: str, num_shards: int, rename
) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vs_vllm.checkpoint import load_scorer_state

    dim = TinyQwenSpec().text_hidden
    state = random_scorer_state(dim)
    merged = add_merged_scorer(model_dir, state, tmp_path / "merged", prefix, num_shards)
    assert merged == tmp_path / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    for key in SCORER_KEYS:
        assert prefix + key in weight_map
    shards = sorted(set(weight_map.values()))
    n = num_shards
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (merged / "model.safetensors").exists()
    backbone = read_weights(model_dir)
    stored = read_weights(merged)
    scorer_keys = {prefix + k for k in SCORER_KEYS}
    assert set(stored) == set(weight_map) == {rename(k) for k in backbone} | scorer_keys
    total = sum(t.numel() * t.element_size() for t in stored.values())
    assert index["metadata"]["total_size"] == total
    assert all(torch.equal(stored[rename(k)], backbone[k]) for k in backbone)
    assert all(torch.equal(stored[prefix + k], state[k]) for k in SCORER_KEYS)
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (merged / name).read_bytes() == (model_dir / name).read_bytes()

    # The repo's own checkpoint reader finds the scorer in this layout.
    loaded, source = load_scorer_state(merged, hidden_size=dim)
    assert source.kind == "merged" and source.prefix == prefix
    assert all(torch.equal(loaded[k], state[k]) for k in SCORER_KEYS)

    # transformers still loads the backbone (the scorer keys are unexpected, and ignored).
    model_state = Qwen2_5_VLForConditionalGeneration.from_pretrained(merged).state_dict()
    assert all(torch.equal(model_state[nested(k)], backbone[k]) for k in backbone)


def test_add_merged_scorer_rejects_bad_input(model_dir: Path, tmp_path: Path) -> None:
    state = random_scorer_state(TinyQwenSpec().text_hidden)
    with pytest.raises(ValueError, match="missing"):
        add_merged_scorer(model_dir, {"q_proj.weight": state["q_proj.weight"]}, tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        add_merged_scorer(model_dir, state, tmp_path / "full")
    with pytest.raises(ValueError, match="num_shards"):
        add_merged_scorer(model_dir, state, tmp_path / "b", num_shards=0)
    with pytest.raises(ValueError, match="layout"):
        add_merged_scorer(model_dir, state, tmp_path / "c", layout="flat")  # type: ignore[arg-type]
    single = add_merged_scorer(model_dir, state, tmp_path / "one", num_shards=1)
    index = json.loads((single / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
