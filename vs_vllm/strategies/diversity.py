"""``diversity``: DivPrune-style greedy max-min cosine diversity (training-free).

Per image, with cosine distance ``d(i, j) = 1 - cos(x_i, x_j)``:
1. the first token kept is the one whose nearest other token is farthest away;
2. each next one is the token whose distance to the kept set (its minimum distance to any kept
   token) is largest.
Ties go to the lower index. Memory is O(N) per image beyond a bounded chunk of the first
step's similarities; time O(N^2 D) for step 1 and O(k N D) after. Every step stays on the
device: no host-device sync, only the host loop over k (known from prompt processing).
"""

from __future__ import annotations

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.kernels import SelectOutput
from vs_vllm.strategies.base import SelectionStrategy, gather_kept, scored_columns

_CHUNK = 1024


def divprune_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the k tokens of one image ``x`` (N, D) that DivPrune keeps."""
    n = x.shape[0]
    if k >= n:
        return torch.arange(n, device=x.device)
    f = torch.nn.functional.normalize(x.float(), dim=-1)
    # Step 1: nearest-neighbour distance of every token (self excluded), chunked.
    nearest = torch.empty(n, dtype=torch.float32, device=x.device)
    for s in range(0, n, _CHUNK):
        sim = f[s : s + _CHUNK] @ f.t()
        rows = torch.arange(sim.shape[0], device=x.device)
        sim[rows, rows + s] = -float("inf")
        nearest[s : s + _CHUNK] = 1.0 - sim.max(dim=1).values
    kept = torch.empty(k, dtype=torch.long, device=x.device)
    kept[0] = torch.argmax(nearest)
    # Step 2: greedy max-min.
    min_dist = torch.full((n,), float("inf"), dtype=torch.float32, device=x.device)
    for i in range(1, k):
        newest = f.index_select(0, kept[i - 1 : i])  # (1, D)
        min_dist = torch.minimum(min_dist, 1.0 - (f @ newest.t()).squeeze(1))
        min_dist.index_fill_(0, kept[:i], -float("inf"))
        kept[i] = torch.argmax(min_dist)
    return torch.sort(kept).values


class DiversityStrategy(SelectionStrategy):
    name = "diversity"

    def select(
        self,
        x: torch.Tensor,
        images: PackedImages,
        *,
        score_dim: int | None = None,
        out_rows: torch.Tensor | None = None,
    ) -> SelectOutput:
        scored = scored_columns(x, score_dim)
        parts = []
        start = 0
        for n, k in zip(images.num_tokens, images.num_kept, strict=True):
            parts.append(divprune_indices(scored[start : start + n], k))
            start += n
        return gather_kept(x, images, torch.cat(parts))
