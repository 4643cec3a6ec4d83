"""One training step's forward: the frozen backbone sees every visual token (its whole row:
main features and, for Qwen3-VL, every deepstack level) multiplied by the scorer's soft top-k
mask, exactly the rows inference keeps or drops; the loss is LM cross-entropy on the answer
tokens plus lambda * BCE(soft mask, hard top-k mask).

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
    image_token_counts,
    masked_rows,
    model_adapter,
    visual_inputs,
)
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
    adapter = model_adapter(model)
    images = PackedImages.from_ratio(image_token_counts(model, grid), keep_ratio, device)
    with torch.no_grad():
        feats = image_features(model, batch["pixel_values"], grid)
        positions = adapter.hf_rope_index(
            model, input_ids, grid, attention_mask=batch.get("attention_mask")
        )
    scored = feats[:, : adapter.score_width(model.config)]
    scores = LearnedStrategy(scorer).scores(scored, images)
    soft = soft_topk_mask(scores, images)
    hard = hard_topk_mask(scores.detach(), images)
    embeds, text_kwargs = visual_inputs(model, input_ids, masked_rows(feats, soft))
    logits = language_model_logits(model, embeds, positions, text_kwargs=text_kwargs)
    ce = answer_cross_entropy(logits, batch["labels"])
    total, bce = selection_loss(ce, soft, hard, bce_weight)
    return StepLosses(total, ce, bce)
