"""``random``: a pseudo-random subset, seeded from the image's own content.

The same image always keeps the same tokens, in every process and on every tensor-parallel
rank: the seed is an integer hash of the tokens' bit patterns (exact integer sums, so the
order of a parallel reduction does not matter), and every token's score is an integer hash of
(seed, index). No global RNG, no torch.Generator, no host-device sync.
"""

from __future__ import annotations

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.strategies.base import ScoreStrategy

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**27, so (x < 2**32) * _MULT fits in int64


def mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = (h * _MULT) & _MASK32
    h = h ^ (h >> 16)
    h = (h * _MULT) & _MASK32
    return h ^ (h >> 16)


def content_seeds(x: torch.Tensor, images: PackedImages) -> torch.Tensor:
    """(B,) int64 seeds in [0, 2**32): a hash of each image's token bits and size."""
    int_view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    bits = x.contiguous().view(int_view[x.dtype]).to(torch.int64) & _MASK32
    per_token = (bits * (torch.arange(x.shape[1], device=x.device) % 251 + 1)).sum(-1) & _MASK32
    # Per-image sums as differences of one int64 prefix sum: exact integers (values < 2**32,
    # fewer than 2**31 tokens), so no order or atomic can change them.
    prefix = torch.nn.functional.pad(torch.cumsum(mix32(per_token), 0), (1, 0))
    sums = prefix.index_select(0, images.cu_seqlens[1:]) - prefix.index_select(
        0, images.cu_seqlens[:-1]
    )
    counts = images.cu_seqlens[1:] - images.cu_seqlens[:-1]
    return mix32((sums & _MASK32) ^ mix32(counts & _MASK32))


class RandomStrategy(ScoreStrategy):
    name = "random"

    def scores(self, x: torch.Tensor, images: PackedImages) -> torch.Tensor:
        seeds = content_seeds(x, images).index_select(0, images.segment_ids)
        offsets = images.cu_seqlens[:-1].index_select(0, images.segment_ids)
        local = torch.arange(x.shape[0], device=x.device) - offsets
        # 24 bits: exact in float32.
        return (mix32(seeds ^ mix32(local)) >> 8).to(torch.float32)
