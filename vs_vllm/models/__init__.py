"""Model families, one adapter file each; :func:`adapter_for` finds a model's adapter.

Adding a family: write ``vs_vllm/models/<family>.py`` with its ``ADAPTER``, list it in
``_FAMILIES`` below, add its tiny-model spec under ``tiny_models`` and its tests.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import cache
from typing import Any

from vs_vllm.models.adapter import MediaTokenIds, ModelAdapter, VllmClasses

__all__ = [
    "MediaTokenIds",
    "ModelAdapter",
    "UnsupportedModelError",
    "VllmClasses",
    "adapter_for",
    "adapter_for_processor",
    "adapters",
    "supported_architectures",
]

_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "internvl", "glm4v")


class UnsupportedModelError(ValueError):
    """A model whose architecture no adapter covers."""


@cache
def adapters() -> tuple[ModelAdapter, ...]:
    return tuple(importlib.import_module(f"vs_vllm.models.{f}").ADAPTER for f in _FAMILIES)


def supported_architectures() -> tuple[str, ...]:
    return tuple(arch for a in adapters() for arch in a.architectures)


def adapter_for(architectures: Sequence[str] | Any, model: str = "the model") -> ModelAdapter:
    """The adapter of a model, from its architectures list or its HF config."""
    if not isinstance(architectures, Sequence) or isinstance(architectures, str):
        architectures = getattr(architectures, "architectures", None) or ()
    for arch in architectures:
        for adapter in adapters():
            if arch in adapter.vllm:
                return adapter
    raise UnsupportedModelError(
        f"vision token selection supports {', '.join(supported_architectures())}; "
        f"{model} is {', '.join(architectures) or 'an unknown architecture'}"
    )


def adapter_for_processor(processor: Any) -> ModelAdapter:
    """The adapter of an HF processor (by its class, e.g. the one ``AutoProcessor`` loads)."""
    name = type(processor).__name__
    for adapter in adapters():
        if name in adapter.hf_processors:
            return adapter
    known = ", ".join(n for a in adapters() for n in a.hf_processors)
    raise UnsupportedModelError(
        f"vision token selection supports the processors {known}; got {name}"
    )
