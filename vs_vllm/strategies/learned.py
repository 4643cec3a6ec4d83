"""``learned``: the VisionSelector scorer, folded and fused into the select kernel."""

from __future__ import annotations

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.kernels import SelectOutput, score_select
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.strategies.base import ScoreStrategy


class LearnedStrategy(ScoreStrategy):
    name = "learned"
    needs_checkpoint = True

    def __init__(self, scorer: VisionSelectorScorer) -> None:
        self.scorer = scorer

    def scores(self, x: torch.Tensor, images: PackedImages) -> torch.Tensor:
        """Unfused scores (training, analysis); ``select`` fuses them with the top-k."""
        w, c = self.scorer.fold_packed(x, images.cu_seqlens)
        seg = images.segment_ids
        return (x.float() * w.index_select(0, seg)).sum(-1) + c.index_select(0, seg)

    @torch.no_grad()
    def select(self, x: torch.Tensor, images: PackedImages) -> SelectOutput:
        w, c = self.scorer.fold_packed(x, images.cu_seqlens)
        return score_select(x, images.cu_seqlens, images.keep_counts, images.total_kept, w, c)
