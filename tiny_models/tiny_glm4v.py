"""Tiny, random-weight GLM-4.1V / GLM-4.5V models that transformers and vLLM load like checkpoints.

:func:`build_tiny_glm4v` writes, in a few seconds and without any network access, a model
directory with the layout of a published GLM-4.xV checkpoint:

* ``moe=False``: ``zai-org/GLM-4.1V-9B-Thinking`` (``Glm4vConfig``, architecture
  ``Glm4vForConditionalGeneration``): a GLM-4 text model (q/k/v biases, four RMS norms per layer,
  partial M-RoPE on half of each head, GPT-J style interleaved rotary pairs) and a vision tower
  with 2-D rotary attention, a learned (bicubically resampled) position grid, a 2x2 conv
  downsample and a gated merger whose output width is the text hidden size;
* ``moe=True``: ``zai-org/GLM-4.5V`` (``Glm4vMoeConfig``, architecture
  ``Glm4vMoeForConditionalGeneration``): the same with a sigmoid-routed sparse-MoE MLP (plus a
  shared expert) in every text layer after the first ``first_k_dense_replace``.

Each directory holds ``config.json``, ``model.safetensors`` (random weights, bit-identical for
the same spec, seed and variant), ``generation_config.json``, the byte-level BPE tokenizer of
:mod:`tiny_models.tiny_qwen` carrying GLM-4.1V's special tokens (:data:`SPECIAL_TOKENS`, in
GLM's order, so ``<|begin_of_image|>`` ... ``<|video|>`` keep GLM's relative ids), GLM-4.1V's
chat template (:data:`CHAT_TEMPLATE`: ``[gMASK]<sop>``, ``<|user|>`` / ``<|assistant|>`` turns,
``<|begin_of_image|><|image|><|end_of_image|>`` per image and
``<|begin_of_video|><|video|><|end_of_video|>`` per video) and the ``Glm4vProcessor``
configuration (``Glm4vImageProcessor`` and ``Glm4vVideoProcessor``).

GLM's processor expands an image's ``<|image|>`` into ``N`` ``<|image|>`` tokens and a video's
``<|video|>`` into, per temporal patch (2 frames), ``<|begin_of_image|>`` + ``<|image|>`` * n +
``<|end_of_image|>`` + the frame's second as text (e.g. ``0``, ``1``): video frames use the
image token too (``config.video_token_id`` never reaches the model).

:func:`num_image_tokens` says how many merged image tokens (``<|image|>`` placeholders) the
processor produces for an image size; :func:`~tiny_models.tiny_qwen.tiny_image` and
:func:`~tiny_models.tiny_qwen.tiny_video` (re-exported) make deterministic test media.

Sizes of the default :class:`TinyGlm4vSpec`: text hidden 64, 2 layers, 2 query heads and 1 KV
head of head_dim 32, ``partial_rotary_factor`` 0.5 (rotary dim 16) and ``mrope_section``
(2, 3, 3) (GLM-4.1V's (8, 12, 12) scaled down; vLLM asserts ``sum == rotary_dim / 2``); vision
depth 2, hidden 32, patch 14, merge 2, temporal patch 2, an 8 x 8 learned position grid; at most
64 merged tokens per image and a 256 * 28 * 28 pixel budget per video (all frames together).

Checked with vLLM CPU 0.32.0 (stock engine, ``VLLM_PLUGINS=""``, ``enforce_eager=True``,
float32, ``max_model_len=2048``): both variants serve an image, a video and an image + video +
image prompt offline with the same prompt token ids as transformers' processor, and their greedy
tokens and logprobs equal transformers' float32 ones to about 1e-6. vLLM's ``Glm4vProcessor``
path reads ``metadata["do_sample_frames"]`` of an offline ``(frames, metadata)`` video item
(``KeyError`` without it): pass :func:`vllm_video_metadata`.
transformers 5.19 itself cannot run images and a video in one prompt from ``input_ids`` (its
placeholder check counts the video frames' ``<|image|>`` tokens as image tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from tiny_models.tiny_qwen import _train_tokenizer, tiny_image, tiny_video, tiny_video_metadata

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TinyGlm4vSpec",
    "build_tiny_glm4v",
    "model_class",
    "num_image_tokens",
    "tiny_image",
    "tiny_video",
    "tiny_video_metadata",
    "vllm_video_metadata",
]

#: ``config.architectures[0]`` (also the transformers model class name) for ``moe`` False / True.
ARCHITECTURES: dict[bool, str] = {
    False: "Glm4vForConditionalGeneration",
    True: "Glm4vMoeForConditionalGeneration",
}

#: GLM-4.1V's special tokens in the order of their ids in the real tokenizer (151329 ... 151344
#: there; here they follow the BPE vocabulary). ``<think>`` / ``</think>`` come after them.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<think>",
    "</think>",
)

#: GLM-4.1V-9B-Thinking's chat template (``[gMASK]<sop>`` prefix, one
#: ``<|begin_of_image|><|image|><|end_of_image|>`` per image part and
#: ``<|begin_of_video|><|video|><|end_of_video|>`` per video part, ``add_generation_prompt``
#: opens the assistant turn with ``<|assistant|>\n``). No system prompt is added.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for msg in messages %}"
    "{%- if msg.role == 'system' %}"
    "<|system|>\n{{ msg.content }}"
    "{%- elif msg.role == 'user' %}"
    "<|user|>{{ '\\n' }}"
    "{%- if msg.content is string %}{{ msg.content }}"
    "{%- else %}{%- for item in msg.content %}"
    "{%- if item.type == 'video' or 'video' in item %}"
    "<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item.type in ['image', 'image_url', 'image_pil'] or 'image' in item %}"
    "<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}"
    "{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{%- elif msg.role == 'assistant' %}"
    "{%- if msg.metadata %}<|assistant|>{{ msg.metadata }}\n{{ msg.content }}"
    "{%- else %}<|assistant|>\n{{ msg.content }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

#: GLM-4.1V's generation_config stops at any of these.
_EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


@dataclass(frozen=True)
class TinyGlm4vSpec:
    """Sizes of the tiny models (float32; about 0.2-0.3 M parameters per variant)."""

    # Language model.
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32
    intermediate: int = 128
    #: GLM rotates the first half of each head (vLLM's Glm4Attention defaults to 0.5 too).
    partial_rotary_factor: float = 0.5
    #: Non-interleaved M-RoPE sections (T, H, W) over the rotary half; the sum must be
    #: ``head_dim * partial_rotary_factor / 2`` (GLM-4.1V: (8, 12, 12) of head_dim 128).
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    rope_theta: float = 10_000.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    # MoE text model (moe=True, GLM-4.5V layout).
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate: int = 16
    n_shared_experts: int = 1
    #: Text layers before this index keep a dense MLP (GLM-4.5V: 1).
    first_k_dense_replace: int = 1
    # Vision tower.
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    #: Width of the merger's gated MLP (the vision blocks' MLP width is ``text_hidden``, as in
    #: GLM where it is ``out_hidden_size``).
    vision_intermediate: int = 64
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    #: Side of the learned position grid in patches (``image_size = grid * patch_size``).
    position_grid: int = 8
    #: Merged-token bounds per image (GLM's smart_resize counts ``temporal_patch_size`` frames
    #: for an image, so the processor's pixel bounds are these times ``factor**2 * tps``).
    min_image_tokens: int = 4
    max_image_tokens: int = 64
    #: Pixel budget of a whole video (frames x height x width, GLM's smart_resize).
    video_max_pixels: int = 28 * 28 * 256
    video_min_pixels: int = 28 * 28 * 8
    dtype: str = "float32"

    @property
    def factor(self) -> int:
        """Pixels per merged token along each side (``patch_size * spatial_merge_size``)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per text head."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def min_pixels(self) -> int:
        """The image processor's ``size["shortest_edge"]`` (a pixel area, GLM's naming)."""
        return self.min_image_tokens * self.factor**2 * self.temporal_patch_size

    @property
    def max_pixels(self) -> int:
        """The image processor's ``size["longest_edge"]`` (a pixel area, GLM's naming)."""
        return self.max_image_tokens * self.factor**2 * self.temporal_patch_size

    def validate(self, moe: bool = False) -> None:
        """Raise ``ValueError`` when the sizes are inconsistent (vLLM would reject them later)."""
        require_divisible(self, "heads", "kv_heads")
        if not moe and self.heads * self.head_dim != self.text_hidden:
            raise ValueError(
                f"the dense GLM-4.1V text model has no head_dim field: heads * head_dim "
                f"({self.heads * self.head_dim}) must equal text_hidden ({self.text_hidden})"
            )
        # An odd rotary_dim never equals twice the sum, so this also rules it out.
        require_mrope_sum(self, "mrope_section", "rotary_dim", self.rotary_dim)
        if moe:
            require_increasing(self, "num_experts_per_tok", "num_experts")
            if not 0 <= self.first_k_dense_replace < self.text_layers:
                raise ValueError(
                    f"first_k_dense_replace {self.first_k_dense_replace} leaves no MoE layer "
                    f"among {self.text_layers}"
                )
        require_vision_heads(self)
        if self.position_grid < 2:
            raise ValueError(f"position_grid must be >= 2, got {self.position_grid}")
        require_increasing(self, "min_image_tokens", "max_image_tokens")
        require_increasing(self, "video_min_pixels", "video_max_pixels")
        require_dtype(self.dtype)


_DEFAULT_SPEC = TinyGlm4vSpec()


def num_image_tokens(width: int, height: int, spec: TinyGlm4vSpec = _DEFAULT_SPEC) -> int:
    """Merged image tokens N (``<|image|>`` placeholders) for a ``width`` x ``height`` image.

    Uses GLM-4.1V's ``smart_resize`` (the ``Glm4vImageProcessor`` resize rule: an image counts
    as ``temporal_patch_size`` frames against the pixel bounds) with factor ``patch_size *
    spatial_merge_size`` (28), then divides the resized area by ``factor ** 2``.
    """
    from transformers.models.glm4v.image_processing_glm4v import smart_resize

    resized_h, resized_w = smart_resize(
        num_frames=spec.temporal_patch_size,
        height=height,
        width=width,
        temporal_factor=spec.temporal_patch_size,
        factor=spec.factor,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
    )
    return (resized_h // spec.factor) * (resized_w // spec.factor)


def vllm_video_metadata(num_frames: int, fps: float = 2.0) -> dict[str, Any]:
    """:func:`~tiny_models.tiny_qwen.tiny_video_metadata` plus ``do_sample_frames=False``: the
    metadata of an offline vLLM ``(frames, metadata)`` video item for GLM-4.1V (vLLM's
    ``Glm4vProcessingInfo._get_video_second_idx_glm4v`` reads that key and raises ``KeyError``
    without it). transformers takes the same frames with ``do_sample_frames=False``."""
    return {**tiny_video_metadata(num_frames, fps), "do_sample_frames": False}


def model_class(moe: bool = False) -> type:
    """The transformers model class (``Glm4vForConditionalGeneration`` or the MoE one)."""
    import transformers

    return getattr(transformers, ARCHITECTURES[bool(moe)])


def _make_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny BPE of :mod:`tiny_models.tiny_qwen` with GLM's special tokens and template."""
    return fast_tokenizer(
        _train_tokenizer(SPECIAL_TOKENS),
        CHAT_TEMPLATE,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
    )


def _generation_token_ids(token_ids: dict[str, int]) -> dict[str, Any]:
    """GLM-4.1V's bos (``[gMASK]``), eos (any of :data:`_EOS_TOKENS`) and pad ids."""
    return {
        "bos_token_id": token_ids["[gMASK]"],
        "eos_token_id": [token_ids[t] for t in _EOS_TOKENS],
        "pad_token_id": token_ids["<|endoftext|>"],
    }


def _vision_config(spec: TinyGlm4vSpec) -> dict[str, Any]:
    """The vision tower's ``vision_config`` fields; the merger outputs ``text_hidden``."""
    return {
        **vision_sizes(spec),
        "hidden_act": "silu",
        "attention_bias": False,
        "image_size": spec.position_grid * spec.patch_size,
        "rms_norm_eps": spec.rms_norm_eps,
        "initializer_range": INIT_STD,
        "dtype": spec.dtype,
    }


def _text_config(
    spec: TinyGlm4vSpec, moe: bool, vocab_size: int, token_ids: dict[str, int]
) -> dict[str, Any]:
    """The language model's ``text_config`` fields (transformers 5.x names)."""
    config: dict[str, Any] = {
        **text_sizes(spec, vocab_size),
        "rms_norm_eps": spec.rms_norm_eps,
        # transformers' dense GLM-4.1V attention always has q/k/v biases; vLLM reads this flag.
        "attention_bias": True,
        "attention_dropout": 0.0,
        "initializer_range": INIT_STD,
        "use_cache": True,
        "pad_token_id": token_ids["<|endoftext|>"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": spec.rope_theta,
            "mrope_section": list(spec.mrope_section),
            "partial_rotary_factor": spec.partial_rotary_factor,
        },
        "dtype": spec.dtype,
    }
    if moe:
        config.update(
            {
                "head_dim": spec.head_dim,
                "use_qk_norm": False,
                "tie_word_embeddings": False,
                "moe_intermediate_size": spec.moe_intermediate,
                "num_experts_per_tok": spec.num_experts_per_tok,
                "n_routed_experts": spec.num_experts,
                "n_shared_experts": spec.n_shared_experts,
                "routed_scaling_factor": 1.0,
                "n_group": 1,
                "topk_group": 1,
                "first_k_dense_replace": spec.first_k_dense_replace,
                "norm_topk_prob": True,
                **_generation_token_ids(token_ids),  # pad_token_id: the same as above
            }
        )
    return config


def _make_config(
    spec: TinyGlm4vSpec, moe: bool, token_ids: dict[str, int], vocab_size: int
) -> PretrainedConfig:
    """The model config with the tokenizer's special-token ids."""
    import transformers

    config_cls = transformers.Glm4vMoeConfig if moe else transformers.Glm4vConfig
    config = config_cls(
        text_config=_text_config(spec, moe, vocab_size, token_ids),
        vision_config=_vision_config(spec),
        image_token_id=token_ids["<|image|>"],
        video_token_id=token_ids["<|video|>"],
        image_start_token_id=token_ids["<|begin_of_image|>"],
        image_end_token_id=token_ids["<|end_of_image|>"],
        video_start_token_id=token_ids["<|begin_of_video|>"],
        video_end_token_id=token_ids["<|end_of_video|>"],
        tie_word_embeddings=False,
        dtype=spec.dtype,
    )
    config.architectures = [ARCHITECTURES[moe]]
    return config


def _make_processor(spec: TinyGlm4vSpec, tokenizer: Any) -> Any:
    """``Glm4vProcessor`` with GLM's image and video processors and small pixel budgets."""
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    common = {
        "patch_size": spec.patch_size,
        "merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
    }
    image_processor = Glm4vImageProcessor(
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}, **common
    )
    video_processor = Glm4vVideoProcessor(
        size={"shortest_edge": spec.video_min_pixels, "longest_edge": spec.video_max_pixels},
        max_image_size={"longest_edge": spec.video_max_pixels},
        fps=2,
        **common,
    )
    return Glm4vProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_glm4v(
    path: str | Path,
    *,
    moe: bool = False,
    seed: int = 0,
    spec: TinyGlm4vSpec = _DEFAULT_SPEC,
) -> Path:
    """Write a tiny random-weight GLM-4.1V (``moe=True``: GLM-4.5V) model directory; return it.

    The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``, the
    tokenizer (``tokenizer.json``, ``tokenizer_config.json``), the processor configuration and
    the chat template, so ``AutoProcessor.from_pretrained``, ``<ARCHITECTURES[moe]>
    .from_pretrained`` and ``vllm.LLM`` load it as they would the published checkpoint. The
    weights depend only on ``spec``, ``seed`` and ``moe`` (the same triple gives bit-identical
    tensors). Nothing is downloaded.
    """
    moe = bool(moe)
    spec.validate(moe)
    tokenizer = _make_tokenizer()
    token_ids, vocab_size = special_token_ids(tokenizer, SPECIAL_TOKENS)
    return write_random_model(
        path,
        model_class(moe),
        _make_config(spec, moe, token_ids, vocab_size),
        _make_processor(spec, tokenizer),
        seed=seed,
        dtype=spec.dtype,
        generation=_generation_token_ids(token_ids),
    )
