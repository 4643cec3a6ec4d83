"""Public entry points of the fused select kernel: Triton on CUDA, the PyTorch reference
elsewhere. Set ``VS_VLLM_SELECT_BACKEND=triton|torch`` to force one (e.g. ``triton`` with
``TRITON_INTERPRET=1`` runs the Triton kernel on the CPU).

:func:`score_select` takes a ``score_dim`` for rows wider than what is scored (Qwen3-VL's
``[main | deepstack levels]`` rows): it scores the first ``score_dim`` columns and gathers
whole rows, so the deepstack features follow the kept tokens."""

from __future__ import annotations

import torch

from vs_vllm.kernels.backend import resolve_backend
from vs_vllm.kernels.score_select_reference import (
    score_select_reference,
    select_by_scores_reference,
)
from vs_vllm.kernels.select_io import SelectOutput

__all__ = ["resolve_backend", "score_select", "select_by_scores"]


def score_select(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep_counts: torch.Tensor,
    total_kept: int,
    w: torch.Tensor,
    c: torch.Tensor | float,
    *,
    score_dim: int | None = None,
    backend: str | None = None,
    out_rows: torch.Tensor | None = None,
    max_tokens: int | None = None,
) -> SelectOutput:
    """Score (``x[:, :score_dim] @ w_b + c_b``), keep the top ``keep_counts[b]`` of each image,
    gather the kept rows whole.

    x: (sum N_i, D) float32/float16/bfloat16; cu_seqlens: (B+1,) int; keep_counts: (B,) int,
    each in [1, N_i]; total_kept: sum(keep_counts) as a host int (known from prompt
    processing); score_dim: how many leading columns of each row are scored, None for all D,
    else in [1, D]; w: (score_dim,) or (B, score_dim); c: scalar or (B,). The returned rows
    are (total_kept, D) copies of the kept rows, all D columns, whatever ``score_dim``,
    written into ``out_rows`` when given (any row stride). ``max_tokens``: the largest
    image's token count (host int), which sizes the select step.

    Scores of a NaN are ranked lowest (kept last); ties go to the lower index.
    """
    if resolve_backend(x.device, backend) == "triton":
        from vs_vllm.kernels.score_select_triton import score_select_triton

        return score_select_triton(
            x,
            cu_seqlens,
            keep_counts,
            total_kept,
            w,
            c,
            score_dim=score_dim,
            out_rows=out_rows,
            max_tokens=max_tokens,
        )
    return score_select_reference(
        x, cu_seqlens, keep_counts, total_kept, w, c, score_dim=score_dim, out_rows=out_rows
    )


def select_by_scores(
    x: torch.Tensor,
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep_counts: torch.Tensor,
    total_kept: int,
    *,
    backend: str | None = None,
    out_rows: torch.Tensor | None = None,
    max_tokens: int | None = None,
) -> SelectOutput:
    """Like :func:`score_select` with precomputed (sum N_i,) scores (``norm``, ``random``...)."""
    if resolve_backend(x.device, backend) == "triton":
        from vs_vllm.kernels.score_select_triton import select_by_scores_triton

        return select_by_scores_triton(
            x,
            scores,
            cu_seqlens,
            keep_counts,
            total_kept,
            out_rows=out_rows,
            max_tokens=max_tokens,
        )
    return select_by_scores_reference(
        x, scores, cu_seqlens, keep_counts, total_kept, out_rows=out_rows
    )
