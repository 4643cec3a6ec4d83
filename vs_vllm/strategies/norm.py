"""``norm``: keep the tokens with the largest L2 norm (training-free)."""

from __future__ import annotations

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.strategies.base import ScoreStrategy


class NormStrategy(ScoreStrategy):
    name = "norm"

    def scores(self, x: torch.Tensor, images: PackedImages) -> torch.Tensor:
        """Per image, on the image's own rows: a reduction whose shape depends on that image
        alone, so an image's norms do not depend on what else is in its batch."""
        out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        start = 0
        for n in images.num_tokens:
            torch.linalg.vector_norm(
                x[start : start + n], dim=-1, dtype=torch.float32, out=out[start : start + n]
            )
            start += n
        return out
