"""Inputs and outputs shared by the Triton kernel and its PyTorch reference.

Rows of ``x`` may be wider than what is scored: with ``score_dim`` < D only the first
``score_dim`` columns of each row are scored (``w`` has ``score_dim`` entries per image), but
the kept rows are gathered whole (all D columns). Qwen3-VL's vision tower returns rows
``[main | deepstack levels]``; the scorer reads the main features, and the deepstack features
follow the kept tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class SelectOutput(NamedTuple):
    """Result of a packed selection.

    rows:    (sum k_i, D) kept rows, whole copies of the input rows (all D columns, also when
             only a prefix of ``score_dim`` columns was scored), in the input dtype.
    indices: (sum k_i,) int64 indices *within each image*, ascending per image, packed.
    scores:  (sum N_i,) float32 scores that drove the selection.
    """

    rows: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor


def check_tokens(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"visual tokens must be 2-D (sum N_i, D), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"visual tokens must be float32/float16/bfloat16, got {x.dtype}")


def resolve_score_dim(x: torch.Tensor, score_dim: int | None) -> int:
    """The number of leading columns of each row that are scored: ``x.shape[1]`` when
    ``score_dim`` is None, else ``score_dim``, which must be in [1, x.shape[1]]."""
    if score_dim is None:
        return x.shape[1]
    if isinstance(score_dim, bool) or not isinstance(score_dim, int):
        raise TypeError(f"score_dim must be an int or None, got {type(score_dim).__name__}")
    if not 1 <= score_dim <= x.shape[1]:
        raise ValueError(
            f"score_dim must be in [1, {x.shape[1]}] (the row width of x), got {score_dim}"
        )
    return score_dim


def fold_params(
    w: torch.Tensor,
    c: torch.Tensor | float,
    num_images: int,
    score_dim: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``w`` as (B, score_dim) float32 with unit column stride and ``c`` as (B,)
    float32 (broadcast views, no copies when already float32 with unit column stride)."""
    w = torch.as_tensor(w, device=device).to(torch.float32)
    if w.dim() >= 1 and w.stride(-1) != 1:
        w = w.contiguous()
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(num_images, -1)
    if w.shape != (num_images, score_dim):
        raise ValueError(
            f"w must be ({score_dim},) or ({num_images}, {score_dim}) for score_dim={score_dim},"
            f" got {tuple(w.shape)}"
        )
    if isinstance(c, int | float):
        # A fill on the device, not a host-to-device copy: capturable in a CUDA graph.
        c = torch.full((num_images,), float(c), dtype=torch.float32, device=device)
    c = torch.as_tensor(c, dtype=torch.float32, device=device)
    if c.dim() == 0:
        c = c.expand(num_images)
    if c.shape != (num_images,):
        raise ValueError(f"c must be a scalar or ({num_images},), got {tuple(c.shape)}")
    return w, c


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys with the selection's order of float32 ``scores``: higher is kept first,
    ``-0.0`` equals ``+0.0``, and every NaN is lowest (below ``-inf``), so a NaN score has a
    defined place: kept last. The Triton kernel maps scores to the same keys."""
    s = scores.to(torch.float32)
    s = torch.where(s == 0, torch.zeros_like(s), s)
    bits = s.view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return torch.where(torch.isnan(s), torch.full_like(key, -(2**31)), key).to(torch.int64)


def allocate_outputs(
    x: torch.Tensor,
    total_kept: int,
    out: tuple | None = None,
    out_rows: torch.Tensor | None = None,
    *,
    with_scores: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``out`` (rows, indices, scores) when given, else new buffers; ``out_rows`` replaces
    just the rows: a (total_kept, D) tensor with unit column stride and any row stride."""
    if out is not None:
        return out
    if out_rows is None:
        rows = torch.empty(total_kept, x.shape[1], dtype=x.dtype, device=x.device)
    else:
        if (
            tuple(out_rows.shape) != (total_kept, x.shape[1])
            or out_rows.dtype != x.dtype
            or (x.shape[1] > 1 and out_rows.stride(1) != 1)
        ):
            raise ValueError(
                f"out_rows must be ({total_kept}, {x.shape[1]}) {x.dtype} with unit column "
                f"stride, got {tuple(out_rows.shape)} {out_rows.dtype} strides "
                f"{out_rows.stride()}"
            )
        rows = out_rows
    indices = torch.empty(total_kept, dtype=torch.int64, device=x.device)
    scores = torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if with_scores else None
    return rows, indices, scores
