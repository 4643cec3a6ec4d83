"""Checks the tiny-model builder tests (``tests/test_tiny_*.py``) share: the fixtures that build a
model directory and load it with stock transformers, the files every directory holds, its config's
special-token ids, seeded weights, and a forward pass / greedy generation."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from safetensors import safe_open

from tiny_models.tiny_qwen import tiny_image

V = TypeVar("V")

#: The files of every tiny model directory (what the published checkpoints ship).
CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "chat_template.jinja",
)
PROMPT = "Describe this image."
#: config.json fields that hold a special token's id (Qwen-VL names).
QWEN_VL_TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
#: Image sizes (width, height) whose placeholder counts are checked against the processor.
IMAGE_SIZES = [(300, 200), (120, 250), (56, 56), (16, 16), (1000, 40), (2000, 1500)]


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``model_dir``."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = handle.get_tensor(key)
    return tensors


def read_json(model_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((model_dir / name).read_text())


def user_message(*parts: dict, text: str = PROMPT) -> list[dict]:
    """One user turn: ``parts`` (images, videos) then ``text``."""
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def single_model_fixtures(name: str, build: Callable[[Path], Path], architecture: str):
    """Module-scoped fixtures ``model_dir`` (``build`` into a fresh directory), ``processor``
    (``AutoProcessor``) and ``hf_model`` (the transformers class ``architecture``, eval mode);
    assign them to those names in the test module."""

    @pytest.fixture(scope="module")
    def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return build(tmp_path_factory.mktemp(name) / "model")

    @pytest.fixture(scope="module")
    def processor(model_dir: Path):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_dir)

    @pytest.fixture(scope="module")
    def hf_model(model_dir: Path):
        import transformers

        return getattr(transformers, architecture).from_pretrained(model_dir).eval()

    return model_dir, processor, hf_model


def variant_fixtures(
    name: str,
    build: Callable[[Path, V], Path],
    variants: Sequence[V],
    ids: Sequence[str],
    model_class: Callable[[V], type],
):
    """Session-scoped fixtures ``model_dirs``, ``processors`` and ``models``: dicts keyed by
    variant of the directories ``build(path, variant)`` wrote (sub-directories named by ``ids``),
    their ``AutoProcessor`` and their ``model_class(variant)`` models (eval mode); assign them to
    those names in the test module."""

    @pytest.fixture(scope="session")
    def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[V, Path]:
        root = tmp_path_factory.mktemp(name)
        return {v: build(root / i, v) for v, i in zip(variants, ids, strict=True)}

    @pytest.fixture(scope="session")
    def processors(model_dirs: dict[V, Path]) -> dict[V, Any]:
        from transformers import AutoProcessor

        return {v: AutoProcessor.from_pretrained(d) for v, d in model_dirs.items()}

    @pytest.fixture(scope="session")
    def models(model_dirs: dict[V, Path]) -> dict[V, torch.nn.Module]:
        return {v: model_class(v).from_pretrained(d).eval() for v, d in model_dirs.items()}

    return model_dirs, processors, models


def checked_config(
    model_dir: Path,
    tokenizer: Any,
    special_tokens: Sequence[str],
    architecture: str,
    token_fields: Mapping[str, str],
    model_type: str | None = None,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Assert ``model_dir`` holds :data:`CHECKPOINT_FILES`, the tokenizer gives every special
    token its own id, and ``config.json`` names ``architecture`` (and ``model_type``), sets each
    field of ``token_fields`` to its token's id and has room for the whole vocabulary. Returns
    the config and the special tokens' ids."""
    for file in CHECKPOINT_FILES:
        assert (model_dir / file).is_file(), file
    config = read_json(model_dir, "config.json")
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in special_tokens}
    assert len(set(ids.values())) == len(special_tokens)
    assert config["architectures"] == [architecture]
    if model_type is not None:
        assert config["model_type"] == model_type
    for field, token in token_fields.items():
        assert config[field] == ids[token], field
    assert config["text_config"]["vocab_size"] >= len(tokenizer)
    return config, ids


def assert_mrope_fits(text_config: Mapping[str, Any]) -> None:
    """The M-RoPE sections cover the rotated half of a head (vLLM asserts this)."""
    rope = text_config["rope_parameters"]
    head_dim = text_config.get(
        "head_dim", text_config["hidden_size"] // text_config["num_attention_heads"]
    )
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    assert sum(rope["mrope_section"]) * 2 == rotary_dim


def assert_tokenizer_round_trips(tokenizer: Any, ids: Mapping[str, int]) -> None:
    """Every special token is one id and is not split by the byte-level pre-tokenizer; text
    decodes back to itself."""
    for tok, tok_id in ids.items():
        assert tokenizer.encode(tok, add_special_tokens=False) == [tok_id]
    assert tokenizer.decode(tokenizer.encode("Hello, wörld 123!")) == "Hello, wörld 123!"


def assert_seeded_weights(
    build: Callable[[Path, int], Path], model_dir: Path, tmp_path: Path
) -> dict[str, torch.Tensor]:
    """``build(path, seed)`` with seed 0 gives the float32 weights of ``model_dir`` (built with
    seed 0) bit for bit and the same other files; seed 1 gives other weights. Returns the
    weights of ``model_dir``."""
    again = build(tmp_path / "again", 0)
    ref, same = read_weights(model_dir), read_weights(again)
    diff = read_weights(build(tmp_path / "other", 1))
    assert ref.keys() == same.keys() == diff.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert any(not torch.equal(ref[k], diff[k]) for k in ref)
    assert all(t.dtype == torch.float32 for t in ref.values())
    for name in CHECKPOINT_FILES:
        if name != "model.safetensors":
            assert (model_dir / name).read_bytes() == (again / name).read_bytes(), name
    return ref


def forward_logits(model: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The model's logits for ``inputs`` (a batch of one): one finite row per prompt token."""
    with torch.no_grad():
        logits = model(**inputs).logits
    vocab_size = model.config.text_config.vocab_size
    assert logits.shape == (1, inputs["input_ids"].shape[1], vocab_size)
    assert torch.isfinite(logits).all()
    return logits


def greedy_new_tokens(model: Any, inputs: Mapping[str, Any], max_new_tokens: int) -> list[int]:
    """The tokens greedy generation appends to the prompt of ``inputs`` (a batch of one)."""
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    assert out.shape[0] == 1 and prompt_len < out.shape[1] <= prompt_len + max_new_tokens
    return out[0, prompt_len:].tolist()


def check_num_image_tokens(
    processor: Any, size: tuple[int, int], token_id: int, expected: int, merge_size: int
) -> None:
    """The processor writes ``expected`` placeholders ``token_id`` for one ``size`` image, one per
    ``merge_size ** 2`` patches of its grid."""
    text = processor.apply_chat_template(
        user_message({"type": "image"}), add_generation_prompt=True
    )
    inputs = processor(text=[text], images=[tiny_image(*size)], return_tensors="pt")
    assert int((inputs["input_ids"] == token_id).sum()) == expected
    assert int(inputs["image_grid_thw"].prod()) // merge_size**2 == expected
