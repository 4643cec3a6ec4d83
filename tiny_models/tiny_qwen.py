"""A tiny, random-weight Qwen2.5-VL that transformers and vLLM load like a real checkpoint.

:func:`build_tiny_qwen25_vl` writes, in a few seconds and without any network access, a model
directory with the same layout as ``Qwen/Qwen2.5-VL-7B-Instruct``: ``config.json`` (a
``Qwen2_5_VLConfig`` with M-RoPE), ``model.safetensors`` (random weights, bit-identical for the
same seed), a byte-level BPE tokenizer trained on a few built-in sentences that carries Qwen's
special tokens, a Qwen-style chat template, the ``Qwen2_5_VLProcessor`` configuration (image and
video processors) and a ``generation_config.json``.

:func:`add_merged_scorer` turns such a directory into the layout of the published VisionSelector
checkpoints (``JulietChoo/VisionSelector-Qwen2.5-VL-7B``): the backbone weights plus
``model.visual.importance_scorer.{q,k}_proj.{weight,bias}``, sharded, with a
``model.safetensors.index.json``.

:func:`tiny_image` makes deterministic test images and :func:`num_image_tokens` says how many
merged image tokens (``<|image_pad|>`` placeholders) the processor produces for an image size.

Sizes of the default :class:`TinyQwenSpec`: text hidden 64, 2 layers, 2 query heads and 1 KV head
(head_dim 32, ``mrope_section`` (4, 6, 6): vLLM asserts ``sum == head_dim / 2``); vision depth 2,
hidden 32, merger output 64; at most 64 merged tokens per image.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from tiny_models.builder_common import (
    INIT_STD,
    fast_tokenizer,
    require_divisible,
    require_dtype,
    require_increasing,
    require_mrope_sum,
    require_vision_heads,
    special_token_ids,
    text_sizes,
    vision_sizes,
    write_random_model,
)
from vs_vllm.sample_image import sample_image

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TinyQwenSpec",
    "add_merged_scorer",
    "build_tiny_qwen25_vl",
    "num_image_tokens",
    "tiny_image",
    "tiny_video",
    "tiny_video_metadata",
]

#: Qwen2.5-VL's special tokens, in the order they get ids (after the BPE vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Qwen2.5-VL's chat template (system prompt by default, one ``<|vision_start|><|image_pad|>
#: <|vision_end|>`` per image part, ``add_generation_prompt`` opens the assistant turn).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] in ['image', 'image_url', 'image_pil']"
    " or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "Describe this image in one sentence.",
    "What is in the picture? There is a red car parked next to a small green house.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A cat is sleeping on a blue sofa while the sun shines through the window.",
    "Two children are playing football in the park on a sunny afternoon.",
    "The chart shows the number of visitors per month; the highest value is in July.",
    "Please answer the question about the image: how many people can you see?",
    "There are three apples, two bananas and one orange on the wooden table.",
    "The mountain is covered with snow and the sky above it is clear and bright.",
    "Read the text in the image and tell me what the sign says.",
    "A man in a black jacket is riding a bicycle down a busy city street.",
    "The document contains a table with columns for name, date, amount and total.",
    "Birds fly over the lake at sunset, and the water reflects the orange light.",
    "Is the object on the left larger than the object on the right? Yes, it is.",
    "The kitchen has a white fridge, a gas stove and a sink under the window.",
    "Count the red squares in the grid and report the answer as a number.",
    "An old train crosses a stone bridge in the green valley between the hills.",
    "She is holding an umbrella because it is raining heavily outside the station.",
    "The screenshot shows a settings page with buttons, menus and a search box.",
    "1 2 3 4 5 6 7 8 9 10 100 1000 0.5 3.14 2025",
)

_TOKENIZER_VOCAB_SIZE = 768  # BPE target: 256 byte symbols + merges (fewer if the corpus runs out)


@dataclass(frozen=True)
class TinyQwenSpec:
    """Sizes of the tiny model (defaults: about 0.26 M parameters, float32)."""

    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 2
    kv_heads: int = 1  # head_dim = text_hidden / heads = 32
    intermediate: int = 128
    mrope_section: tuple[int, int, int] = (4, 6, 6)  # vLLM asserts sum == head_dim / 2
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 64  # at most 64 merged tokens per image
    max_position_embeddings: int = 4096
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        """Per-head width of the language model's attention."""
        return self.text_hidden // self.heads

    def validate(self) -> None:
        """Raise ``ValueError`` when the sizes are inconsistent (vLLM would reject them later)."""
        require_divisible(self, "text_hidden", "heads")
        require_divisible(self, "heads", "kv_heads")
        require_mrope_sum(self, "mrope_section", "head_dim", self.head_dim)
        require_vision_heads(self)
        require_increasing(self, "min_pixels", "max_pixels")
        require_dtype(self.dtype)


_DEFAULT_SPEC = TinyQwenSpec()


def num_image_tokens(width: int, height: int, spec: TinyQwenSpec = _DEFAULT_SPEC) -> int:
    """Merged image tokens N (``<|image_pad|>`` placeholders) for a ``width`` x ``height`` image.

    Uses transformers' ``smart_resize`` (the Qwen2-VL image processor's own resize rule) with the
    spec's pixel bounds, then divides the resized area by ``(patch_size * merge_size) ** 2``.
    """
    return _smart_resize_tokens(width, height, spec)


def _smart_resize_tokens(width: int, height: int, spec: Any) -> int:
    """Merged tokens of an image under the Qwen2-VL resize rule (Qwen3-VL keeps it) for a spec
    with ``patch_size``, ``spatial_merge_size``, ``min_pixels`` and ``max_pixels``."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    factor = spec.patch_size * spec.spatial_merge_size
    resized_h, resized_w = smart_resize(
        height, width, factor=factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels
    )
    return (resized_h // factor) * (resized_w // factor)


def tiny_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image: the product's sample picture (``vs_vllm.sample_image``), so
    quickstart's default image has these token counts."""
    return sample_image(width, height, seed)


def tiny_video(num_frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic (T, H, W, 3) uint8 video: :func:`tiny_image` frames of seeds
    ``seed * 1000 + t``, so every frame differs."""
    frames = [
        np.asarray(tiny_image(width, height, seed=seed * 1000 + t)) for t in range(num_frames)
    ]
    return np.stack(frames)


def tiny_video_metadata(num_frames: int, fps: float = 2.0) -> dict[str, Any]:
    """The metadata vLLM and transformers take with a decoded video (every frame sampled)."""
    return {
        "total_num_frames": num_frames,
        "fps": fps,
        "duration": num_frames / fps,
        "video_backend": "opencv",
        "frames_indices": list(range(num_frames)),
    }


def _train_tokenizer(special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Byte-level BPE trained on :data:`_CORPUS`, with ``special_tokens`` (default
    :data:`SPECIAL_TOKENS`) appended in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_CORPUS), trainer=trainer)
    tokenizer.add_special_tokens(list(special_tokens))
    return tokenizer


def _make_tokenizer() -> PreTrainedTokenizerFast:
    """The trained tokenizer as transformers' fast tokenizer, with the chat template set."""
    return fast_tokenizer(
        _train_tokenizer(),
        CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[
            t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")
        ],
    )


def _chat_token_ids(token_ids: Mapping[str, int]) -> dict[str, int]:
    """The bos / eos / pad ids of a Qwen chat tokenizer (``<|endoftext|>``, ``<|im_end|>``), as
    the model and generation configs take them."""
    return {
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
    }


def _vision_token_kwargs(token_ids: Mapping[str, int]) -> dict[str, Any]:
    """The top-level config arguments of a Qwen-VL model naming its special tokens (untied
    embeddings)."""
    return {
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        **_chat_token_ids(token_ids),
    }


def spec_text_config(
    spec: TinyQwenSpec, vocab_size: int, bos_token_id: int, eos_token_id: int
) -> dict[str, Any]:
    """The language model's ``text_config`` fields for ``spec`` (transformers 5.x names)."""
    return {
        **text_sizes(spec, vocab_size),
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": spec.text_layers,
        "attention_dropout": 0.0,
        "rope_parameters": {
            "rope_type": "default",
            "type": "mrope",
            "mrope_section": list(spec.mrope_section),
            "rope_theta": 1000000.0,
        },
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def spec_vision_config(spec: TinyQwenSpec) -> dict[str, Any]:
    """The vision tower's ``vision_config`` fields for ``spec``; the merger outputs text_hidden."""
    return {
        **vision_sizes(spec),
        "hidden_act": "silu",
        "tokens_per_second": 2,
        "window_size": 112,
        "fullatt_block_indexes": [spec.vision_depth - 1],
    }


def _make_config(
    spec: TinyQwenSpec, token_ids: Mapping[str, int], vocab_size: int
) -> Qwen2_5_VLConfig:
    """The model config: M-RoPE text model, vision tower whose merger outputs text_hidden."""
    from transformers import Qwen2_5_VLConfig

    text_config = {
        **spec_text_config(spec, vocab_size, token_ids["<|endoftext|>"], token_ids["<|im_end|>"]),
        "initializer_range": INIT_STD,
        "use_cache": True,
        "pad_token_id": token_ids["<|endoftext|>"],
        "dtype": spec.dtype,
    }
    vision_config = {
        **spec_vision_config(spec),
        "initializer_range": INIT_STD,
        "dtype": spec.dtype,
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        **_vision_token_kwargs(token_ids),
        dtype=spec.dtype,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def _make_processor(spec: TinyQwenSpec, tokenizer: PreTrainedTokenizerFast) -> Any:
    """``Qwen2_5_VLProcessor``: Qwen2-VL image and video processors with the spec's pixel bounds."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixel_kwargs = {
        "min_pixels": spec.min_pixels,
        "max_pixels": spec.max_pixels,
        "patch_size": spec.patch_size,
        "merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
    }
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixel_kwargs),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixel_kwargs, cap_pixels_per_frame=False),
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_qwen25_vl(
    out_dir: str | Path, spec: TinyQwenSpec = _DEFAULT_SPEC, seed: int = 0
) -> Path:
    """Write a tiny random-weight Qwen2.5-VL model directory to ``out_dir`` and return its path.

    The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``, the
    tokenizer (``tokenizer.json``, ``tokenizer_config.json``), the processor configuration and the
    chat template, so ``AutoProcessor.from_pretrained``,
    ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` and ``vllm.LLM`` load it as they would
    ``Qwen/Qwen2.5-VL-7B-Instruct``. The weights depend only on ``spec`` and ``seed`` (the same
    pair gives bit-identical tensors). Nothing is downloaded.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    spec.validate()
    tokenizer = _make_tokenizer()
    token_ids, vocab_size = special_token_ids(tokenizer, SPECIAL_TOKENS)
    return write_random_model(
        out_dir,
        Qwen2_5_VLForConditionalGeneration,
        _make_config(spec, token_ids, vocab_size),
        _make_processor(spec, tokenizer),
        seed=seed,
        dtype=spec.dtype,
        generation=_chat_token_ids(token_ids),
    )


def _read_safetensors_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (one ``model.safetensors`` or an indexed set of shards)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(model_dir / name, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key in tensors:
                    raise ValueError(f"tensor {key!r} appears twice in {model_dir}")
                tensors[key] = handle.get_tensor(key)
    return tensors


def _nested_key(key: str) -> str:
    """Map a legacy Qwen2.5-VL checkpoint key to transformers' nested module name."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key.removeprefix("model.")
    return key


def add_merged_scorer(
    model_dir: str | Path,
    scorer_state: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    prefix: str = "model.visual.importance_scorer.",
    num_shards: int = 2,
    *,
    layout: Literal["auto", "legacy", "nested"] = "auto",
) -> Path:
    """Copy ``model_dir`` to ``out_dir`` with the scorer merged into a sharded checkpoint.

    ``scorer_state`` holds ``q_proj.weight``, ``q_proj.bias``, ``k_proj.weight`` and
    ``k_proj.bias``; they are stored as ``prefix + key`` beside every backbone tensor, split over
    ``num_shards`` files ``model-0000i-of-0000n.safetensors`` (keys in sorted order, shards of
    about equal bytes) with a ``model.safetensors.index.json`` — the layout of the published
    VisionSelector checkpoints. Non-weight files (config, tokenizer, processor) are copied as they
    are. ``out_dir`` must not exist yet or be empty. Returns ``out_dir``.

    ``layout`` names the backbone keys. transformers 5 saves Qwen2.5-VL under the hub's legacy
    names (``visual.*``, ``model.layers.*``, ``model.embed_tokens.*``, ``lm_head.*``), while
    transformers 4.52-4.57 saved its nested module names (``model.visual.*``,
    ``model.language_model.*``, ``lm_head.*``), which is where a ``model.visual.importance_scorer.``
    prefix comes from. ``"legacy"`` writes the backbone keys as ``model_dir`` holds them,
    ``"nested"`` renames legacy keys to the nested names, and ``"auto"`` (default) picks
    ``"nested"`` when ``prefix`` starts with ``model.visual.`` and ``"legacy"`` otherwise, so the
    checkpoint is consistent. Both transformers and vLLM load either naming.
    """
    src = Path(model_dir)
    out = Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"model directory {src} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    required = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
    missing = [key for key in required if key not in scorer_state]
    extra = sorted(set(scorer_state) - set(required))
    if missing or extra:
        raise ValueError(
            f"scorer_state must hold exactly {required}; missing {missing}, unexpected {extra}"
        )

    if layout not in ("auto", "legacy", "nested"):
        raise ValueError(f"layout must be 'auto', 'legacy' or 'nested', got {layout!r}")
    if layout == "auto":
        layout = "nested" if prefix.startswith("model.visual.") else "legacy"

    tensors = _read_safetensors_dir(src)
    if layout == "nested":
        tensors = {_nested_key(key): value for key, value in tensors.items()}
    for key in required:
        full_key = prefix + key
        if full_key in tensors:
            raise ValueError(f"{src} already holds {full_key!r}")
        tensors[full_key] = (
            scorer_state[key].detach().to("cpu").contiguous().clone()
        )  # ok-sync: writing a test model
    if not 1 <= num_shards <= len(tensors):
        raise ValueError(f"num_shards must be in [1, {len(tensors)}], got {num_shards}")

    out.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.name.endswith(".safetensors") or item.name == "model.safetensors.index.json":
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)

    keys = sorted(tensors)
    total = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
    # Contiguous runs of sorted keys of about total / num_shards bytes each, none empty.
    shards: list[list[str]] = [[]]
    written = 0
    for i, key in enumerate(keys):
        to_open = num_shards - len(shards)
        full = written >= total * len(shards) / num_shards
        if shards[-1] and to_open and (full or len(keys) - i <= to_open):
            shards.append([])
        shards[-1].append(key)
        written += tensors[key].numel() * tensors[key].element_size()
    weight_map: dict[str, str] = {}
    for j, shard_keys in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(
            {k: tensors[k] for k in sorted(shard_keys)}, out / name, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(shard_keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
