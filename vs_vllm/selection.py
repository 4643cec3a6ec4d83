"""Selection as callers use it: what the user asked for (:class:`SelectionConfig`) and the one
entry point that runs a strategy on packed visual tokens (:func:`select_visual_tokens`).

Imports flow one way: ``selection -> strategies -> batch -> keep_ratio``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.keep_ratio import num_kept_tokens, validate_keep_ratio
from vs_vllm.kernels import SelectOutput
from vs_vllm.strategies import DEFAULT_STRATEGY, SelectionStrategy, available_strategies

__all__ = [
    "DEFAULT_STRATEGY",
    "SelectionConfig",
    "item_indices",
    "keep_all",
    "num_kept_tokens",
    "select_by_ratio",
    "select_video_tokens",
    "select_visual_tokens",
    "validate_keep_ratio",
]


@dataclass(frozen=True)
class SelectionConfig:
    """What the user asked for: how much to keep, how to choose, and where the scorer lives."""

    keep_ratio: float = 1.0
    strategy: str = DEFAULT_STRATEGY
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_ratio", validate_keep_ratio(self.keep_ratio))
        if self.strategy not in available_strategies():
            raise ValueError(
                f"unknown vision selector strategy {self.strategy!r}; "
                f"choose one of {', '.join(available_strategies())}"
            )

    @property
    def enabled(self) -> bool:
        """Selection changes nothing at ratio 1.0: every token is kept, in order."""
        return self.keep_ratio < 1.0


def keep_all(
    x: torch.Tensor, images: PackedImages, out_rows: torch.Tensor | None = None
) -> SelectOutput:
    """The identity selection (every k_i == N_i): the input rows, unchanged (copied into
    ``out_rows`` when given)."""
    offsets = images.cu_seqlens[:-1].index_select(0, images.segment_ids)
    indices = torch.arange(x.shape[0], device=x.device) - offsets
    scores = torch.full((x.shape[0],), float("nan"), dtype=torch.float32, device=x.device)
    if out_rows is not None:
        out_rows.copy_(x)
        x = out_rows
    return SelectOutput(x, indices, scores)


def select_visual_tokens(
    x: torch.Tensor,
    images: PackedImages,
    strategy: SelectionStrategy | None,
    *,
    score_dim: int | None = None,
    out_rows: torch.Tensor | None = None,
) -> SelectOutput:
    """Keep ``images.num_kept[i]`` rows of each image of the packed ``x`` (sum N_i, W).

    ``score_dim`` (default: all W columns) is how many leading columns the strategy rates;
    the kept rows are always whole (columns past ``score_dim``, such as the deepstack levels an
    adapter gathers, follow their main features).
    ``out_rows``: a (sum k_i, W) buffer (any row stride) the kept rows are written into.
    ``strategy`` may be None when every image keeps all its tokens.
    """
    if x.dim() != 2 or x.shape[0] != images.total_tokens:
        raise ValueError(
            f"expected packed visual tokens of shape ({images.total_tokens}, D) for images of "
            f"{list(images.num_tokens)} tokens, got {tuple(x.shape)}"
        )
    if score_dim is not None and not 1 <= score_dim <= x.shape[1]:
        raise ValueError(f"score_dim must be in [1, {x.shape[1]}], got {score_dim}")
    if out_rows is not None and tuple(out_rows.shape) != (images.total_kept, x.shape[1]):
        raise ValueError(
            f"out_rows must be ({images.total_kept}, {x.shape[1]}), got {tuple(out_rows.shape)}"
        )
    if images.num_kept == images.num_tokens:
        return keep_all(x, images, out_rows)
    if strategy is None:
        raise ValueError("a selection strategy is needed when images keep fewer tokens than N")
    out = strategy.select(x, images, score_dim=score_dim, out_rows=out_rows)
    if out_rows is not None and out.rows is not out_rows:
        out_rows.copy_(out.rows)  # a strategy that gathers with torch (uniform, diversity)
        out = SelectOutput(out_rows, out.indices, out.scores)
    return out


def select_video_tokens(
    x: torch.Tensor,
    segments: Sequence[Sequence[tuple[int, int]]],
    strategy: SelectionStrategy,
    *,
    score_dim: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Videos' packed rows ``x`` (sum N_v, W) in, per video its kept rows and their indices in
    the video (ascending). ``segments[v]`` lists the (N, k) selection segments of video v
    (``keep_ratio.video_segments``: the whole video, or each frame); one strategy call for all."""
    flat = [seg for video in segments for seg in video]
    images = PackedImages(tuple(n for n, _ in flat), tuple(k for _, k in flat), x.device)
    out = select_visual_tokens(x, images, strategy, score_dim=score_dim)
    rows = out.rows.split([sum(k for _, k in video) for video in segments])
    return list(zip(rows, item_indices(out.indices, segments), strict=True))


def item_indices(
    indices: torch.Tensor, segments: Sequence[Sequence[tuple[int, int]]]
) -> list[torch.Tensor]:
    """Packed per-segment kept ``indices`` -> per item its kept indices within the item
    (ascending): each segment's indices offset by the tokens of the item's earlier segments.
    ``segments[i]`` lists item i's (N, k) selection segments, in order."""
    per_segment = indices.split([k for item in segments for _, k in item])
    result, s = [], 0
    for item in segments:
        local, start = [], 0
        for n, _ in item:
            local.append(per_segment[s] + start if start else per_segment[s])
            start += n
            s += 1
        result.append(local[0] if len(local) == 1 else torch.cat(local))
    return result


def select_by_ratio(
    x: torch.Tensor,
    num_tokens: Sequence[int],
    keep_ratio: float,
    strategy: SelectionStrategy,
) -> SelectOutput:
    """Convenience: k_i = max(1, int(N_i * keep_ratio)) for every image, then select."""
    images = PackedImages.from_ratio(num_tokens, keep_ratio, x.device)
    return select_visual_tokens(x, images, strategy)
