"""Inputs and outputs shared by the Triton kernel and its PyTorch reference."""

from __future__ import annotations

from typing import NamedTuple

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class SelectOutput(NamedTuple):
    """Result of a packed selection.

    rows:    (sum k_i, D) kept rows, copies of the input rows, in the input dtype.
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


def fold_params(
    w: torch.Tensor, c: torch.Tensor | float, num_images: int, hidden: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``w`` as (B, D) float32 and ``c`` as (B,) float32 (broadcast views, no copies
    when already float32)."""
    w = torch.as_tensor(w, device=device).to(torch.float32)
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(num_images, -1)
    if w.shape != (num_images, hidden):
        raise ValueError(f"w must be ({hidden},) or ({num_images}, {hidden}), got {tuple(w.shape)}")
    c = torch.as_tensor(c, dtype=torch.float32, device=device)
    if c.dim() == 0:
        c = c.expand(num_images)
    if c.shape != (num_images,):
        raise ValueError(f"c must be a scalar or ({num_images},), got {tuple(c.shape)}")
    return w, c


def allocate_outputs(
    x: torch.Tensor, total_kept: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = torch.empty(total_kept, x.shape[1], dtype=x.dtype, device=x.device)
    indices = torch.empty(total_kept, dtype=torch.int64, device=x.device)
    scores = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    return rows, indices, scores
