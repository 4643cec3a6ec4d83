"""One training step's forward: the frozen backbone sees every visual token of images and
videos (its whole row: main features and whatever the adapter gathers with them, e.g.
deepstack levels) multiplied by
the scorer's soft top-k mask, exactly the rows inference keeps or drops; the loss is LM
cross-entropy on the answer tokens plus lambda * BCE(soft mask, hard top-k mask).

Batches are right-padded (see ``data.collate``): with a causal LM, real tokens never attend to
the padding after them, and padded labels are -100, so no attention mask is needed in the LM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vs_vllm.batch import PackedImages
from vs_vllm.hf.generate import language_model_logits
from vs_vllm.hf.inputs import (
    image_features,
    masked_rows,
    model_adapter,
    visual_inputs,
)
from vs_vllm.media_segments import media_segments, packed_segments
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.strategies import LearnedStrategy
from vs_vllm.train.schedule import selection_loss
from vs_vllm.train.soft_topk import hard_topk_mask, soft_topk_mask


@dataclass
class StepLosses:
    total: torch.Tensor
    ce: torch.Tensor
    bce: torch.Tensor


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (answer) tokens; labels -100 elsewhere.

    0 (not NaN) when a batch has no labelled token (e.g. answers cut by truncation)."""
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets,
        ignore_index=-100,
        reduction="sum",
    )
    return total / (targets != -100).sum().clamp(min=1)


def _selection_items(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], keep_ratio: float
) -> tuple[PackedImages, int]:
    """The selection segments of a batch, images first then videos, and the images' token
    count. An image is one segment; a video is one segment (one top-k over all its frames, the
    reference's form) or, for a family whose frames are separate placeholder runs (the only way
    it can be served), one segment per frame: training selects the way serving will."""
    adapter = model_adapter(model)
    device = batch["input_ids"].device
    segments = []
    num_image_tokens = 0
    for modality in ("image", "video"):
        for grid in adapter.item_grids(model.config, batch, modality):
            item = media_segments(
                adapter,
                model.config,
                modality,
                grid,
                keep_ratio,
                per_frame=adapter.video_layout == "frame_runs",
            )
            segments.append(item)
            if modality == "image":
                num_image_tokens += sum(n for n, _ in item)
    return packed_segments(segments, device), num_image_tokens


@dataclass
class BatchVisuals:
    """A batch's visual rows, images' then videos' (``None`` for a text-only batch), how many
    rows are the images', their selection segments and the unpruned M-RoPE positions."""

    rows: torch.Tensor | None
    num_image_tokens: int
    items: PackedImages
    positions: torch.Tensor


@torch.no_grad()
def batch_visuals(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], keep_ratio: float
) -> BatchVisuals:
    """The frozen tower's rows of every image and video of a collated batch (no grad)."""
    adapter = model_adapter(model)
    input_ids = batch["input_ids"]
    items, num_image_tokens = _selection_items(model, batch, keep_ratio)
    parts = []
    if adapter.item_grids(model.config, batch, "image"):
        parts.append(image_features(model, batch))
    if adapter.item_grids(model.config, batch, "video"):
        parts.append(adapter.hf_video_rows(model, batch))
    positions = adapter.hf_rope_index(
        model, input_ids, batch, attention_mask=batch.get("attention_mask")
    )
    rows = torch.cat(parts) if parts else None
    return BatchVisuals(rows, num_image_tokens, items, positions)


def visual_lm_logits(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    visuals: BatchVisuals,
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """The LM's logits with ``rows`` (``visuals.rows`` or a masked form of them) at the
    batch's image and video placeholders. Differentiable in ``rows``."""
    input_ids = batch["input_ids"]
    if rows is None:
        embeds, text_kwargs = model.get_input_embeddings()(input_ids), {}
    else:
        n = visuals.num_image_tokens
        videos = rows[n:] if model_adapter(model).item_grids(model.config, batch, "video") else None
        embeds, text_kwargs = visual_inputs(model, input_ids, rows[:n], videos)
    return language_model_logits(model, embeds, visuals.positions, text_kwargs=text_kwargs)


def soft_selection_losses(
    model: torch.nn.Module,
    scorer: VisionSelectorScorer,
    batch: dict[str, torch.Tensor],
    keep_ratio: float,
    bce_weight: float,
) -> StepLosses:
    """Forward one collated batch (see ``vs_vllm.train.data.collate``) and return its losses.

    Images and videos alike: every image, and every video (or video frame, see
    :func:`_selection_items`), gets its own soft top-k at ``keep_ratio``. The backbone is
    frozen: its visual features are computed without grad; gradients reach only the scorer,
    through the soft mask. A batch without visual tokens trains on nothing (zero gradient).
    """
    adapter = model_adapter(model)
    visuals = batch_visuals(model, batch, keep_ratio)
    if visuals.rows is None:  # text only: the scorer gets a zero gradient
        zero = sum(p.sum() for p in scorer.parameters()) * 0.0
        ce = answer_cross_entropy(visual_lm_logits(model, batch, visuals, None), batch["labels"])
        return StepLosses(ce + zero, ce, torch.zeros_like(ce))
    scored = visuals.rows[:, : adapter.score_width(model.config)]
    scores = LearnedStrategy(scorer).scores(scored, visuals.items)
    soft = soft_topk_mask(scores, visuals.items)
    hard = hard_topk_mask(scores.detach(), visuals.items)
    logits = visual_lm_logits(model, batch, visuals, masked_rows(visuals.rows, soft))
    ce = answer_cross_entropy(logits, batch["labels"])
    total, bce = selection_loss(ce, soft, hard, bce_weight)
    return StepLosses(total, ce, bce)
