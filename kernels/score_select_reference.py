"""PyTorch reference of the fused score + select + gather kernel.

Same signature and same results as :mod:`vs_vllm.kernels.score_select_triton`: per image,
keep the ``k_i`` highest scores (ties go to the lower index), return the kept indices in
ascending order and copies of the kept rows. Scores accumulate in float32.

``score_dim`` scores only the first ``score_dim`` columns of each row
(``s = x[:, :score_dim] @ w_b + c_b``) while the kept rows are copied whole (all D columns):
Qwen3-VL rows are ``[main | deepstack levels]`` and the deepstack features follow the kept
tokens.

This is the CPU path (vLLM's CPU backend, tests, training tools). It reads the image sizes
on the host, which is free on the CPU and a sync on a GPU: on CUDA the Triton kernel runs.
"""

from __future__ import annotations

import torch

from vs_vllm.kernels.select_io import (
    SelectOutput,
    allocate_outputs,
    check_tokens,
    fold_params,
    order_keys,
    resolve_score_dim,
)


def _segments(
    cu_seqlens: torch.Tensor, keep_counts: torch.Tensor, total_kept: int, num_tokens: int
) -> list[tuple[int, int, int]]:
    bounds = cu_seqlens.tolist()  # ok-sync: reference path (CPU)
    keeps = keep_counts.tolist()  # ok-sync: reference path (CPU)
    if len(bounds) != len(keeps) + 1 or bounds[0] != 0 or bounds[-1] != num_tokens:
        raise ValueError(
            f"cu_seqlens {bounds} does not describe {num_tokens} tokens in {len(keeps)} images"
        )
    if sum(keeps) != total_kept:
        raise ValueError(f"keep counts {keeps} sum to {sum(keeps)}, but total_kept={total_kept}")
    segments = []
    for i, k in enumerate(keeps):
        n = bounds[i + 1] - bounds[i]
        if not 1 <= k <= n:
            raise ValueError(
                f"image {i} has N={n} tokens; its keep count must be in [1, N], not {k}"
            )
        segments.append((bounds[i], bounds[i + 1], k))
    return segments


def select_by_scores_reference(
    x: torch.Tensor,
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep_counts: torch.Tensor,
    total_kept: int,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    out_rows: torch.Tensor | None = None,
    max_tokens: int | None = None,
) -> SelectOutput:
    """Keep the top ``keep_counts[b]`` tokens of each image by the given float32 ``scores``
    (NaN lowest, see :func:`order_keys`). ``max_tokens`` is accepted for the Triton
    signature and unused."""
    check_tokens(x)
    rows, indices, _ = allocate_outputs(
        x, total_kept, None if out is None else (*out, None), out_rows, with_scores=False
    )
    scores = scores.to(torch.float32)
    keys = order_keys(scores)
    pos = 0
    for start, end, k in _segments(cu_seqlens, keep_counts, total_kept, x.shape[0]):
        # Stable descending sort: among equal keys the lower index comes first.
        order = torch.sort(keys[start:end], descending=True, stable=True).indices[:k]
        kept = torch.sort(order).values
        indices[pos : pos + k] = kept
        rows[pos : pos + k] = x[start:end].index_select(0, kept)
        pos += k
    return SelectOutput(rows, indices, scores)


def score_select_reference(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep_counts: torch.Tensor,
    total_kept: int,
    w: torch.Tensor,
    c: torch.Tensor | float,
    *,
    score_dim: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    out_rows: torch.Tensor | None = None,
    max_tokens: int | None = None,
) -> SelectOutput:
    """Scores ``s = x[:, :score_dim] @ w_b + c_b`` per image (float32), then
    :func:`select_by_scores_reference`, which copies whole rows (all D columns).

    ``score_dim``: None scores all ``x.shape[1]`` columns; else in [1, x.shape[1]], and ``w``
    is (score_dim,) or (B, score_dim).
    """
    check_tokens(x)
    score_dim = resolve_score_dim(x, score_dim)
    num_images = cu_seqlens.shape[0] - 1
    w, c = fold_params(w, c, num_images, score_dim, x.device)
    rows, indices, scores = allocate_outputs(x, total_kept, out, out_rows)
    bounds = cu_seqlens.tolist()  # ok-sync: reference path (CPU)
    for b in range(num_images):
        seg = slice(bounds[b], bounds[b + 1])
        scores[seg] = x[seg, :score_dim].to(torch.float32) @ w[b] + c[b]
    return select_by_scores_reference(
        x, scores, cu_seqlens, keep_counts, total_kept, out=(rows, indices)
    )
