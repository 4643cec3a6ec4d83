"""Public entry points of the fused select kernel: Triton on CUDA, the PyTorch reference
elsewhere. Set ``VS_VLLM_SELECT_BACKEND=triton|torch`` to force one (e.g. ``triton`` with
``TRITON_INTERPRET=1`` runs the Triton kernel on the CPU).

:func:`score_select` takes a ``score_dim`` for rows wider than what is scored (Qwen3-VL's
``[main | deepstack levels]`` rows): it scores the first ``score_dim`` columns and gathers
whole rows, so the deepstack features follow the kept tokens."""

from __future__ import annotations

import functools
import logging
import os

import torch

from vs_vllm.kernels.score_select_reference import (
    score_select_reference,
    select_by_scores_reference,
)
from vs_vllm.kernels.select_io import SelectOutput

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "torch")


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _log_choice(backend: str, reason: str) -> None:
    logger.debug("vs-vllm select kernel: using %s backend (%s)", backend, reason)


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """``backend``, else ``$VS_VLLM_SELECT_BACKEND``, else triton on CUDA and torch elsewhere."""
    backend = backend or os.environ.get("VS_VLLM_SELECT_BACKEND") or None
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown select backend {backend!r}; choose one of {BACKENDS}")
        if backend == "triton" and not _triton_available():
            raise RuntimeError("select backend 'triton' requested but triton is not installed")
        _log_choice(backend, "requested")
        return backend
    if device.type == "cuda" and _triton_available():
        _log_choice("triton", "CUDA tensor")
        return "triton"
    _log_choice("torch", f"{device.type} tensor" if device.type != "cuda" else "no triton")
    return "torch"


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
) -> SelectOutput:
    """Score (``x[:, :score_dim] @ w_b + c_b``), keep the top ``keep_counts[b]`` of each image,
    gather the kept rows whole.

    x: (sum N_i, D) float32/float16/bfloat16; cu_seqlens: (B+1,) int; keep_counts: (B,) int,
    each in [1, N_i]; total_kept: sum(keep_counts) as a host int (known from prompt
    processing); score_dim: how many leading columns of each row are scored, None for all D,
    else in [1, D]; w: (score_dim,) or (B, score_dim); c: scalar or (B,). The returned rows
    are (total_kept, D) copies of the kept rows, all D columns, whatever ``score_dim``.
    """
    if resolve_backend(x.device, backend) == "triton":
        from vs_vllm.kernels.score_select_triton import score_select_triton

        return score_select_triton(
            x, cu_seqlens, keep_counts, total_kept, w, c, score_dim=score_dim
        )
    return score_select_reference(x, cu_seqlens, keep_counts, total_kept, w, c, score_dim=score_dim)


def select_by_scores(
    x: torch.Tensor,
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep_counts: torch.Tensor,
    total_kept: int,
    *,
    backend: str | None = None,
) -> SelectOutput:
    """Like :func:`score_select` with precomputed (sum N_i,) scores (``norm``, ``random``...)."""
    if resolve_backend(x.device, backend) == "triton":
        from vs_vllm.kernels.score_select_triton import select_by_scores_triton

        return select_by_scores_triton(x, scores, cu_seqlens, keep_counts, total_kept)
    return select_by_scores_reference(x, scores, cu_seqlens, keep_counts, total_kept)
