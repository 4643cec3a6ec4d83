"""``norm``: keep the tokens with the largest L2 norm (training-free)."""

from __future__ import annotations

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.strategies.base import ScoreStrategy


class NormStrategy(ScoreStrategy):
    name = "norm"

    def scores(self, x: torch.Tensor, images: PackedImages) -> torch.Tensor:
        return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
