"""Score + top-k select + gather for a packed batch of images, in three Triton launches that
each spread their work over the whole GPU.

The batch is ``x`` (sum N_i, D) with image ``b`` at rows ``cu[b]:cu[b+1]`` and keep count
``k_b``. Only the first ``S = score_dim`` columns are scored; the kept rows are copied whole.

1. **Score** (:func:`_score_kernel`; skipped when the scores are given): one program per
   ``BLOCK_M`` rows of the *packed* batch, whatever image they belong to, so ``sum N_i / BLOCK_M``
   programs stream ``x[:, :S]`` once. ``s = x[:, :S] @ w_b + c_b`` accumulates in float32;
   per-image ``w`` / ``c`` are found by a binary search of ``cu_seqlens`` per row (skipped when
   they are shared). This pass reads almost all the bytes, so it is where the bandwidth goes.
2. **Threshold + compact** (:func:`_select_kernel`): one program per image, reading only the
   image's float32 scores (4 bytes per token, against ``2 * D`` bytes per token for the rows).
   Each score maps to an int32 key with the same order. A radix select with 8-bit digits (four
   passes, each a 256-bin histogram of the keys that share the digits found so far) finds
   ``T``, the k-th largest key, and how many of the keys equal to ``T`` are kept. A final pass
   in raster order keeps ``key > T`` and the first ones of ``key == T`` (ties go to the lower
   index), and writes the kept indices (ascending per image) and their packed source rows.
3. **Gather** (:func:`_gather_kernel`): one program per ``BLOCK_K`` kept rows x ``BLOCK_C``
   columns copies the rows, all D columns, bit for bit.

Why three launches and not one: the threshold of an image needs all its scores, which many
programs compute, and the gather of an image needs its threshold; Triton has no grid-wide
barrier, so each dependency is a kernel boundary. (A single persistent kernel with per-image
arrival counters could merge them, at the price of counters that must be reset every call and
of spinning programs; it was not built without a GPU to validate it on.) The old single-launch
kernel ran one program per image, so one SM streamed a whole image: 16x to 490x the
bandwidth floor in the 2026-11-29 H200 sweep (``kernels/NOTES.md``).

No host-device sync: the output size ``sum(k_i)`` is passed in by the caller (who knows it from
prompt processing), block sizes come from host ints only (``sum N_i``, ``sum k_i``, D, the SM
count), and the per-image output offsets are summed on the device. For a fixed batch layout the
three launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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

# -- device functions --------------------------------------------------------------------------


@triton.jit
def _order_key(s):
    """int32 key with the same signed order as the float32 score; ``-0.0`` is folded onto
    ``+0.0``, and every NaN gets the lowest key, below ``-inf`` (a NaN is kept last, ties
    among NaNs to the lower index)."""
    nan = s != s
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(nan, -2147483648, key)


@triton.jit
def _image_of(cu_ptr, rows, num_images, search_steps):
    """Per row, the image ``b`` with ``cu[b] <= row < cu[b + 1]`` (binary search; rows past the
    batch get the last image). ``search_steps`` = ceil(log2(num_images))."""
    lo = tl.zeros_like(rows)
    hi = lo + num_images
    for _ in range(search_steps):
        mid = (lo + hi) >> 1
        go = tl.load(cu_ptr + mid).to(tl.int64) <= rows
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


# -- 1. scores ---------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_tokens", "num_images", "search_steps"])
def _score_kernel(
    x_ptr,
    stride_x,
    scores_ptr,
    w_ptr,
    stride_w,
    c_ptr,
    stride_c,
    cu_ptr,
    num_tokens,
    num_images,
    search_steps,
    S,
    SHARED_W: tl.constexpr,
    SHARED_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_SD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < num_tokens
    if SHARED_W and SHARED_C:
        img = tl.zeros_like(rows)
    else:
        img = _image_of(cu_ptr, rows, num_images, search_steps)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, S, BLOCK_SD):
        cols = d0 + tl.arange(0, BLOCK_SD)
        cmask = cols < S
        xt = tl.load(
            x_ptr + rows[:, None] * stride_x + cols[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        if SHARED_W:
            wv = tl.load(w_ptr + cols, mask=cmask, other=0.0)
            acc += tl.sum(xt * wv[None, :], axis=1)
        else:
            wt = tl.load(
                w_ptr + img[:, None] * stride_w + cols[None, :],
                mask=rmask[:, None] & cmask[None, :],
                other=0.0,
            )
            acc += tl.sum(xt * wt, axis=1)
    c = tl.load(c_ptr) if SHARED_C else tl.load(c_ptr + img * stride_c, mask=rmask, other=0.0)
    tl.store(scores_ptr + rows, acc + c, mask=rmask)


# -- 2. threshold + compaction -----------------------------------------------------------------


@triton.jit
def _radix_pass(scores_ptr, start, n, prefix, prefix_mask, shift, k_rem, BLOCK_T: tl.constexpr):
    """One 8-bit digit of the k-th largest key. Among the keys whose digits above ``shift``
    equal ``prefix`` (in the unsigned order ``key ^ 0x80000000``), histogram the digit at
    ``shift``; pick the largest digit ``d`` with at least ``k_rem`` keys at ``>= d``; drop the
    keys above ``d`` from ``k_rem``."""
    bins = tl.arange(0, 256)
    hist = tl.zeros([256], dtype=tl.int32)
    for i0 in range(0, n, BLOCK_T):
        offs = i0 + tl.arange(0, BLOCK_T)
        valid = offs < n
        key = _order_key(tl.load(scores_ptr + start + offs, mask=valid, other=0.0))
        ukey = key ^ -2147483648
        match = valid & ((ukey & prefix_mask) == prefix)
        digit = tl.where(match, (ukey >> shift) & 0xFF, 0)
        # Unmatched keys were counted in bin 0: take them out (no masked histogram needed).
        hist += tl.histogram(digit, 256)
        hist -= tl.where(bins == 0, tl.sum((~match).to(tl.int32), axis=0), 0)
    # at_or_above[d] = number of matching keys with digit >= d.
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    d = tl.max(tl.where(at_or_above >= k_rem, bins, -1), axis=0)
    above = tl.sum(tl.where(bins > d, hist, 0), axis=0)
    prefix = prefix | (d << shift)
    prefix_mask = prefix_mask | (tl.full([], 0xFF, tl.int32) << shift)
    return prefix, prefix_mask, k_rem - above


@triton.jit
def _select_kernel(
    scores_ptr,
    cu_ptr,
    keep_ptr,
    out_idx_ptr,
    src_ptr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b).to(tl.int64)
    n = tl.load(cu_ptr + b + 1).to(tl.int64) - start
    k = tl.load(keep_ptr + b).to(tl.int32)

    # Output offset of this image: sum of the keep counts before it.
    before = tl.zeros([BLOCK_B], dtype=tl.int64)
    for j0 in range(0, b, BLOCK_B):
        offs_b = j0 + tl.arange(0, BLOCK_B)
        before += tl.load(keep_ptr + offs_b, mask=offs_b < b, other=0).to(tl.int64)
    out_start = tl.sum(before, axis=0)

    # The k-th largest key, 8 bits at a time from the top; k_rem ends as the number of keys
    # equal to it that are kept.
    prefix = tl.zeros([], dtype=tl.int32)
    prefix_mask = tl.zeros([], dtype=tl.int32)
    k_rem = k
    for p in tl.static_range(4):
        prefix, prefix_mask, k_rem = _radix_pass(
            scores_ptr, start, n, prefix, prefix_mask, 24 - 8 * p, k_rem, BLOCK_T
        )
    thr = prefix ^ -2147483648  # back to the signed key order

    # Compact in raster order: indices ascending, ties to the lower index.
    kept_before = tl.zeros([], dtype=tl.int64)
    ties_before = tl.zeros([], dtype=tl.int64)
    for i0 in range(0, n, BLOCK_T):
        offs = i0 + tl.arange(0, BLOCK_T)
        valid = offs < n
        key = _order_key(tl.load(scores_ptr + start + offs, mask=valid, other=0.0))
        tie = (valid & (key == thr)).to(tl.int64)
        tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
        keep = valid & ((key > thr) | ((tie != 0) & (tie_rank < k_rem)))
        keep_i = keep.to(tl.int64)
        pos = out_start + kept_before + tl.cumsum(keep_i, axis=0) - keep_i
        tl.store(out_idx_ptr + pos, offs, mask=keep)
        tl.store(src_ptr + pos, start + offs, mask=keep)
        kept_before += tl.sum(keep_i, axis=0)
        ties_before += tl.sum(tie, axis=0)


# -- 3. gather ---------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["total_kept"])
def _gather_kernel(
    x_ptr,
    stride_x,
    src_ptr,
    out_rows_ptr,
    stride_o,
    total_kept,
    D,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    slots = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    smask = slots < total_kept
    src = tl.load(src_ptr + slots, mask=smask, other=0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = smask[:, None] & (cols < D)[None, :]
    v = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=m)
    tl.store(out_rows_ptr + slots[:, None] * stride_o + cols[None, :], v, mask=m)


# -- launch plan -------------------------------------------------------------------------------


class _Limits(NamedTuple):
    """Block sizes of a target. Everything that changes a float reduction (the scoring tile:
    ``block_m`` rows x ``block_sd`` columns, and its warps) is fixed per scored width, never
    derived from the batch: a row's score is then bit-identical whatever batch it is in.
    The rest (the select step, the gather's rows per program) only moves or counts bits, so it
    may follow the batch, from a few buckets, which bounds the compiled variants. The GPU's
    sizes come from first principles and ptxas's register counts for sm_90 (no spills, at most
    ~128 registers per thread), not from tuning on a GPU. The Triton interpreter runs one
    program at a time in Python, so it gets few, large programs."""

    block_m: int  # scored rows per program (fixed)
    max_block_sd: int  # scored columns per step (fixed per scored width)
    block_t_buckets: tuple[int, ...]  # scores per select step, by the largest image
    block_k_buckets: tuple[int, ...]  # kept rows per gather program, by the batch's kept rows
    max_block_c: int  # gathered columns per program (fixed per row width)
    programs_per_sm: int


_GPU = _Limits(
    block_m=4,
    max_block_sd=1024,
    block_t_buckets=(256, 1024, 4096),
    block_k_buckets=(1, 2, 4, 8),
    max_block_c=1024,
    programs_per_sm=4,
)
_INTERPRETER = _Limits(
    block_m=1024,
    max_block_sd=1024,
    block_t_buckets=(256, 1024, 4096),
    block_k_buckets=(512,),
    max_block_c=1024,
    programs_per_sm=4,
)
_INTERPRETER_SMS = 4


class LaunchPlan(NamedTuple):
    """Block sizes of the three kernels for one batch shape (host ints only)."""

    block_m: int  # rows per scoring program
    block_sd: int  # scored columns per scoring step
    block_t: int  # scores per step of the select program
    block_k: int  # kept rows per gather program
    block_c: int  # columns per gather program
    score_warps: int
    gather_warps: int


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def _bucket(value: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= value, else the largest."""
    return next((b for b in buckets if b >= value), buckets[-1])


def _fixed_sizes(hidden: int, score_dim: int, limits: _Limits) -> tuple[int, int]:
    block_sd = _clamp(triton.next_power_of_2(max(1, score_dim)), 16, limits.max_block_sd)
    block_c = _clamp(triton.next_power_of_2(max(1, hidden)), 16, limits.max_block_c)
    return block_sd, block_c


def _plan(block_t: int, block_k: int, block_sd: int, block_c: int, limits: _Limits) -> LaunchPlan:
    gather_warps = 8 if block_k * block_c >= 4096 else 4
    return LaunchPlan(limits.block_m, block_sd, block_t, block_k, block_c, 8, gather_warps)


def launch_plan(
    num_tokens: int,
    total_kept: int,
    hidden: int,
    score_dim: int,
    num_sms: int,
    limits: _Limits = _GPU,
    max_tokens: int | None = None,
) -> LaunchPlan:
    """Block sizes for a batch: the scoring tile fixed by ``score_dim``, the gather's column
    block by ``hidden``; the select step by the largest image (``max_tokens``, default
    ``num_tokens``), and the gather's rows per program so that its grid has about
    ``programs_per_sm`` programs per SM, both from a few buckets (:func:`reachable_plans`)."""
    block_sd, block_c = _fixed_sizes(hidden, score_dim, limits)
    largest = num_tokens if max_tokens is None else max_tokens
    block_t = _bucket(largest, limits.block_t_buckets)
    target = limits.programs_per_sm * max(1, num_sms)
    col_blocks = triton.cdiv(hidden, block_c)
    want_k = _pow2_floor(total_kept * col_blocks // target)
    block_k = max(
        (b for b in limits.block_k_buckets if b <= want_k), default=limits.block_k_buckets[0]
    )
    return _plan(block_t, block_k, block_sd, block_c, limits)


def reachable_plans(hidden: int, score_dim: int, limits: _Limits = _GPU) -> tuple[LaunchPlan, ...]:
    """Every plan :func:`launch_plan` can return for rows of ``hidden`` columns scored on
    ``score_dim``: what the start-up warm-up compiles."""
    block_sd, block_c = _fixed_sizes(hidden, score_dim, limits)
    return tuple(
        _plan(t, k, block_sd, block_c, limits)
        for t in limits.block_t_buckets
        for k in limits.block_k_buckets
    )


def limits_for(device: torch.device, num_sms: int | None = None) -> tuple[int, _Limits]:
    """(SM count, limits) of the target the kernels run on: a GPU's, or under
    ``TRITON_INTERPRET=1`` the interpreter's (a GPU's plan when ``num_sms`` is given)."""
    if device.type == "cuda":
        return num_sms or _num_sms(device), _GPU
    return (num_sms, _GPU) if num_sms else (_INTERPRETER_SMS, _INTERPRETER)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _search_steps(num_images: int) -> int:
    return max(0, (num_images - 1).bit_length())


def _launch(
    x: torch.Tensor,
    scores: torch.Tensor,
    w: torch.Tensor | None,
    c: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    keep_counts: torch.Tensor,
    rows: torch.Tensor,
    indices: torch.Tensor,
    score_dim: int,
    num_sms: int | None,
    max_tokens: int | None = None,
    plan: LaunchPlan | None = None,
) -> None:
    """Score (when ``w`` is given), select and gather into ``rows`` / ``indices``.
    ``plan`` forces the block sizes (the warm-up compiles every reachable plan)."""
    num_images = cu_seqlens.shape[0] - 1
    num_tokens, hidden = x.shape
    total_kept = rows.shape[0]
    if num_images == 0 or total_kept == 0:
        return
    if plan is None:
        sms, limits = limits_for(x.device, num_sms)
        plan = launch_plan(
            num_tokens, total_kept, hidden, max(1, score_dim), sms, limits, max_tokens
        )
    if w is not None:
        assert c is not None
        _score_kernel[(triton.cdiv(num_tokens, plan.block_m),)](
            x,
            x.stride(0),
            scores,
            w,
            w.stride(0),
            c,
            c.stride(0),
            cu_seqlens,
            num_tokens,
            num_images,
            _search_steps(num_images),
            score_dim,
            SHARED_W=w.stride(0) == 0 or num_images == 1,
            SHARED_C=c.stride(0) == 0 or num_images == 1,
            BLOCK_M=plan.block_m,
            BLOCK_SD=plan.block_sd,
            num_warps=plan.score_warps,
        )
    src = torch.empty(total_kept, dtype=torch.int64, device=x.device)
    _select_kernel[(num_images,)](
        scores,
        cu_seqlens,
        keep_counts,
        indices,
        src,
        BLOCK_T=plan.block_t,
        BLOCK_B=128,
        num_warps=8,
    )
    _gather_kernel[(triton.cdiv(total_kept, plan.block_k), triton.cdiv(hidden, plan.block_c))](
        x,
        x.stride(0),
        src,
        rows,
        rows.stride(0),
        total_kept,
        hidden,
        BLOCK_K=plan.block_k,
        BLOCK_C=plan.block_c,
        num_warps=plan.gather_warps,
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
    out_rows: torch.Tensor | None = None,
    num_sms: int | None = None,
    max_tokens: int | None = None,
    plan: LaunchPlan | None = None,
) -> SelectOutput:
    """Score ``x[:, :score_dim] @ w_b + c_b``, keep the top ``keep_counts[b]`` per image,
    gather the kept rows whole (all D columns): three launches, no host sync.

    ``score_dim``: None scores all ``x.shape[1]`` columns; else in [1, x.shape[1]], and ``w``
    is (score_dim,) or (B, score_dim). ``out`` = (rows, indices, scores) buffers to write into
    (tests use it to check that every element is written); ``out_rows`` only the rows (any
    row stride: the serving path passes the first W columns of its (k, W + 8) buffer).
    ``num_sms`` overrides the SM count the block sizes are planned for (tests use it to run a
    GPU's plan in the interpreter); ``max_tokens`` is the largest image's size (host int).
    """
    check_tokens(x)
    score_dim = resolve_score_dim(x, score_dim)
    x = _row_major(x)
    num_images = cu_seqlens.shape[0] - 1
    w, c = fold_params(w, c, num_images, score_dim, x.device)
    rows, indices, scores = allocate_outputs(x, total_kept, out, out_rows)
    _launch(
        x,
        scores,
        w,
        c,
        cu_seqlens,
        keep_counts,
        rows,
        indices,
        score_dim,
        num_sms,
        max_tokens,
        plan,
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
    out_rows: torch.Tensor | None = None,
    num_sms: int | None = None,
    max_tokens: int | None = None,
    plan: LaunchPlan | None = None,
) -> SelectOutput:
    """Keep the top ``keep_counts[b]`` tokens of each image by precomputed ``scores``; gather
    whole rows. Two launches (select, gather), no host sync."""
    check_tokens(x)
    x = _row_major(x)
    scores = scores.to(torch.float32).contiguous()
    rows, indices, _ = allocate_outputs(
        x, total_kept, None if out is None else (*out, None), out_rows, with_scores=False
    )
    _launch(
        x,
        scores,
        None,
        None,
        cu_seqlens,
        keep_counts,
        rows,
        indices,
        0,
        num_sms,
        max_tokens,
        plan,
    )
    return SelectOutput(rows, indices, scores)
