"""Differentiable top-k of the VisionSelector scorer (training) and the hard top-k it anneals to.

Soft top-k, per image b of a packed batch: find the threshold ``t_b`` with
``sum_{i in b} sigmoid(x_i + t_b) = k_b`` by bisection and return ``p = sigmoid(x + t_b)``.
The backward pass is the exact gradient of that implicit function (not straight-through):
with ``v = sigmoid'(x + t) = p (1 - p)``, per image,
``grad_x = g v - (sum_b(g v) / sum_b(v)) v`` (and ``grad_k_b = sum_b(g v) / sum_b(v)``).

Every image of the batch is solved at once: the bisection keeps one bracket per image and
reduces over ``segment_ids`` with ``index_add_``; there is no loop over images or tokens,
and nothing is read back to the host (no device sync), so it runs inside CUDA graphs too.

Differences from the reference (none changes the root where the reference's bracket holds it):

- The bracket is the reference's ``[-max_b(x) - 10, -min_b(x) + 10]``, widened outward by
  ``logit(k_b / N_b)`` when that is larger, so that it contains the root for every N (the
  reference's fails once ``N * sigmoid(-10) >= k``, i.e. N of about 22,000 tokens at k = 1).
- ``k_b == N_b`` has its root at ``t = +inf``: that image's mask is exactly 1 and its gradient
  exactly 0 (the limit), where the reference's bisection stops at ``sigmoid(10)`` per token,
  a sum off by ``N * 4.5e-5``. Likewise ``k_b <= 0`` (outside the contract) gives 0.
- No Newton refinement after the bisection: 64 halvings of a bracket of width ``W`` reach
  ``W * 2**-64``, below one ulp of ``t`` in float32 and in float64, so the bisection already
  converges to the last bit and ``gradcheck`` passes in float64 without it.

The computation runs in float32 (float64 for float64 scores); only the per-image sums that
steer the bisection accumulate in float64, so the mask sums to k within ~1e-5 even for
thousands of tokens per image. The mask has the scores' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from vs_vllm.batch import PackedImages

DEFAULT_STEPS = 64
BRACKET_MARGIN = 10.0

ImagesLike = PackedImages | tuple[torch.Tensor, torch.Tensor | Sequence[float] | float]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_images: int) -> torch.Tensor:
    out = torch.zeros(num_images, dtype=values.dtype, device=values.device)
    return out.index_add_(0, segment_ids, values)


class SoftTopK(torch.autograd.Function):
    """Per-image soft top-k mask of packed scores; see the module docstring.

    forward(scores (T,), segment_ids (T,) int64, cu_seqlens (B+1,), k (B,) float or int,
    num_images=B, steps=64) -> (T,) mask in the scores' dtype, summing to k_b per image.
    Gradients flow to ``scores`` and, if it requires grad, to a floating ``k``.
    """

    @staticmethod
    def forward(
        ctx,
        scores: torch.Tensor,
        segment_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        k: torch.Tensor,
        num_images: int,
        steps: int = DEFAULT_STEPS,
    ) -> torch.Tensor:
        dtype = _compute_dtype(scores.dtype)
        x = scores.detach().to(dtype)
        seg = segment_ids.to(device=x.device, dtype=torch.int64)
        cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
        n = (cu[1:] - cu[:-1]).to(dtype)
        kk = torch.as_tensor(k, device=x.device).to(dtype).expand(num_images)
        # The per-image sums that steer the bisection accumulate in float64: a float32
        # index_add_ over 2048 tokens drifts by ~1e-3, far more than one ulp of t moves it.
        acc = torch.float32 if x.device.type == "mps" else torch.float64
        k_acc = kk.to(acc)

        big = torch.finfo(dtype).max
        x_max = torch.full((num_images,), -big, dtype=dtype, device=x.device)
        x_max.scatter_reduce_(0, seg, x, reduce="amax", include_self=True)
        x_min = torch.full((num_images,), big, dtype=dtype, device=x.device)
        x_min.scatter_reduce_(0, seg, x, reduce="amin", include_self=True)

        full = kk >= n  # root at t = +inf: mask exactly 1
        empty = kk <= 0  # root at t = -inf: mask exactly 0
        inside = ~(full | empty)
        # logit(k / N) where finite: sigmoid(x_i + t) <= k/N for all i once t <= -max + logit,
        # >= k/N once t >= -min + logit, so the widened bracket always holds the root.
        safe_k = torch.where(inside, kk, n / 2)
        logit = torch.where(inside, torch.log(safe_k) - torch.log(n - safe_k), 0.0)
        lo = -x_max - BRACKET_MARGIN + logit.clamp(max=0.0)
        hi = -x_min + BRACKET_MARGIN + logit.clamp(min=0.0)

        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            total = _segment_sum(torch.sigmoid(x + mid[seg]).to(acc), seg, num_images)
            below = total < k_acc  # threshold too low: the root is above mid
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        t = 0.5 * (lo + hi)

        p = torch.sigmoid(x + t[seg])
        p = torch.where(full[seg], 1.0, torch.where(empty[seg], 0.0, p))
        ctx.save_for_backward(p, seg)
        ctx.num_images = num_images
        return p.to(scores.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        p, seg = ctx.saved_tensors
        num_images = ctx.num_images
        v = p * (1.0 - p)  # sigmoid'(x + t); exactly 0 where saturated
        gv = grad_out.to(p.dtype) * v
        sum_gv = _segment_sum(gv, seg, num_images)
        sum_v = _segment_sum(v, seg, num_images)
        # dt_b/dk_b = 1 / sum_b(v); an image with sum_b(v) == 0 is saturated: gradient 0.
        nonzero = sum_v > 0
        ratio = torch.where(nonzero, sum_gv / torch.where(nonzero, sum_v, 1.0), 0.0)
        grad_scores = grad_k = None
        if ctx.needs_input_grad[0]:
            grad_scores = (gv - ratio[seg] * v).to(grad_out.dtype)
        if ctx.needs_input_grad[3]:
            grad_k = ratio
        return grad_scores, None, None, grad_k, None, None


def _unpack(
    scores: torch.Tensor, images: ImagesLike
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(segment_ids, cu_seqlens, k, num_images) on the scores' device."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (sum N_i,), got shape {tuple(scores.shape)}")
    device = scores.device
    if isinstance(images, PackedImages):
        if scores.shape[0] != images.total_tokens:
            raise ValueError(f"{scores.shape[0]} scores for images of {images.total_tokens} tokens")
        return (
            images.segment_ids.to(device),
            images.cu_seqlens.to(device),
            images.keep_counts.to(device),
            images.num_images,
        )
    cu_seqlens, k = images
    cu_seqlens = torch.as_tensor(cu_seqlens, device=device).to(torch.int64)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D (B+1,), got shape {tuple(cu_seqlens.shape)}")
    num_images = cu_seqlens.shape[0] - 1
    k = torch.as_tensor(k, device=device)
    if k.dim() == 0:
        k = k.expand(num_images)
    if k.shape != (num_images,):
        raise ValueError(f"k must be a scalar or ({num_images},), got shape {tuple(k.shape)}")
    if device.type == "cpu" and int(cu_seqlens[-1]) != scores.shape[0]:  # ok-sync: CPU only
        raise ValueError(
            f"cu_seqlens ends at {int(cu_seqlens[-1])}, not {scores.shape[0]}"
        )  # ok-sync: error path
    segment_ids = torch.repeat_interleave(
        torch.arange(num_images, device=device),
        cu_seqlens[1:] - cu_seqlens[:-1],
        output_size=scores.shape[0],
    )
    return segment_ids, cu_seqlens, k, num_images


def soft_topk_mask(
    scores: torch.Tensor, images: ImagesLike, *, steps: int = DEFAULT_STEPS
) -> torch.Tensor:
    """(sum N_i,) soft mask ``p = sigmoid(x + t_b)`` with ``sum_{i in b} p_i = k_b``.

    ``images`` is a :class:`PackedImages` or ``(cu_seqlens, k)`` with ``k`` one count or one
    per image (int or float, ``1 <= k_b <= N_b``). Differentiable in ``scores`` (and ``k``).
    """
    segment_ids, cu_seqlens, k, num_images = _unpack(scores, images)
    return SoftTopK.apply(scores, segment_ids, cu_seqlens, k, num_images, steps)


def hard_topk_mask(scores: torch.Tensor, images: ImagesLike) -> torch.Tensor:
    """(sum N_i,) 0/1 mask of the ``k_b`` highest scores of each image (ties to the lower index).

    The same choice as :func:`vs_vllm.kernels.select_by_scores` (it also ranks the float32
    scores). A float ``k`` is floored (``int(N * r)`` style). Not differentiable.
    """
    segment_ids, cu_seqlens, k, _ = _unpack(scores, images)
    k = k.floor().to(torch.int64) if k.is_floating_point() else k.to(torch.int64)
    key = scores.detach().to(torch.float32)
    # Stable sort by score (descending), then stable sort by image: within each image the
    # tokens come in descending score order, equal scores in ascending index order.
    by_score = torch.sort(key, descending=True, stable=True).indices
    by_image = torch.sort(segment_ids[by_score], stable=True).indices
    order = by_score[by_image]
    seg_sorted = segment_ids[order]
    rank = torch.arange(order.shape[0], device=order.device) - cu_seqlens[seg_sorted]
    mask_dtype = scores.dtype if scores.is_floating_point() else torch.float32
    mask = torch.zeros(order.shape[0], dtype=mask_dtype, device=order.device)
    mask[order] = (rank < k[seg_sorted]).to(mask_dtype)
    return mask
