"""``learned``: the VisionSelector scorer, folded and fused into the select kernel."""

from __future__ import annotations

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.kernels import SelectOutput, fold_scorer, score_select
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

    def fold(
        self, x: torch.Tensor, images: PackedImages, score_dim: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image ``w`` (B, D) and ``c`` (B,) float32, batch-invariant: an image's fold is
        bit-identical whatever else is in its batch (fixed-order per-image means, no
        atomics; ``kernels.fold``)."""
        s = self.scorer
        return fold_scorer(
            scored_columns(x, score_dim),
            images.cu_seqlens,
            images.num_tokens,
            s.q_proj.weight,
            s.q_proj.bias,
            s.k_proj.weight,
            s.k_proj.bias,
            s.scale,
            backend=self.backend,
        )

    @torch.no_grad()
    def select(
        self,
        x: torch.Tensor,
        images: PackedImages,
        *,
        score_dim: int | None = None,
        out_rows: torch.Tensor | None = None,
    ) -> SelectOutput:
        w, c = self.fold(x, images, score_dim)
        return score_select(
            x,
            images.cu_seqlens,
            images.keep_counts,
            images.total_kept,
            w,
            c,
            score_dim=score_dim,
            backend=self.backend,
            out_rows=out_rows,
            max_tokens=images.max_tokens,
        )
