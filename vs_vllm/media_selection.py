"""The encoder-output step of serving: the packed tower rows of a batch of media in, per item
its kept rows with their position channels out.

This is what the selecting model runs after the vision tower (``embed_multimodal``, and
``postprocess_encoder_output`` after a captured tower), and what ``benchmarks/kernel_select``
times: strategy -> fused select kernel -> kept rows written straight into one
``(sum k, W + 8)`` buffer, whose last 8 columns then get the kept tokens' M-RoPE position
channels (:mod:`vs_vllm.position_channels`). The rows are copied once; nothing re-packs them.

Pure torch (no vLLM), no host-device sync: every size comes from host ints (the grids and the
keep counts the processor reserved).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.position_channels import NUM_CHANNELS, check_grid, encode_positions
from vs_vllm.positions import kept_media_positions
from vs_vllm.selection import item_indices, select_visual_tokens
from vs_vllm.strategies import SelectionStrategy


@dataclass(frozen=True)
class MediaItem:
    """One image or video of the batch: its patch grid, its selection segments ``(N, k)``
    (one for an image or a video selected as a whole, one per frame otherwise; their N sum to
    the item's tokens) and the temporal scale of its positions (1.0 for images)."""

    grid: tuple[int, int, int]
    segments: tuple[tuple[int, int], ...]
    t_factor: float = 1.0

    @property
    def num_tokens(self) -> int:
        return sum(n for n, _ in self.segments)

    @property
    def num_kept(self) -> int:
        return sum(k for _, k in self.segments)


def select_media(
    x: torch.Tensor,
    items: Sequence[MediaItem],
    strategy: SelectionStrategy | None,
    *,
    merge_size: int,
    score_dim: int | None = None,
    with_positions: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Per item, ``(k, W + 8)``: its kept rows of ``x`` (whole, in raster order) followed by
    their 8 position channels. ``x`` is the packed (sum N, W) tower output of ``items``, in
    order. The outputs are views of one buffer. ``strategy`` may be None when every segment
    keeps all its tokens. ``with_positions=False`` (a family with 1-D positions): ``(k, W)``,
    the kept rows alone."""
    if with_positions:
        for item in items:
            check_grid(item.grid, merge_size)
    segments = [seg for item in items for seg in item.segments]
    images = PackedImages(tuple(n for n, _ in segments), tuple(k for _, k in segments), x.device)
    width = x.shape[1]
    channels = NUM_CHANNELS if with_positions else 0
    buf = torch.empty(images.total_kept, width + channels, dtype=x.dtype, device=x.device)
    if strategy is None and images.num_kept != images.num_tokens:
        raise ValueError("a strategy is needed when some segment keeps fewer than all its tokens")
    out = select_visual_tokens(x, images, strategy, score_dim=score_dim, out_rows=buf[:, :width])
    if not with_positions:
        return buf.split([item.num_kept for item in items])
    kept = item_indices(out.indices, [item.segments for item in items])
    positions = [
        kept_media_positions(item.grid, merge_size, idx, item.t_factor)
        for item, idx in zip(items, kept, strict=True)
    ]
    buf[:, width:] = encode_positions(torch.cat(positions), buf.dtype)
    return buf.split([item.num_kept for item in items])
