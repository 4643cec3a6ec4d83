"""Packed visual tokens in, kept rows and indices out: sizes -> strategy -> kernel."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.kernels import SelectOutput
from vs_vllm.strategies import SelectionStrategy


def keep_all(x: torch.Tensor, images: PackedImages) -> SelectOutput:
    """The identity selection (every k_i == N_i): the input rows, unchanged."""
    offsets = images.cu_seqlens[:-1].index_select(0, images.segment_ids)
    indices = torch.arange(x.shape[0], device=x.device) - offsets
    scores = torch.full((x.shape[0],), float("nan"), dtype=torch.float32, device=x.device)
    return SelectOutput(x, indices, scores)


def select_visual_tokens(
    x: torch.Tensor, images: PackedImages, strategy: SelectionStrategy
) -> SelectOutput:
    """Keep ``images.num_kept[i]`` tokens of each image of the packed ``x`` (sum N_i, D)."""
    if x.dim() != 2 or x.shape[0] != images.total_tokens:
        raise ValueError(
            f"expected packed visual tokens of shape ({images.total_tokens}, D) for images of "
            f"{list(images.num_tokens)} tokens, got {tuple(x.shape)}"
        )
    if images.num_kept == images.num_tokens:
        return keep_all(x, images)
    return strategy.select(x, images)


def select_by_ratio(
    x: torch.Tensor,
    num_tokens: Sequence[int],
    keep_ratio: float,
    strategy: SelectionStrategy,
) -> SelectOutput:
    """Convenience: k_i = max(1, int(N_i * keep_ratio)) for every image, then select."""
    images = PackedImages.from_ratio(num_tokens, keep_ratio, x.device)
    return select_visual_tokens(x, images, strategy)
