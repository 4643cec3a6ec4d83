"""Fused score + top-k select + gather for a packed batch of images, in one Triton launch.

One program per image ``b`` (tokens ``x[cu[b]:cu[b+1]]``, keep count ``k_b``):

1. **Score** (skipped for the precomputed-scores variant): ``s = x[:, :S] @ w_b + c_b``
   accumulated in float32 over (BLOCK_N x BLOCK_SD) tiles of the first ``S = score_dim``
   columns of each row, written to the float32 ``scores`` output.
2. **Threshold**: each score maps to an int32 key whose signed order is the float order
   (``-0.0`` is folded onto ``+0.0``). 32 bisection steps over the key range find ``T``, the
   k-th largest key: the largest value with ``count(key >= T) >= k``. Each step counts over
   the image's scores, which stay in L1/L2.
3. **Compact + gather**: walking the image in raster order, token ``i`` is kept when
   ``key_i > T``, or ``key_i == T`` and fewer than ``k - count(key > T)`` earlier tokens tie at
   ``T`` (ties go to the lower index). A block-wise exclusive cumsum gives each kept token its
   output slot, so indices come out ascending; the kept rows are copied whole (all ``D``
   columns, ``D >= S``) in the input dtype (bit-exact) in the same pass.

``score_dim`` < D is for rows wider than what is scored: Qwen3-VL's vision tower returns rows
``[main | deepstack levels]``; only the main features are scored, and the deepstack features
follow the kept tokens. ``x`` rows are read at the row stride ``stride_x`` (a column slice
with unit column stride is read in place).

No host-device sync: the output size ``sum(k_i)`` is passed in by the caller, who knows it
from prompt processing; per-image output offsets are summed inside the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vs_vllm.kernels.select_io import (
    SelectOutput,
    allocate_outputs,
    check_tokens,
    fold_params,
    resolve_score_dim,
)


@triton.jit
def _order_key(s):
    """int32 key with the same order as the float32 score (for non-NaN values)."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _score_select_kernel(
    x_ptr,
    stride_x,
    scores_ptr,
    w_ptr,
    stride_w,
    c_ptr,
    stride_c,
    cu_ptr,
    keep_ptr,
    out_idx_ptr,
    out_rows_ptr,
    stride_o,
    D,
    S,
    HAS_SCORES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b).to(tl.int64)
    n = tl.load(cu_ptr + b + 1).to(tl.int64) - start
    k = tl.load(keep_ptr + b).to(tl.int64)

    # Output offset of this image: sum of the keep counts before it.
    before = tl.zeros([BLOCK_B], dtype=tl.int64)
    for j0 in range(0, b, BLOCK_B):
        offs_b = j0 + tl.arange(0, BLOCK_B)
        before += tl.load(keep_ptr + offs_b, mask=offs_b < b, other=0).to(tl.int64)
    out_start = tl.sum(before, axis=0)

    # 1. Scores, over the first S columns of each row (D is the row width, for the gather).
    if not HAS_SCORES:
        c = tl.load(c_ptr + b * stride_c)
        for i0 in range(0, n, BLOCK_N):
            rows = i0 + tl.arange(0, BLOCK_N)
            rmask = rows < n
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, S, BLOCK_SD):
                cols = d0 + tl.arange(0, BLOCK_SD)
                cmask = cols < S
                xt = tl.load(
                    x_ptr + (start + rows)[:, None] * stride_x + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :],
                    other=0.0,
                ).to(tl.float32)
                wv = tl.load(w_ptr + b * stride_w + cols, mask=cmask, other=0.0)
                acc += tl.sum(xt * wv[None, :], axis=1)
            tl.store(scores_ptr + start + rows, acc + c, mask=rmask)
        # Make this program's score stores visible to all of its threads.
        tl.debug_barrier()

    # 2. Threshold: the k-th largest key. Invariant: count(key >= lo) >= k > count(key >= hi).
    lo = tl.full([], -2147483648, dtype=tl.int64)
    hi = tl.full([], 2147483648, dtype=tl.int64)
    for _ in range(32):
        mid = (lo + hi) >> 1
        cnt = tl.zeros([BLOCK_S], dtype=tl.int32)
        for i0 in range(0, n, BLOCK_S):
            offs = i0 + tl.arange(0, BLOCK_S)
            m = offs < n
            key = _order_key(tl.load(scores_ptr + start + offs, mask=m, other=0.0))
            cnt += (m & (key.to(tl.int64) >= mid)).to(tl.int32)
        ge = tl.sum(cnt, axis=0).to(tl.int64) >= k
        lo = tl.where(ge, mid, lo)
        hi = tl.where(ge, hi, mid)
    thr = lo.to(tl.int32)

    n_greater = tl.zeros([BLOCK_S], dtype=tl.int32)
    for i0 in range(0, n, BLOCK_S):
        offs = i0 + tl.arange(0, BLOCK_S)
        m = offs < n
        key = _order_key(tl.load(scores_ptr + start + offs, mask=m, other=0.0))
        n_greater += (m & (key > thr)).to(tl.int32)
    ties_to_keep = k - tl.sum(n_greater, axis=0).to(tl.int64)

    # 3. Compact in raster order and copy the kept rows, all D columns.
    kept_before = tl.zeros([], dtype=tl.int64)
    ties_before = tl.zeros([], dtype=tl.int64)
    for i0 in range(0, n, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        rmask = rows < n
        key = _order_key(tl.load(scores_ptr + start + rows, mask=rmask, other=0.0))
        tie = (rmask & (key == thr)).to(tl.int64)
        tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
        keep = rmask & ((key > thr) | ((tie != 0) & (tie_rank < ties_to_keep)))
        keep_i = keep.to(tl.int64)
        pos = out_start + kept_before + tl.cumsum(keep_i, axis=0) - keep_i
        tl.store(out_idx_ptr + pos, rows.to(tl.int64), mask=keep)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m2 = keep[:, None] & (cols < D)[None, :]
            v = tl.load(x_ptr + (start + rows)[:, None] * stride_x + cols[None, :], mask=m2)
            tl.store(out_rows_ptr + pos[:, None] * stride_o + cols[None, :], v, mask=m2)
        kept_before += tl.sum(keep_i, axis=0)
        ties_before += tl.sum(tie, axis=0)


_BLOCK_D = 128


def _score_block(score_dim: int) -> int:
    """Column tile of the scoring loop: ``_BLOCK_D``, or less for a narrow ``score_dim``
    (at least 16, a power of two)."""
    return max(16, min(_BLOCK_D, triton.next_power_of_2(score_dim)))


def _launch(
    x: torch.Tensor,
    scores: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep_counts: torch.Tensor,
    rows: torch.Tensor,
    indices: torch.Tensor,
    has_scores: bool,
    score_dim: int,
) -> None:
    num_images = cu_seqlens.shape[0] - 1
    if num_images == 0 or rows.shape[0] == 0:
        return
    hidden = x.shape[1]
    _score_select_kernel[(num_images,)](
        x,
        x.stride(0),
        scores,
        w,
        w.stride(0),
        c,
        c.stride(0),
        cu_seqlens,
        keep_counts,
        indices,
        rows,
        rows.stride(0),
        hidden,
        score_dim,
        HAS_SCORES=has_scores,
        BLOCK_N=32,
        BLOCK_D=_BLOCK_D,
        BLOCK_SD=_score_block(score_dim),
        BLOCK_S=1024,
        BLOCK_B=128,
        num_warps=4,
    )


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def score_select_triton(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep_counts: torch.Tensor,
    total_kept: int,
    w: torch.Tensor,
    c: torch.Tensor | float,
    *,
    score_dim: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> SelectOutput:
    """Score ``x[:, :score_dim] @ w_b + c_b``, keep the top ``keep_counts[b]`` per image,
    gather the kept rows whole (all D columns): one launch.

    ``score_dim``: None scores all ``x.shape[1]`` columns; else in [1, x.shape[1]], and ``w``
    is (score_dim,) or (B, score_dim). ``out`` = (rows, indices, scores) buffers to write into
    (tests use it to check that every element is written).
    """
    check_tokens(x)
    score_dim = resolve_score_dim(x, score_dim)
    x = _row_major(x)
    num_images = cu_seqlens.shape[0] - 1
    w, c = fold_params(w, c, num_images, score_dim, x.device)
    rows, indices, scores = allocate_outputs(x, total_kept) if out is None else out
    _launch(
        x,
        scores,
        w,
        c,
        cu_seqlens,
        keep_counts,
        rows,
        indices,
        has_scores=False,
        score_dim=score_dim,
    )
    return SelectOutput(rows, indices, scores)


def select_by_scores_triton(
    x: torch.Tensor,
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep_counts: torch.Tensor,
    total_kept: int,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SelectOutput:
    """Keep the top ``keep_counts[b]`` tokens of each image by precomputed ``scores``; gather."""
    check_tokens(x)
    x = _row_major(x)
    scores = scores.to(torch.float32).contiguous()
    rows, indices, _ = allocate_outputs(x, total_kept) if out is None else (*out, None)
    dummy = scores[:1]
    _launch(
        x,
        scores,
        dummy,
        dummy,
        cu_seqlens,
        keep_counts,
        rows,
        indices,
        has_scores=True,
        score_dim=0,
    )
    return SelectOutput(rows, indices, scores)
