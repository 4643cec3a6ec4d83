"""A tiny, random-weight InternVL (HF format) that transformers and vLLM load like a real model.

:func:`build_tiny_internvl` writes, in a few seconds and without any network access, a model
directory with the layout of ``OpenGVLab/InternVL3-1B-hf``: ``config.json`` (an
``InternVLConfig``, architecture ``InternVLForConditionalGeneration``: an InternViT-style vision
tower with a CLS token and learned absolute position embeddings, a 2x2 pixel shuffle
(``downsample_ratio`` 0.5), a LayerNorm-Linear-GELU-Linear projector and a Qwen2 text model with
1-D RoPE), ``model.safetensors`` (random weights, bit-identical for the same spec and seed), the
byte-level BPE tokenizer of :mod:`tiny_models.tiny_qwen` carrying Qwen2's and InternVL's special
tokens (``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``, exposed as the tokenizer attributes
``start_image_token``, ``end_image_token``, ``context_image_token`` and ``video_token`` that
``InternVLProcessor`` reads), an InternVL-style chat template, the ``InternVLProcessor``
configuration (``GotOcr2ImageProcessor`` with ``crop_to_patches`` and ``InternVLVideoProcessor``)
and a ``generation_config.json``.

An image becomes ``1`` tile when the best tile grid is 1 x 1, else ``cols * rows`` tiles plus a
thumbnail (the whole image resized to one tile, last); every tile gives
:attr:`TinyInternVLSpec.tokens_per_tile` ``<IMG_CONTEXT>`` tokens and the processor writes
``<img>`` + ``<IMG_CONTEXT>`` x (tiles x tokens_per_tile) + ``</img>`` for each image.
:func:`num_image_tokens` gives that count of ``<IMG_CONTEXT>`` tokens for an image size.

Sizes of the default :class:`TinyInternVLSpec`: text hidden 64, 2 layers, 2 query heads and 1 KV
head (head_dim 32, default 1-D RoPE); vision depth 2, hidden 32, 2 heads, tiles of 64 x 64 pixels
cut into 4 x 4 patches (16 x 16 patches, 8 x 8 = 64 tokens per tile after the pixel shuffle); at
most 4 tiles plus a thumbnail, so at most 320 ``<IMG_CONTEXT>`` tokens per image.

Checked with vLLM CPU 0.32.0 (stock engine, ``enforce_eager=True``, ``dtype="float32"``): vLLM
serves the directory with ``InternS1ForConditionalGeneration`` (``interns1.py``, which the
registry maps ``InternVLForConditionalGeneration`` to); with one image and with two images of
different sizes its prompt ids equal transformers' processor's and its greedy tokens and top-5
logprobs equal transformers' float32 ones to about 1.5e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tiny_models.builder_common import (
    INIT_STD,
    fast_tokenizer,
    require_divisible,
    require_dtype,
    special_token_ids,
    text_sizes,
    write_random_model,
)
from tiny_models.tiny_qwen import _chat_token_ids, _train_tokenizer, tiny_image

if TYPE_CHECKING:
    from transformers import InternVLConfig, PreTrainedTokenizerFast

__all__ = [
    "ARCHITECTURE",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TinyInternVLSpec",
    "build_tiny_internvl",
    "num_image_tiles",
    "num_image_tokens",
    "tiny_image",
]

#: ``config.architectures[0]`` (also the transformers model class name).
ARCHITECTURE = "InternVLForConditionalGeneration"

#: Qwen2's and InternVL's special tokens, in the order they get ids (after the BPE vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)

#: The tokenizer attributes ``InternVLProcessor`` reads (``tokenizer.start_image_token``, ...).
_NAMED_TOKENS: dict[str, str] = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

#: InternVL-hf's chat template: no default system prompt, ``<IMG_CONTEXT>\n`` per image part and
#: ``<video>\n`` per video part (``InternVLProcessor`` expands them), ``add_generation_prompt``
#: opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] in ['image', 'image_url', 'image_pil']"
    " or 'image' in content or 'image_url' in content %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' or 'video' in content %}{{ '<video>\n' }}"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_IMAGENET_MEAN = [0.485, 0.456, 0.406]  # InternVL normalises with ImageNet's mean / std
_IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class TinyInternVLSpec:
    """Sizes of the tiny model (float32, about 0.21 M parameters)."""

    # Language model (Qwen2).
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 2
    kv_heads: int = 1  # head_dim = text_hidden / heads = 32
    intermediate: int = 128
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 4096
    # Vision tower (InternViT).
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    #: Side of one square tile in pixels (InternVL3: 448).
    image_size: int = 64
    #: Side of one ViT patch in pixels (InternVL3: 14); image_size / patch_size patches per side.
    patch_size: int = 4
    #: Pixel-shuffle scale: each side of the patch grid shrinks by it (0.5: 2 x 2 patches -> 1).
    downsample_ratio: float = 0.5
    # Tiling (GotOcr2ImageProcessor with crop_to_patches; InternVL3: 1..12).
    min_patches: int = 1
    max_patches: int = 4
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        """Per-head width of the language model's attention."""
        return self.text_hidden // self.heads

    @property
    def tokens_per_tile(self) -> int:
        """``<IMG_CONTEXT>`` tokens per tile: ``(image_size / patch_size * ratio) ** 2``."""
        side = self.image_size // self.patch_size
        return int(side * self.downsample_ratio) ** 2

    def validate(self) -> None:
        """Raise ``ValueError`` when the sizes are inconsistent (transformers / vLLM would fail)."""
        require_divisible(self, "text_hidden", "heads")
        require_divisible(self, "heads", "kv_heads")
        require_divisible(self, "vision_hidden", "vision_heads")
        require_divisible(self, "image_size", "patch_size")
        side = self.image_size // self.patch_size
        scaled = side * self.downsample_ratio
        if scaled != int(scaled) or scaled < 1 or (1 / self.downsample_ratio) % 1:
            raise ValueError(
                f"the patch grid side {side} times downsample_ratio {self.downsample_ratio} must "
                "be a positive integer (pixel shuffle), and 1 / ratio an integer"
            )
        if not 1 <= self.min_patches <= self.max_patches:
            raise ValueError(
                f"need 1 <= min_patches <= max_patches, got {self.min_patches}, {self.max_patches}"
            )
        require_dtype(self.dtype)


_DEFAULT_SPEC = TinyInternVLSpec()


def num_image_tiles(width: int, height: int, spec: TinyInternVLSpec = _DEFAULT_SPEC) -> int:
    """Tiles the processor cuts a ``width`` x ``height`` image into, thumbnail included.

    Uses transformers' ``get_optimal_tiled_canvas`` (``GotOcr2ImageProcessor``'s own rule): a
    ``cols x rows`` grid of ``image_size`` tiles, plus one thumbnail when the grid has more than
    one tile.
    """
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    cols, rows = get_optimal_tiled_canvas(
        (height, width), (spec.image_size, spec.image_size), spec.min_patches, spec.max_patches
    )
    return 1 if cols * rows == 1 else cols * rows + 1


def num_image_tokens(width: int, height: int, spec: TinyInternVLSpec = _DEFAULT_SPEC) -> int:
    """``<IMG_CONTEXT>`` tokens the processor writes for a ``width`` x ``height`` image:
    :func:`num_image_tiles` x :attr:`TinyInternVLSpec.tokens_per_tile` (``<img>`` and ``</img>``
    around them not counted)."""
    return num_image_tiles(width, height, spec) * spec.tokens_per_tile


def _make_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny BPE tokenizer with :data:`SPECIAL_TOKENS`, InternVL's named image tokens and
    the chat template."""
    return fast_tokenizer(
        _train_tokenizer(SPECIAL_TOKENS),
        CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(_NAMED_TOKENS),
    )


def _text_config(
    spec: TinyInternVLSpec, vocab_size: int, token_ids: dict[str, int]
) -> dict[str, Any]:
    """The Qwen2 ``text_config`` (transformers 5.x names, 1-D RoPE)."""
    return {
        "model_type": "qwen2",
        **text_sizes(spec, vocab_size),
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": spec.text_layers,
        "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "initializer_range": INIT_STD,
        "use_cache": True,
        "tie_word_embeddings": False,
        **_chat_token_ids(token_ids),
        "dtype": spec.dtype,
    }


def _vision_config(spec: TinyInternVLSpec) -> dict[str, Any]:
    """The InternViT ``vision_config`` (InternVL3-1B-hf's switches, tiny sizes)."""
    return {
        "hidden_size": spec.vision_hidden,
        "num_hidden_layers": spec.vision_depth,
        "num_attention_heads": spec.vision_heads,
        "intermediate_size": spec.vision_intermediate,
        "attention_bias": True,
        "use_qk_norm": False,
        "hidden_act": "gelu",
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "image_size": [spec.image_size, spec.image_size],
        "patch_size": [spec.patch_size, spec.patch_size],
        "num_channels": 3,
        "use_mask_token": False,
        "use_absolute_position_embeddings": True,
        "layer_scale_init_value": 0.1,
        "use_mean_pooling": True,
        "initializer_range": INIT_STD,
        "dtype": spec.dtype,
    }


def _make_config(
    spec: TinyInternVLSpec, token_ids: dict[str, int], vocab_size: int
) -> InternVLConfig:
    from transformers import InternVLConfig

    config = InternVLConfig(
        text_config=_text_config(spec, vocab_size, token_ids),
        vision_config=_vision_config(spec),
        image_token_id=token_ids["<IMG_CONTEXT>"],
        image_seq_length=spec.tokens_per_tile,
        downsample_ratio=spec.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        dtype=spec.dtype,
    )
    config.architectures = [ARCHITECTURE]
    return config


def _make_processor(spec: TinyInternVLSpec, tokenizer: PreTrainedTokenizerFast) -> Any:
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    size = {"height": spec.image_size, "width": spec.image_size}
    pixels = {"size": size, "image_mean": _IMAGENET_MEAN, "image_std": _IMAGENET_STD}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            **pixels,
            crop_to_patches=True,
            min_patches=spec.min_patches,
            max_patches=spec.max_patches,
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(**pixels),
        image_seq_length=spec.tokens_per_tile,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_internvl(
    path: str | Path, *, seed: int = 0, spec: TinyInternVLSpec = _DEFAULT_SPEC
) -> Path:
    """Write a tiny random-weight InternVL (HF format) model directory to ``path``; return it.

    The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``, the
    tokenizer (``tokenizer.json``, ``tokenizer_config.json``), the processor configuration and
    the chat template, so ``AutoProcessor.from_pretrained``,
    ``InternVLForConditionalGeneration.from_pretrained`` and ``vllm.LLM`` load it as they would
    ``OpenGVLab/InternVL3-1B-hf``. The weights depend only on ``spec`` and ``seed`` (the same
    pair gives bit-identical tensors). transformers initialises the CLS token and the position
    embeddings of the vision tower to zeros; here they are random too, so every vision weight
    matters. Nothing is downloaded.
    """
    from transformers import InternVLForConditionalGeneration

    spec.validate()
    tokenizer = _make_tokenizer()
    token_ids, vocab_size = special_token_ids(tokenizer, SPECIAL_TOKENS)
    return write_random_model(
        path,
        InternVLForConditionalGeneration,
        _make_config(spec, token_ids, vocab_size),
        _make_processor(spec, tokenizer),
        seed=seed,
        dtype=spec.dtype,
        generation=_chat_token_ids(token_ids),
        init=_random_vision_embeddings,
    )


def _random_vision_embeddings(model: Any) -> None:
    """Draw the vision tower's CLS token and position embeddings (transformers zeroes them)."""
    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():
        embeddings.cls_token.normal_(0.0, INIT_STD)
        embeddings.position_embeddings.normal_(0.0, INIT_STD)
