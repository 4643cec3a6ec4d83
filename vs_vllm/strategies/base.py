"""The interface every selection strategy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.kernels import SelectOutput, select_by_scores


class SelectionStrategy(ABC):
    """Chooses which visual tokens of each image to keep.

    ``select`` takes the packed (sum N_i, W) rows of a batch of images and returns the kept
    rows and their per-image indices, ascending (raster order), packed. A strategy that looks
    at the tokens rates only their first ``score_dim`` columns (all W when None: a model
    adapter's ``score_width``); the kept rows are always whole.
    """

    name: ClassVar[str]
    needs_checkpoint: ClassVar[bool] = False
    #: Select-kernel backend (``triton`` / ``torch``); None lets the kernel dispatch choose.
    #: The serving model sets it after its start-up self-check (``kernels.startup``).
    backend: str | None = None

    @abstractmethod
    def select(
        self,
        x: torch.Tensor,
        images: PackedImages,
        *,
        score_dim: int | None = None,
        out_rows: torch.Tensor | None = None,
    ) -> SelectOutput:
        """``out_rows``: a (sum k_i, W) buffer the kept rows may be written into (the caller
        copies them there when a strategy returns other rows)."""


class ScoreStrategy(SelectionStrategy):
    """A strategy that rates every token; the fused kernel keeps the top k of each image."""

    @abstractmethod
    def scores(self, x: torch.Tensor, images: PackedImages) -> torch.Tensor:
        """(sum N_i,) float32 scores: higher is kept first."""

    def select(
        self,
        x: torch.Tensor,
        images: PackedImages,
        *,
        score_dim: int | None = None,
        out_rows: torch.Tensor | None = None,
    ) -> SelectOutput:
        scores = self.scores(scored_columns(x, score_dim), images)
        return select_by_scores(
            x,
            scores,
            images.cu_seqlens,
            images.keep_counts,
            images.total_kept,
            backend=self.backend,
            out_rows=out_rows,
            max_tokens=images.max_tokens,
        )


def scored_columns(x: torch.Tensor, score_dim: int | None) -> torch.Tensor:
    """The columns a strategy rates: the first ``score_dim`` (a view, no copy)."""
    return x if score_dim is None or score_dim == x.shape[1] else x[:, :score_dim]


def gather_kept(x: torch.Tensor, images: PackedImages, indices: torch.Tensor) -> SelectOutput:
    """Rows of ``x`` at per-image ``indices`` (packed, ascending per image); scores are NaN
    because index strategies do not rate tokens."""
    offsets = images.cu_seqlens[:-1].index_select(0, images.kept_segment_ids)
    rows = x.index_select(0, indices + offsets)
    scores = torch.full((x.shape[0],), float("nan"), dtype=torch.float32, device=x.device)
    return SelectOutput(rows, indices, scores)
