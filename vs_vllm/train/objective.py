"""One training step's forward: the frozen Qwen2.5-VL sees every visual token multiplied by
the scorer's soft top-k mask; the loss is LM cross-entropy on the answer tokens plus
lambda * BCE(soft mask, hard top-k mask).

Batches are right-padded (see ``data.collate``): with a causal LM, real tokens never attend to
the padding after them, and padded labels are -100, so no attention mask is needed in the LM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vs_vllm.batch import PackedImages
from vs_vllm.hf.generate import language_model_logits
from vs_vllm.hf.inputs import image_features, image_token_counts
from vs_vllm.scorer import VisionSelectorScorer
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


def scorer_scores(
    scorer: VisionSelectorScorer, feats: torch.Tensor, images: PackedImages
) -> torch.Tensor:
    """(sum N_i,) float32 scores of packed visual tokens, differentiable in the scorer."""
    w, c = scorer.fold_packed(feats, images.cu_seqlens)
    seg = images.segment_ids
    return (feats.float() * w.index_select(0, seg)).sum(-1) + c.index_select(0, seg)


def soft_selection_losses(
    model: torch.nn.Module,
    scorer: VisionSelectorScorer,
    batch: dict[str, torch.Tensor],
    keep_ratio: float,
    bce_weight: float,
) -> StepLosses:
    """Forward one collated batch (see ``vs_vllm.train.data.collate``) and return its losses.

    The backbone is frozen: its visual features are computed without grad; gradients reach
    only the scorer, through the soft mask.
    """
    input_ids, grid = batch["input_ids"], batch["image_grid_thw"]
    device = input_ids.device
    images = PackedImages.from_ratio(image_token_counts(model, grid), keep_ratio, device)
    with torch.no_grad():
        feats = image_features(model, batch["pixel_values"], grid)
        embeds = model.get_input_embeddings()(input_ids)
        mm_types = (input_ids == model.config.image_token_id).to(torch.int64)
        positions, _ = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_types,
            image_grid_thw=grid,
            attention_mask=batch.get("attention_mask"),
        )
    scores = scorer_scores(scorer, feats, images)
    soft = soft_topk_mask(scores, images)
    hard = hard_topk_mask(scores.detach(), images)
    rows = (feats * soft.unsqueeze(-1).to(feats.dtype)).to(embeds.dtype)
    is_image = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(is_image, rows)
    logits = language_model_logits(model, embeds, positions.to(torch.int64))
    ce = answer_cross_entropy(logits, batch["labels"])
    total, bce = selection_loss(ce, soft, hard, bce_weight)
    return StepLosses(total, ce, bce)
