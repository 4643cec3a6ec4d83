"""``uniform``: k tokens evenly spaced in raster order (training-free).

Kept index j of an image with N tokens is ``floor((2j + 1) * N / (2k))``: the centre of the
j-th of k equal strides. Strictly increasing because N/k >= 1; k = N keeps everything.
"""

from __future__ import annotations

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.kernels import SelectOutput
from vs_vllm.strategies.base import SelectionStrategy, gather_kept


def uniform_indices(images: PackedImages) -> torch.Tensor:
    """(sum k_i,) int64 per-image indices, on ``images.device``, without a host-device sync."""
    seg = images.kept_segment_ids
    cu_kept = torch.cumsum(images.keep_counts, 0) - images.keep_counts
    j = torch.arange(images.total_kept, device=images.device) - cu_kept.index_select(0, seg)
    n = (images.cu_seqlens[1:] - images.cu_seqlens[:-1]).index_select(0, seg)
    k = images.keep_counts.index_select(0, seg)
    return torch.div((2 * j + 1) * n, 2 * k, rounding_mode="floor")


class UniformStrategy(SelectionStrategy):
    name = "uniform"

    def select(
        self,
        x: torch.Tensor,
        images: PackedImages,
        *,
        score_dim: int | None = None,
        out_rows: torch.Tensor | None = None,
    ) -> SelectOutput:
        return gather_kept(x, images, uniform_indices(images))
