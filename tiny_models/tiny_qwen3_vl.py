"""Tiny, random-weight Qwen3-VL-family models that transformers and vLLM load like real checkpoints.

:func:`build_tiny_qwen3_vl` writes, in a few seconds and without any network access, a model
directory with the layout of a published Qwen3-VL-family checkpoint:

* ``variant="dense"``: ``Qwen/Qwen3-VL-8B-Instruct`` (``Qwen3VLConfig``, architecture
  ``Qwen3VLForConditionalGeneration``): a Qwen3 text model (q/k RMS norms, explicit ``head_dim``)
  with interleaved M-RoPE, and a vision tower with a learned (bilinearly resampled) position
  grid, 2-D rotary attention and DeepStack mergers whose outputs are added to the hidden states
  of the first ``len(deepstack_visual_indexes)`` text layers at the image positions;
* ``variant="moe"``: ``Qwen/Qwen3-VL-30B-A3B-Instruct`` (``Qwen3VLMoeConfig``, architecture
  ``Qwen3VLMoeForConditionalGeneration``): the same with sparse-MoE MLPs in every text layer;
* ``variant="qwen3_5"``: ``Qwen/Qwen3.5-9B``-style (``Qwen3_5Config``, architecture
  ``Qwen3_5ForConditionalGeneration``): a hybrid text model (gated-delta-net linear attention
  and gated full attention layers, partial interleaved M-RoPE) and a vision tower without
  DeepStack.

Each directory holds ``config.json``, ``model.safetensors`` (random weights, bit-identical for
the same spec, seed and variant), ``generation_config.json``, the byte-level BPE tokenizer of
:mod:`tiny_models.tiny_qwen` (same special tokens), the ``Qwen3VLProcessor`` configuration
(``Qwen2VLImageProcessor`` with patch 16 and ``Qwen3VLVideoProcessor``) and the chat template.

:func:`num_image_tokens` says how many merged image tokens (``<|image_pad|>`` placeholders) the
processor produces for an image size; :func:`~tiny_models.tiny_qwen.tiny_image` (re-exported)
makes deterministic test images.

Sizes of the default :class:`TinyQwen3VLSpec`: text hidden 64, 2 layers, 2 query heads and 1 KV
head of head_dim 32, interleaved ``mrope_section`` (6, 5, 5) (vLLM asserts ``sum == rotary_dim /
2``); vision depth 3, hidden 32, patch 16, merge 2, a learned 8 x 8 position grid, DeepStack
taps after vision blocks 0 and 1 (injected into text layers 0 and 1); at most 64 merged tokens per
image.

Checked with vLLM CPU 0.32.0 (stock engine, ``enforce_eager=True``): the dense and MoE variants run
in float32 and their greedy tokens and logprobs equal transformers' float32 ones to about 1e-6;
the Qwen3.5 variant needs ``dtype="bfloat16"`` there (the CPU gated-delta-net kernel asserts
"CPU GDN attention requires BF16.") and gives the same first tokens as transformers in float32.
For a ``qwen3_5`` directory transformers' ``AutoTokenizer`` returns ``Qwen3_5Tokenizer`` (its
registered class wins over ``tokenizer_config.json``); it shares the vocabulary and special tokens
but pre-tokenizes runs of spaces differently, so compare token ids only within one variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from safetensors import safe_open
from safetensors.torch import save_file

from tiny_models.builder_common import (
    INIT_STD,
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
from tiny_models.tiny_qwen import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    _chat_token_ids,
    _make_tokenizer,
    _smart_resize_tokens,
    _vision_token_kwargs,
    tiny_image,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "VARIANTS",
    "TinyQwen3VLSpec",
    "Variant",
    "build_tiny_qwen3_vl",
    "model_class",
    "num_image_tokens",
    "tiny_image",
]

Variant = Literal["dense", "moe", "qwen3_5"]

#: The variants :func:`build_tiny_qwen3_vl` can write.
VARIANTS: tuple[Variant, ...] = ("dense", "moe", "qwen3_5")

#: ``config.architectures[0]`` of each variant (also the transformers model class name).
ARCHITECTURES: dict[str, str] = {
    "dense": "Qwen3VLForConditionalGeneration",
    "moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
}

_IMAGE_MEAN_STD = [0.5, 0.5, 0.5]  # Qwen3-VL normalises pixels to [-1, 1] (not CLIP's mean/std)


@dataclass(frozen=True)
class TinyQwen3VLSpec:
    """Sizes of the tiny models (float32; about 0.2-0.3 M parameters per variant)."""

    # Language model (all variants).
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32
    intermediate: int = 128
    #: Interleaved M-RoPE sections (T, H, W) of the dense and MoE text models; the sum must be
    #: ``head_dim / 2``. (6, 5, 5) mirrors Qwen3-VL's (24, 20, 20): with the interleaved layout
    #: (T H W T H W ... T T) frequency channel ``c`` belongs to H when ``c % 3 == 1`` and
    #: ``c < 3 * H``, to W when ``c % 3 == 2`` and ``c < 3 * W``, and to T otherwise.
    mrope_section: tuple[int, int, int] = (6, 5, 5)
    rope_theta: float = 5_000_000.0
    max_position_embeddings: int = 4096
    # MoE text model (variant "moe").
    num_experts: int = 4
    num_experts_per_tok: int = 2
    #: Neither ``moe_intermediate`` nor twice it may equal ``text_hidden``: the fused expert
    #: tensors are stored transposed (hub layout) and transformers transposes them on load only
    #: when the shapes tell the layouts apart.
    moe_intermediate: int = 16
    # Qwen3.5 hybrid text model (variant "qwen3_5").
    #: One entry per text layer; Qwen3.5 puts a full-attention layer after every 3 linear ones.
    qwen35_layer_types: tuple[str, ...] = ("linear_attention", "full_attention")
    #: Qwen3.5 rotates only this fraction of each head (0.25: 8 of 32 channels).
    qwen35_partial_rotary_factor: float = 0.25
    #: Must sum to ``head_dim * qwen35_partial_rotary_factor / 2`` (Qwen3.5-9B: (11, 11, 10)).
    qwen35_mrope_section: tuple[int, int, int] = (2, 1, 1)
    qwen35_rope_theta: float = 10_000_000.0
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    #: vLLM 0.32's CPU gated-delta-rule kernel (``chunk_gated_delta_rule_cpu``) accepts 64
    #: (checked) but not 16 ("expect head_dim to be multiples of 32") nor 32 ("Unexpected head
    #: dim size, 32"); it also needs the engine to run in bfloat16.
    linear_key_head_dim: int = 64
    linear_value_head_dim: int = 64
    linear_conv_kernel_dim: int = 4
    # Vision tower.
    vision_depth: int = 3
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    #: Vision blocks whose outputs feed the DeepStack mergers (dense and MoE variants only);
    #: merger ``i`` is added to the output of text layer ``i``.
    deepstack_visual_indexes: tuple[int, ...] = (0, 1)
    #: Learned position grid of the vision tower: a perfect square (8 x 8), resampled bilinearly
    #: to each image's patch grid (Qwen3-VL: 2304 = 48 x 48).
    num_position_embeddings: int = 64
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    # Processor.
    min_pixels: int = 32 * 32 * 4
    max_pixels: int = 32 * 32 * 64  # at most 64 merged tokens per image
    video_max_frames: int = 8
    dtype: str = "float32"

    @property
    def factor(self) -> int:
        """Side in pixels of one merged token: ``patch_size * spatial_merge_size``."""
        return self.patch_size * self.spatial_merge_size

    def validate(self, variant: Variant = "dense") -> None:
        """Raise ``ValueError`` when the sizes are inconsistent (vLLM would reject them later)."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        require_divisible(self, "heads", "kv_heads")
        if variant == "qwen3_5":
            rotary_dim = int(self.head_dim * self.qwen35_partial_rotary_factor)
            require_mrope_sum(self, "qwen35_mrope_section", "rotary_dim", rotary_dim)
            if len(self.qwen35_layer_types) != self.text_layers:
                raise ValueError(
                    f"qwen35_layer_types has {len(self.qwen35_layer_types)} entries for "
                    f"{self.text_layers} text layers"
                )
            unknown = set(self.qwen35_layer_types) - {"linear_attention", "full_attention"}
            if unknown:
                raise ValueError(f"unknown qwen35_layer_types {sorted(unknown)}")
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise ValueError(
                    "linear_num_value_heads must be a multiple of linear_num_key_heads"
                )
        else:
            require_mrope_sum(self, "mrope_section", "head_dim", self.head_dim)
            levels = self.deepstack_visual_indexes
            if not levels or any(not 0 <= i < self.vision_depth for i in levels):
                raise ValueError(
                    f"deepstack_visual_indexes {levels} must be non-empty vision block indexes "
                    f"in [0, {self.vision_depth})"
                )
            if len(set(levels)) != len(levels):
                raise ValueError(f"deepstack_visual_indexes {levels} has duplicates")
            if len(levels) > self.text_layers:
                raise ValueError(
                    f"{len(levels)} DeepStack levels need at least as many text layers, "
                    f"got {self.text_layers}"
                )
        if variant == "moe":
            require_increasing(self, "num_experts_per_tok", "num_experts")
            if self.text_hidden in (self.moe_intermediate, 2 * self.moe_intermediate):
                raise ValueError(
                    f"moe_intermediate {self.moe_intermediate} (or twice it) equals text_hidden "
                    f"{self.text_hidden}: the hub and transformers expert layouts would be "
                    "indistinguishable"
                )
        require_vision_heads(self)
        side = math.isqrt(self.num_position_embeddings)
        if side < 2 or side * side != self.num_position_embeddings:
            raise ValueError(
                f"num_position_embeddings {self.num_position_embeddings} must be a perfect "
                "square >= 4 (the learned position grid is square)"
            )
        require_increasing(self, "min_pixels", "max_pixels")
        require_dtype(self.dtype)


_DEFAULT_SPEC = TinyQwen3VLSpec()


def num_image_tokens(width: int, height: int, spec: TinyQwen3VLSpec = _DEFAULT_SPEC) -> int:
    """Merged image tokens N (``<|image_pad|>`` placeholders) for a ``width`` x ``height`` image.

    Uses transformers' ``smart_resize`` (the Qwen2-VL image processor's resize rule, which
    Qwen3-VL keeps) with factor ``patch_size * spatial_merge_size`` (32) and the spec's pixel
    bounds, then divides the resized area by ``factor ** 2``.
    """
    return _smart_resize_tokens(width, height, spec)


def model_class(variant: Variant = "dense") -> type:
    """The transformers model class of ``variant`` (e.g. ``Qwen3VLForConditionalGeneration``)."""
    import transformers

    if variant not in ARCHITECTURES:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return getattr(transformers, ARCHITECTURES[variant])


def _vision_config(spec: TinyQwen3VLSpec, variant: Variant) -> dict[str, Any]:
    """The vision tower's ``vision_config`` fields; the merger outputs ``text_hidden``."""
    config: dict[str, Any] = {
        **vision_sizes(spec),
        "hidden_act": "gelu_pytorch_tanh",
        "num_position_embeddings": spec.num_position_embeddings,
        "initializer_range": INIT_STD,
        "dtype": spec.dtype,
    }
    if variant != "qwen3_5":  # Qwen3.5's vision tower has no DeepStack mergers
        config["deepstack_visual_indexes"] = list(spec.deepstack_visual_indexes)
    return config


def _text_config(
    spec: TinyQwen3VLSpec, variant: Variant, vocab_size: int, token_ids: dict[str, int]
) -> dict[str, Any]:
    """The language model's ``text_config`` fields (transformers 5.x names)."""
    config: dict[str, Any] = {
        **text_sizes(spec, vocab_size),
        "head_dim": spec.head_dim,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": INIT_STD,
        "use_cache": True,
        "tie_word_embeddings": False,
        **_chat_token_ids(token_ids),
        "dtype": spec.dtype,
    }
    if variant == "qwen3_5":
        config.update(
            {
                "layer_types": list(spec.qwen35_layer_types),
                "linear_conv_kernel_dim": spec.linear_conv_kernel_dim,
                "linear_key_head_dim": spec.linear_key_head_dim,
                "linear_value_head_dim": spec.linear_value_head_dim,
                "linear_num_key_heads": spec.linear_num_key_heads,
                "linear_num_value_heads": spec.linear_num_value_heads,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": spec.qwen35_rope_theta,
                    "mrope_section": list(spec.qwen35_mrope_section),
                    "mrope_interleaved": True,
                    "partial_rotary_factor": spec.qwen35_partial_rotary_factor,
                },
            }
        )
    else:
        config["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": spec.rope_theta,
            "mrope_section": list(spec.mrope_section),
            "mrope_interleaved": True,
        }
    if variant == "moe":
        config.update(
            {
                "num_experts": spec.num_experts,
                "num_experts_per_tok": spec.num_experts_per_tok,
                "moe_intermediate_size": spec.moe_intermediate,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "norm_topk_prob": True,
            }
        )
    return config


def _make_config(
    spec: TinyQwen3VLSpec, variant: Variant, token_ids: dict[str, int], vocab_size: int
) -> PretrainedConfig:
    """The model config of ``variant`` with the tokenizer's special-token ids."""
    import transformers

    config_cls = {
        "dense": transformers.Qwen3VLConfig,
        "moe": transformers.Qwen3VLMoeConfig,
        "qwen3_5": transformers.Qwen3_5Config,
    }[variant]
    config = config_cls(
        text_config=_text_config(spec, variant, vocab_size, token_ids),
        vision_config=_vision_config(spec, variant),
        **_vision_token_kwargs(token_ids),
        dtype=spec.dtype,
    )
    config.architectures = [ARCHITECTURES[variant]]
    return config


def _make_processor(spec: TinyQwen3VLSpec, tokenizer: Any) -> Any:
    """``Qwen3VLProcessor``: Qwen2-VL image processor (patch 16) and Qwen3-VL video processor."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=spec.patch_size,
        merge_size=spec.spatial_merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        image_mean=_IMAGE_MEAN_STD,
        image_std=_IMAGE_MEAN_STD,
    )
    # A video's pixel budget covers all its frames (Qwen3-VL's smart_resize takes num_frames).
    video_processor = Qwen3VLVideoProcessor(
        size={
            "shortest_edge": spec.min_pixels * spec.temporal_patch_size,
            "longest_edge": spec.max_pixels * spec.video_max_frames,
        },
        patch_size=spec.patch_size,
        merge_size=spec.spatial_merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        image_mean=_IMAGE_MEAN_STD,
        image_std=_IMAGE_MEAN_STD,
        fps=2,
        min_frames=spec.temporal_patch_size,
        max_frames=spec.video_max_frames,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _experts_to_hub_layout(weights: Path) -> None:
    """Store the fused MoE expert tensors as the published Qwen3-VL-MoE checkpoints do.

    transformers 5 keeps ``mlp.experts.gate_up_proj`` as ``(experts, 2 * moe_intermediate,
    hidden)`` and ``mlp.experts.down_proj`` as ``(experts, hidden, moe_intermediate)`` and saves
    them so (its ``Transpose(1, 2, check_dims=True)`` conversion does nothing when the shapes
    already match the module). The hub checkpoints, and vLLM's loader
    (``is_fused_checkpoint_transposed=True``), use the transposed layout ``(experts, hidden,
    2 * moe_intermediate)`` and ``(experts, moe_intermediate, hidden)``; transformers transposes
    those back on load.
    """
    with safe_open(weights, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for key, value in tensors.items():
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[key] = value.transpose(1, 2).contiguous()
    save_file(tensors, weights, metadata=metadata)


def build_tiny_qwen3_vl(
    out_dir: str | Path,
    spec: TinyQwen3VLSpec = _DEFAULT_SPEC,
    seed: int = 0,
    variant: Variant = "dense",
) -> Path:
    """Write a tiny random-weight Qwen3-VL-family model directory to ``out_dir``; return its path.

    ``variant`` is ``"dense"`` (Qwen3-VL), ``"moe"`` (Qwen3-VL-MoE) or ``"qwen3_5"`` (Qwen3.5,
    hybrid linear/full attention). The directory holds ``config.json``, ``model.safetensors``,
    ``generation_config.json``, the tokenizer (``tokenizer.json``, ``tokenizer_config.json``), the
    processor configuration and the chat template, so ``AutoProcessor.from_pretrained``,
    ``<ARCHITECTURES[variant]>.from_pretrained`` and ``vllm.LLM`` load it as they would the
    published checkpoint. The weights depend only on ``spec``, ``seed`` and ``variant`` (the same
    triple gives bit-identical tensors). Nothing is downloaded.

    The chat template is :data:`~tiny_models.tiny_qwen.CHAT_TEMPLATE` (the Qwen2.5-VL one,
    which adds a default system prompt; Qwen3-VL's own template does not) so prompts match the
    Qwen2.5-VL tiny model's. Like Qwen3-VL's, it writes ``<|vision_start|><|video_pad|>
    <|vision_end|>`` per video; transformers 5's ``Qwen3VLProcessor`` expands only the
    ``<|video_pad|>`` inside it into ``<t seconds><|vision_start|>`` + pads + ``<|vision_end|>``
    per temporal patch (vLLM's Qwen3-VL processor does the same for transformers >= 5.10).
    """
    spec.validate(variant)
    tokenizer = _make_tokenizer()
    token_ids, vocab_size = special_token_ids(tokenizer, SPECIAL_TOKENS)
    out = write_random_model(
        out_dir,
        model_class(variant),
        _make_config(spec, variant, token_ids, vocab_size),
        _make_processor(spec, tokenizer),
        seed=seed,
        dtype=spec.dtype,
        generation=_chat_token_ids(token_ids),
    )
    if variant == "moe":
        _experts_to_hub_layout(out / "model.safetensors")
    return out
