"""Public entry point of the scorer fold (:mod:`vs_vllm.kernels.fold_triton`, with its
reference :mod:`vs_vllm.kernels.fold_reference`): Triton on CUDA, the reference elsewhere,
``backend=`` / ``$VS_VLLM_SELECT_BACKEND`` as for the select kernel."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vs_vllm.kernels.backend import resolve_backend
from vs_vllm.kernels.fold_reference import fold_reference


def fold_scorer(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_tokens: Sequence[int],
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    scale: float,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of the packed rows ``x`` (sum N_i, S): ``w`` (B, S) and ``c`` (B,) float32
    with ``scores = x @ w_b + c_b``. Batch-invariant on both backends."""
    if x.dim() != 2 or x.shape[0] != sum(num_tokens):
        raise ValueError(
            f"expected packed rows ({sum(num_tokens)}, S) for images of {list(num_tokens)} "
            f"tokens, got {tuple(x.shape)}"
        )
    if any(n < 1 for n in num_tokens):
        raise ValueError(f"every image needs at least one token, got {list(num_tokens)}")
    if resolve_backend(x.device, backend) == "triton":
        from vs_vllm.kernels.fold_triton import fold_triton

        return fold_triton(x, cu_seqlens, num_tokens, wq, bq, wk, bk, scale)
    return fold_reference(x, num_tokens, wq, bq, wk, bk, scale)
