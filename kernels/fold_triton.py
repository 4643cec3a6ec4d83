"""The scorer fold in Triton: per image ``w = W_q^T kbar`` and ``c = b_q . kbar`` with
``kbar = (W_k xbar + b_k) * scale`` and ``xbar`` the image's mean row.

Batch- and rank-invariant by construction (the bar of vLLM's ``VLLM_BATCH_INVARIANT`` mode):
every float reduction runs in an order fixed by the image alone, never by the batch.

1. **Chunk sums** (:func:`_chunk_sum_kernel`): each image is cut into chunks of ``CHUNK`` rows
   that start at the image's first row; one program per chunk x column block sums its rows in
   ``BLOCK_R``-row steps, then over the ``BLOCK_R`` lanes. The chunk table is computed on the
   device from ``cu_seqlens``; the grid is an upper bound (``cdiv(sum N, CHUNK) + B``) so no
   host sync is needed, and programs past the last chunk write nothing.
2. **Chunk reduce** (:func:`_chunk_reduce_kernel`): one program per image x column block adds
   the image's chunk sums in chunk order and divides by N. No atomics anywhere.
3. **Projections** (:func:`_project_kernel`, three launches: ``kbar``, ``w``, ``c``): one
   program per image x ``BLOCK_N`` outputs, a fixed loop over ``BLOCK_K`` inputs. One image per
   program, so no image's result depends on another's place in a tile.

Block sizes are fixed constants (:data:`GPU_FOLD_PLAN`), never derived from the batch, so the
same image always sees the same reduction tree, and the set of compiled variants is bounded.
The scratch is ``(cdiv(sum N, CHUNK) + B, S)`` float32 (1/128 of an fp32 copy of ``x`` at
``CHUNK`` = 256), not a copy of ``x``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class FoldPlan(NamedTuple):
    chunk: int  # rows per chunk (fixes the reduction order: never from the batch)
    block_r: int  # rows per step inside a chunk
    block_d: int  # columns per program of the mean
    block_n: int  # outputs per program of a projection
    block_k: int  # inputs per step of a projection


#: A GPU's plan (tiles of 2048-4096 elements; no tuning on a GPU yet).
GPU_FOLD_PLAN = FoldPlan(chunk=256, block_r=16, block_d=128, block_n=32, block_k=128)
#: The interpreter runs one program at a time in Python: few, large programs.
INTERPRETER_FOLD_PLAN = FoldPlan(chunk=256, block_r=256, block_d=1024, block_n=256, block_k=1024)


def fold_plan_for(device: torch.device, num_sms: int | None = None) -> FoldPlan:
    """A GPU's plan on CUDA (and in the interpreter when ``num_sms`` asks for a GPU's plans),
    the interpreter's otherwise."""
    return GPU_FOLD_PLAN if device.type == "cuda" or num_sms else INTERPRETER_FOLD_PLAN


@triton.jit
def _chunk_of(cu_chunks_ptr, p, num_images, search_steps):
    """The image ``b`` with ``cu_chunks[b] <= p < cu_chunks[b + 1]`` (binary search)."""
    lo = p * 0
    hi = lo + num_images
    for _ in range(search_steps):
        mid = (lo + hi) >> 1
        go = tl.load(cu_chunks_ptr + mid) <= p
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit(do_not_specialize=["num_images", "search_steps"])
def _chunk_sum_kernel(
    x_ptr,
    stride_x,
    cu_ptr,
    cu_chunks_ptr,
    partial_ptr,
    stride_p,
    num_images,
    search_steps,
    S,
    CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    valid = p < tl.load(cu_chunks_ptr + num_images)
    b = _chunk_of(cu_chunks_ptr, p, num_images, search_steps)
    first = tl.load(cu_ptr + b).to(tl.int64) + (p - tl.load(cu_chunks_ptr + b)) * CHUNK
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < S
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r0 in tl.static_range(0, CHUNK, BLOCK_R):
        rows = first + r0 + tl.arange(0, BLOCK_R)
        m = valid & (rows < end)[:, None] & cmask[None, :]
        acc += tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(
            tl.float32
        )
    tl.store(partial_ptr + p * stride_p + cols, tl.sum(acc, axis=0), mask=valid & cmask)


@triton.jit
def _chunk_reduce_kernel(
    partial_ptr,
    stride_p,
    cu_ptr,
    cu_chunks_ptr,
    out_ptr,
    stride_o,
    S,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < S
    c0 = tl.load(cu_chunks_ptr + b)
    c1 = tl.load(cu_chunks_ptr + b + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p in range(c0, c1):  # chunk order: fixed by the image alone
        acc += tl.load(partial_ptr + p * stride_p + cols, mask=cmask, other=0.0)
    n = (tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)).to(tl.float32)
    tl.store(out_ptr + b * stride_o + cols, acc / n, mask=cmask)


@triton.jit(do_not_specialize=["K", "N"])
def _project_kernel(
    a_ptr,
    stride_a,
    w_ptr,
    stride_wn,
    stride_wk,
    bias_ptr,
    out_ptr,
    stride_o,
    K,
    N,
    scale,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[b, n] = (sum_k W[n, k] a[b, k] + bias[n]) * scale``, one image per program."""
    b = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(a_ptr + b * stride_a + ks, mask=kmask, other=0.0)
        wt = tl.load(
            w_ptr + ns[:, None] * stride_wn + ks[None, :] * stride_wk,
            mask=nmask[:, None] & kmask[None, :],
            other=0.0,
        )
        acc += tl.sum(wt * a[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ns, mask=nmask, other=0.0)
    tl.store(out_ptr + b * stride_o + ns, acc * scale, mask=nmask)


def _search_steps(num_images: int) -> int:
    return max(0, (num_images - 1).bit_length())


def _project(
    a: torch.Tensor,
    w: torch.Tensor,
    stride_wn: int,
    stride_wk: int,
    n_out: int,
    bias: torch.Tensor | None,
    scale: float,
    plan: FoldPlan,
) -> torch.Tensor:
    num_images, k_in = a.shape
    out = torch.empty(num_images, n_out, dtype=torch.float32, device=a.device)
    _project_kernel[(num_images, triton.cdiv(n_out, plan.block_n))](
        a,
        a.stride(0),
        w,
        stride_wn,
        stride_wk,
        a if bias is None else bias,
        out,
        out.stride(0),
        k_in,
        n_out,
        scale,
        HAS_BIAS=bias is not None,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        num_warps=4,
    )
    return out


def fold_triton(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_tokens: Sequence[int],
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    scale: float,
    *,
    plan: FoldPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (B, S) and ``c`` (B,) float32 for the packed rows ``x`` (sum N_i, S), any row
    stride (a view of the scored columns of wider rows works). ``num_tokens`` are the host
    sizes (only their count and sum are used: no sync)."""
    if plan is None:
        plan = fold_plan_for(x.device)
    num_images = len(num_tokens)
    score_dim = x.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    wq, bq, wk, bk = (t.to(torch.float32).contiguous() for t in (wq, bq, wk, bk))
    counts = cu_seqlens[1:] - cu_seqlens[:-1]
    cu_chunks = torch.nn.functional.pad(
        torch.cumsum(torch.div(counts + plan.chunk - 1, plan.chunk, rounding_mode="floor"), 0),
        (1, 0),
    )
    max_chunks = triton.cdiv(sum(num_tokens), plan.chunk) + num_images
    partial = torch.empty(max_chunks, score_dim, dtype=torch.float32, device=x.device)
    col_blocks = triton.cdiv(score_dim, plan.block_d)
    _chunk_sum_kernel[(max_chunks, col_blocks)](
        x,
        x.stride(0),
        cu_seqlens,
        cu_chunks,
        partial,
        partial.stride(0),
        num_images,
        _search_steps(num_images),
        score_dim,
        CHUNK=plan.chunk,
        BLOCK_R=plan.block_r,
        BLOCK_D=plan.block_d,
        num_warps=4,
    )
    xbar = torch.empty(num_images, score_dim, dtype=torch.float32, device=x.device)
    _chunk_reduce_kernel[(num_images, col_blocks)](
        partial,
        partial.stride(0),
        cu_seqlens,
        cu_chunks,
        xbar,
        xbar.stride(0),
        score_dim,
        BLOCK_D=plan.block_d,
        num_warps=4,
    )
    half = wk.shape[0]
    # kbar = (W_k xbar + b_k) * scale; W_k is (S/2, S): n over rows, k over columns.
    kbar = _project(xbar, wk, wk.stride(0), 1, half, bk, scale, plan)
    # w = W_q^T kbar; W_q is (S/2, S): n over its columns, k over its rows.
    w = _project(kbar, wq, 1, wq.stride(0), score_dim, None, 1.0, plan)
    # c = b_q . kbar: one output, the bias vector as a (1, S/2) matrix.
    c = _project(kbar, bq, 0, 1, 1, None, 1.0, plan)[:, 0]
    return w, c
