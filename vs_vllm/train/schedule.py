"""Curriculum annealing and learning-rate schedule of the scorer's training.

Loss = LM cross-entropy + lambda(step) * BCE(soft mask, hard top-k mask), with lambda rising
linearly from 0.1 to 2.0 (Qwen2.5-VL; 3.0 for LLaVA-OV) over training, so the soft mask is
pushed toward the hard top-k that inference uses. The learning rate follows the reference's
HF Trainer schedule: linear warmup over ``ceil(warmup_ratio * total_steps)`` steps, then a
half cosine down to ``min_lr_ratio`` (0 by default) at ``total_steps``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

BCE_EPS = 1e-6


def bce_weight(step: int, max_steps: int, start: float = 0.1, end: float = 2.0) -> float:
    """lambda(step): ``start`` at step 0, ``end`` at ``max_steps``, linear in between, clamped."""
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    frac = min(max(step / max_steps, 0.0), 1.0)
    return start + (end - start) * frac


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float = 0.03,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup from 0 to the optimizer's lr, then cosine to ``min_lr_ratio * lr``.

    Warmup lasts ``ceil(warmup_ratio * total_steps)`` steps (HF Trainer's rule); the factor is
    ``step / warmup`` during it, 1 at its end, ``min_lr_ratio`` at ``total_steps`` and after.
    Call ``scheduler.step()`` once per optimizer step.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        decay_steps = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def selection_loss(
    lm_loss: torch.Tensor,
    soft_mask: torch.Tensor,
    hard_mask: torch.Tensor,
    weight: float,
    *,
    eps: float = BCE_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lm_loss + weight * bce, bce)``: bce is the mean over tokens of BCE(soft, hard).

    The soft mask is clamped to ``[eps, 1 - eps]`` before the logs (a saturated token gives a
    finite loss and no gradient); the BCE is computed in float32 (float64 stays float64).
    """
    if soft_mask.shape != hard_mask.shape:
        raise ValueError(
            f"soft mask {tuple(soft_mask.shape)} and hard mask {tuple(hard_mask.shape)} differ"
        )
    dtype = torch.float64 if soft_mask.dtype == torch.float64 else torch.float32
    if soft_mask.numel() == 0:
        bce = torch.zeros((), dtype=dtype, device=soft_mask.device)
    else:
        p = soft_mask.to(dtype).clamp(eps, 1.0 - eps)
        y = hard_mask.to(dtype)
        bce = -(y * torch.log(p) + (1.0 - y) * torch.log1p(-p)).mean()
    return lm_loss + weight * bce, bce
