"""What the tiny-model builders share: spec checks, config fields, tokenizer and checkpoint files.

:mod:`tiny_models.tiny_qwen`, :mod:`~tiny_models.tiny_qwen3_vl`, :mod:`~tiny_models.tiny_glm4v`
and :mod:`~tiny_models.tiny_internvl` each describe one family (its spec, special tokens, chat
template, config and processor); the steps they all take live here:

* the spec checks (``require_*``), which raise ``ValueError`` with the field names in the message;
* :func:`text_sizes` and :func:`vision_sizes`, the config fields every spec maps the same way;
* :func:`fast_tokenizer` (the trained byte-level BPE as transformers' fast tokenizer) and
  :func:`special_token_ids` (the special tokens' ids and the padded vocabulary size);
* :func:`write_random_model`, which initialises the model from a seed (bit-identical for the same
  seed) and writes ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
  processor's files (tokenizer, processor configuration, chat template).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

#: Initialiser standard deviation of every tiny model: larger than the usual 0.02 so a random
#: model's greedy tokens vary.
INIT_STD = 0.08
#: A model's ``vocab_size`` is its tokenizer's size rounded up to a multiple of this.
VOCAB_MULTIPLE = 64


def require_divisible(spec: Any, name: str, by: str) -> None:
    """Raise ``ValueError`` unless the spec field ``name`` is a multiple of the field ``by``."""
    value, divisor = getattr(spec, name), getattr(spec, by)
    if value % divisor:
        raise ValueError(f"{name} {value} not divisible by {by} {divisor}")


def require_increasing(spec: Any, low: str, high: str) -> None:
    """Raise ``ValueError`` unless ``0 < spec.<low> <= spec.<high>``."""
    low_value, high_value = getattr(spec, low), getattr(spec, high)
    if not 0 < low_value <= high_value:
        raise ValueError(f"need 0 < {low} <= {high}, got {low_value}, {high_value}")


def require_mrope_sum(spec: Any, section: str, dim_name: str, dim: int) -> None:
    """Raise ``ValueError`` unless the M-RoPE sections ``spec.<section>`` sum to ``dim / 2`` (the
    rotated channels of a head, ``dim_name`` in the message): vLLM's M-RoPE asserts it."""
    total = sum(getattr(spec, section))
    if total * 2 != dim:
        raise ValueError(
            f"sum({section})={total} must equal {dim_name}/2={dim / 2} (vLLM's M-RoPE asserts it)"
        )


def require_vision_heads(spec: Any) -> None:
    """Raise ``ValueError`` unless the vision heads split ``vision_hidden`` into heads whose width
    is a multiple of 4 (the 2-D rotary embedding of the Qwen-style vision towers)."""
    require_divisible(spec, "vision_hidden", "vision_heads")
    if (spec.vision_hidden // spec.vision_heads) % 4:
        raise ValueError("vision head_dim must be a multiple of 4 (2-D rotary embedding)")


def require_dtype(dtype: str) -> None:
    """Raise ``ValueError`` unless ``dtype`` names a torch dtype (``"float32"``, ...)."""
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")


def text_sizes(spec: Any, vocab_size: int) -> dict[str, Any]:
    """The ``text_config`` fields every family's spec maps the same way (SiLU MLP)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
    }


def vision_sizes(spec: Any) -> dict[str, Any]:
    """The ``vision_config`` fields of a Qwen-style vision tower (Qwen2.5-VL, Qwen3-VL, GLM-4.1V)
    that the specs name alike; the merger outputs ``text_hidden``."""
    return {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_heads": spec.vision_heads,
        "in_channels": 3,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "out_hidden_size": spec.text_hidden,
    }


def fast_tokenizer(
    trained: Tokenizer, chat_template: str, **special_tokens: Any
) -> PreTrainedTokenizerFast:
    """``trained`` as transformers' fast tokenizer (left padding, 32768 tokens, special tokens
    never split) with ``special_tokens`` (``eos_token=...``, ``pad_token=...``, ...) and the
    chat template set."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=trained,
        **special_tokens,
        model_max_length=32768,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def special_token_ids(
    tokenizer: PreTrainedTokenizerFast, tokens: Iterable[str]
) -> tuple[dict[str, int], int]:
    """The id of each of ``tokens`` and the model's ``vocab_size``: the tokenizer's size rounded
    up to a multiple of :data:`VOCAB_MULTIPLE`."""
    token_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in tokens}
    return token_ids, math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def write_random_model(
    out_dir: str | Path,
    model_cls: Callable[[PretrainedConfig], Any],
    config: PretrainedConfig,
    processor: Any,
    *,
    seed: int,
    dtype: str,
    generation: Mapping[str, Any],
    init: Callable[[Any], None] | None = None,
) -> Path:
    """Write a random-weight ``model_cls(config)`` and ``processor`` to ``out_dir``; return it.

    The weights are drawn after ``torch.manual_seed(seed)`` inside a forked RNG (the caller's
    random state is untouched; the same seed gives bit-identical tensors); ``init`` may redraw
    some of them within the same fork. The model is cast to ``dtype`` and saved as
    ``model.safetensors`` with ``config.json`` and a greedy ``generation_config.json`` holding
    ``generation`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``); then the processor
    writes the tokenizer, its configuration and the chat template.
    """
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        if init is not None:
            init(model)
    model = model.to(getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(**generation, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
