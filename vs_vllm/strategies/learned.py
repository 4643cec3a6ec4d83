"""``learned``: the VisionSelector scorer, folded and fused into the select kernel."""

from __future__ import annotations

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.kernels import SelectOutput, score_select
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.strategies.base import ScoreStrategy, scored_columns


class LearnedStrategy(ScoreStrategy):
    name = "learned"
    needs_checkpoint = True

    def __init__(self, scorer: VisionSelectorScorer) -> None:
        self.scorer = scorer

    def scores(self, x: torch.Tensor, images: PackedImages) -> torch.Tensor:
        """Unfused (sum N_i,) float32 scores, differentiable in the scorer (training, analysis);
        ``select`` fuses them with the top-k."""
        return self.scorer.packed_scores(x, images.cu_seqlens, images.segment_ids)

    @torch.no_grad()
    def select(
        self, x: torch.Tensor, images: PackedImages, *, score_dim: int | None = None
    ) -> SelectOutput:
        w, c = self.scorer.fold_packed(scored_columns(x, score_dim), images.cu_seqlens)
        return score_select(
            x, images.cu_seqlens, images.keep_counts, images.total_kept, w, c, score_dim=score_dim
        )
