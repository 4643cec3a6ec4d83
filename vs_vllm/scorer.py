"""The VisionSelector scorer: a tiny module that rates every visual token of an image.

Reference semantics (arXiv 2510.16598): ``s_i = mean_j(q_i . k_j) / sqrt(D/2)`` with
``q = x W_q^T + b_q`` and ``k = x W_k^T + b_k``. Because the mean is linear,
``mean_j k_j = W_k xbar + b_k`` with ``xbar`` the image's mean token, so the scores fold into
one vector per image: ``s = x @ w + c`` with ``w = W_q^T kbar / sqrt(D/2)`` and
``c = b_q . kbar / sqrt(D/2)``. That is O(N*D) per image (plus O(D^2) for the fold), never an
N x N matrix, and the fold is what the fused select kernel consumes.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

INIT_STD = 1e-4


def _acc(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the accumulation dtype: float32, or float64 when it already is."""
    return x if x.dtype == torch.float64 else x.float()


class VisionSelectorScorer(nn.Module):
    """Scores visual tokens. Parameter names match the reference (``q_proj``, ``k_proj``)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        if hidden_size < 2 or hidden_size % 2:
            raise ValueError(f"hidden_size must be an even number >= 2, got {hidden_size}")
        self.hidden_size = hidden_size
        self.q_proj = nn.Linear(hidden_size, hidden_size // 2, bias=True)
        self.k_proj = nn.Linear(hidden_size, hidden_size // 2, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=INIT_STD)
            nn.init.zeros_(proj.bias)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.hidden_size // 2)

    def _fold_means(self, xbar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) mean tokens -> w (B, D) and c (B,), in ``xbar``'s dtype."""
        dt = xbar.dtype
        wq, bq = self.q_proj.weight.to(dt), self.q_proj.bias.to(dt)
        wk, bk = self.k_proj.weight.to(dt), self.k_proj.bias.to(dt)
        kbar = (xbar @ wk.t() + bk) * self.scale  # (B, D/2)
        return kbar @ wq, kbar @ bq

    def fold(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded form for one image ``x`` (N, D): ``w`` (D,) and scalar ``c``.

        float32 (float64 when ``x`` is float64)."""
        self._check_tokens(x)
        w, c = self._fold_means(_acc(x).mean(dim=0, keepdim=True))
        return w[0], c[0]

    def fold_packed(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded form for a packed batch: ``w`` (B, D) and ``c`` (B,), float32,
        differentiable (training, analysis).

        ``x`` is (sum N_i, D); ``cu_seqlens`` (B+1) the image boundaries. Each image's mean is
        a reduction over its own rows (no atomics, no float32 copy of ``x``). Serving folds
        with ``kernels.fold_scorer`` instead: batch-invariant, no host sync.
        """
        self._check_tokens(x)
        bounds = cu_seqlens.tolist()  # ok-sync: training / analysis path, not serving
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xbar = torch.stack(
            [x[s:e].sum(dim=0, dtype=acc) / max(1, e - s) for s, e in itertools.pairwise(bounds)]
        )
        return self._fold_means(xbar)

    def packed_scores(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, segment_ids: torch.Tensor
    ) -> torch.Tensor:
        """(sum N_i,) float32 scores of a packed batch, differentiable in the scorer (and
        ``x``): the unfused form of what the select kernel computes. ``segment_ids`` is the
        image of every token."""
        w, c = self.fold_packed(x, cu_seqlens)
        return (x.float() * w.index_select(0, segment_ids)).sum(-1) + c.index_select(0, segment_ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of one image's tokens ``x`` (N, D): (N,) float32 (float64 for float64 ``x``)."""
        w, c = self.fold(x)
        return _acc(x) @ w + c

    def _check_tokens(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(
                f"expected visual tokens of shape (N, {self.hidden_size}), got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError("an image must have at least one visual token, got N=0")

    @staticmethod
    def num_parameters_for(hidden_size: int) -> int:
        """2 * (D * D/2 + D/2): 12,848,640 at D=3584 (Qwen2.5-VL-7B)."""
        return 2 * (hidden_size * (hidden_size // 2) + hidden_size // 2)
