"""What a selecting instance's encoder produces for an item, as part of the item's multimodal
hash.

vLLM keys every cache of a multimodal item by its hash (``mm_hash``; the processor cache, the
encoder cache, an EC connector's store under encoder disaggregation, the prefix cache's
multimodal block keys). Stock vLLM hashes the model path, the item and the request's own
``mm_processor_kwargs``, but not the server's settings: two instances of the same model with
different ``--vision-keep-ratio``, strategies or scorers would share entries whose rows differ
(k of them, selected by another scorer). :func:`selection_tag` is everything that decides an
item's rows on a selecting instance; :class:`~vs_vllm.vllm_plugin.processor.SelectingProcessor`
hashes it into each item's ``mm_hash`` the way vLLM's own processors add per-item settings of
their own (a video's sampling) to it. An instance without selection keeps vLLM's hashes unchanged.
"""

from __future__ import annotations

from typing import Any

from vs_vllm.checkpoint import scorer_digest
from vs_vllm.position_channels import NUM_CHANNELS
from vs_vllm.strategies import strategy_class
from vs_vllm.vllm_plugin.settings import SelectorSettings

#: The layout of a selecting instance's encoder rows (bump when it changes): the kept rows,
#: then ``NUM_CHANNELS`` position channels under M-RoPE.
ROW_FORMAT = f"vs-vllm-rows-1/{NUM_CHANNELS}"


def scorer_identity(settings: SelectorSettings, hidden_size: int) -> str | None:
    """The scorer's weights digest (``--vision-selector``), ``"model"`` for a scorer inside the
    model checkpoint (the model path is already hashed), None for a strategy without one."""
    if not strategy_class(settings.strategy).needs_checkpoint:
        return None
    if settings.checkpoint is None:
        return "model"
    return scorer_digest(settings.checkpoint, hidden_size)


def selection_tag(
    settings: SelectorSettings,
    modality: str,
    ratio: float | None,
    *,
    scorer: str | None,
    positions: bool,
) -> dict[str, Any]:
    """Everything that decides the rows of one ``modality`` item at the resolved ``ratio``
    (None: the item keeps every token). ``positions``: the rows carry position channels."""
    tag: dict[str, Any] = {
        "format": ROW_FORMAT if positions else ROW_FORMAT.split("/")[0],
        "modality": modality,
        "ratio": None if ratio is None else float(ratio),
        "strategy": settings.strategy,
        "scorer": scorer,
    }
    if modality == "video":
        tag["video_selection"] = settings.video_selection
    return tag
