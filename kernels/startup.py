"""What the serving model runs once at load, on its device, before any request: compile every
kernel variant the engine can reach (:func:`warm_up`), then check the Triton kernels against
the PyTorch reference on a dummy batch, exactly (:func:`self_check`).
:func:`prepare_select_backend` does both and returns the backend to select with.

No compile on the request path: the kernels' block sizes come from a few buckets
(``score_select_triton.reachable_plans``; the fold's are fixed) and every size argument is
``do_not_specialize``, so a batch shape never seen before reuses a compiled variant. What
still keys a variant is fixed per model: the dtype, the row and scored widths, the row strides
(the tower's packed rows, the ``(k, W + 8)`` output buffer) and whether the batch has one image
or several (per-image ``w`` / ``c``). The warm-up launches each of those once.

The self-check's data are small integers (and means of 2^j rows), so every score and fold
value is exact in float32 whatever the summation order: Triton and torch must agree bit for
bit on the fold, the scores, the kept indices (ties included) and the rows. On a mismatch or
an error it logs one warning line naming the backend and the device, and serving selects with
torch. ``$VS_VLLM_SELECT_BACKEND`` forces a backend and skips both steps.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from vs_vllm.kernels.backend import BACKEND_ENV, resolve_backend
from vs_vllm.kernels.fold_reference import fold_reference
from vs_vllm.kernels.score_select_reference import (
    score_select_reference,
    select_by_scores_reference,
)

logger = logging.getLogger(__name__)

#: Extra columns of the serving output buffer (the position channels).
SERVING_EXTRA_COLUMNS = 8

# The self-check's batch: every N a power of two (exact means), k = 1, k = N, a tie-heavy mix.
_CHECK_SIZES = (4, 8, 16, 2)
_CHECK_KEEPS = (1, 8, 5, 2)


def _dummy_scorer(score_dim: int, device: torch.device, gen: torch.Generator):
    """Sparse {-1, 0, 1} projections (at most 4 non-zeros per output) with exact folds."""
    half = max(1, score_dim // 2)

    def sparse(rows: int, cols: int) -> torch.Tensor:
        at = torch.randint(0, cols, (rows, min(4, cols)), generator=gen)
        values = torch.randint(-1, 2, at.shape, generator=gen).float()
        return torch.zeros(rows, cols).scatter_(1, at, values).to(device)

    wk = sparse(half, score_dim)
    wq = sparse(score_dim, half).t().contiguous()  # at most 4 non-zeros per column of w
    bk = torch.randint(-2, 3, (half,), generator=gen).float().to(device)
    bq = torch.randint(-2, 3, (half,), generator=gen).float().to(device)
    return wq, bq, wk, bk


def _batch(sizes, keeps, dtype, row_width, device, gen):
    x = torch.randint(-1, 2, (sum(sizes), row_width), generator=gen).to(dtype).to(device)
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int64, device=device)
    kc = torch.tensor(keeps, dtype=torch.int64, device=device)
    return x, cu, kc


def _out_rows(total_kept: int, row_width: int, dtype, device) -> torch.Tensor:
    buf = torch.empty(total_kept, row_width + SERVING_EXTRA_COLUMNS, dtype=dtype, device=device)
    return buf[:, :row_width]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu()  # ok-sync: start-up self-check, once


def _first_difference(triton_out, torch_out, names) -> str | None:
    for name, a, b in zip(names, triton_out, torch_out, strict=True):
        if a.shape != b.shape or not torch.equal(_bits(a), _bits(b)):
            return f"{name} differ from the torch reference"
    return None


def self_check(
    device: torch.device,
    dtype: torch.dtype,
    row_width: int,
    score_width: int,
    *,
    num_sms: int | None = None,
) -> str | None:
    """Run fold + score + select + gather with Triton and with torch on a dummy batch; None
    when they agree bit for bit, else what differed. Exceptions propagate."""
    from vs_vllm.kernels.fold_triton import fold_plan_for, fold_triton
    from vs_vllm.kernels.score_select_triton import score_select_triton, select_by_scores_triton

    gen = torch.Generator().manual_seed(0)
    x, cu, kc = _batch(_CHECK_SIZES, _CHECK_KEEPS, dtype, row_width, device, gen)
    wq, bq, wk, bk = _dummy_scorer(score_width, device, gen)
    scored = x[:, :score_width]
    total = sum(_CHECK_KEEPS)
    plan = fold_plan_for(device, num_sms)
    w_t, c_t = fold_triton(scored, cu, _CHECK_SIZES, wq, bq, wk, bk, 1.0, plan=plan)
    w_r, c_r = fold_reference(scored, _CHECK_SIZES, wq, bq, wk, bk, 1.0)
    problem = _first_difference((w_t, c_t), (w_r, c_r), ("fold w", "fold c"))
    if problem:
        return problem
    ref = score_select_reference(
        x,
        cu,
        kc,
        total,
        w_r,
        c_r,
        score_dim=score_width,
        out_rows=_out_rows(total, row_width, dtype, device),
    )
    got = score_select_triton(
        x,
        cu,
        kc,
        total,
        w_t,
        c_t,
        score_dim=score_width,
        out_rows=_out_rows(total, row_width, dtype, device),
        num_sms=num_sms,
        max_tokens=max(_CHECK_SIZES),
    )
    names = ("scores", "kept indices", "kept rows")
    problem = _first_difference(
        (got.scores, got.indices, got.rows), (ref.scores, ref.indices, ref.rows), names
    )
    if problem:
        return problem
    # Precomputed scores (norm, random): ties everywhere, and a NaN (ranked lowest).
    scores = torch.randint(-1, 2, (x.shape[0],), generator=gen).float().to(device)
    scores[1] = float("nan")
    ref = select_by_scores_reference(
        x, scores, cu, kc, total, out_rows=_out_rows(total, row_width, dtype, device)
    )
    got = select_by_scores_triton(
        x,
        scores,
        cu,
        kc,
        total,
        out_rows=_out_rows(total, row_width, dtype, device),
        num_sms=num_sms,
        max_tokens=max(_CHECK_SIZES),
    )
    return _first_difference((got.indices, got.rows), (ref.indices, ref.rows), names[1:])


def warm_up(
    device: torch.device,
    dtype: torch.dtype,
    row_width: int,
    score_width: int,
    *,
    num_sms: int | None = None,
) -> int:
    """Launch every variant serving can reach once (so each is compiled now, not inside an
    engine step); returns how many plans were launched."""
    from vs_vllm.kernels.fold_triton import fold_plan_for, fold_triton
    from vs_vllm.kernels.score_select_triton import (
        limits_for,
        reachable_plans,
        score_select_triton,
        select_by_scores_triton,
    )

    gen = torch.Generator().manual_seed(1)
    wq, bq, wk, bk = _dummy_scorer(score_width, device, gen)
    _, limits = limits_for(device, num_sms)
    plans = reachable_plans(row_width, score_width, limits)
    fold_plan = fold_plan_for(device, num_sms)
    for sizes, keeps in (((4,), (2,)), ((4, 4), (2, 1))):  # one image (shared w/c), several
        x, cu, kc = _batch(sizes, keeps, dtype, row_width, device, gen)
        w, c = fold_triton(x[:, :score_width], cu, sizes, wq, bq, wk, bk, 1.0, plan=fold_plan)
        total = sum(keeps)
        for plan in plans:
            rows = _out_rows(total, row_width, dtype, device)
            out = score_select_triton(
                x, cu, kc, total, w, c, score_dim=score_width, out_rows=rows, plan=plan
            )
            select_by_scores_triton(x, out.scores, cu, kc, total, out_rows=rows, plan=plan)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(plans)


def prepare_select_backend(
    device: torch.device,
    dtype: torch.dtype,
    row_width: int,
    score_width: int,
    *,
    num_sms: int | None = None,
    check_on_cpu: bool = False,
    log: Callable[..., None] | None = None,
    warn: Callable[..., None] | None = None,
) -> str | None:
    """The select backend serving should use on ``device``: None (the dispatch default: torch
    off CUDA) without a GPU; the forced one with ``$VS_VLLM_SELECT_BACKEND``; otherwise
    ``triton`` after a successful warm-up and self-check, ``torch`` (with one warning line)
    when either fails. ``check_on_cpu`` runs the steps on a CPU device too (tests, under
    ``TRITON_INTERPRET=1``)."""
    log = log or logger.info
    warn = warn or logger.warning
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        backend = resolve_backend(device, forced)
        log("vs-vllm: select backend %s (forced by %s)", backend, BACKEND_ENV)
        return backend
    if device.type != "cuda" and not check_on_cpu:
        return None
    try:
        start = time.perf_counter()
        variants = warm_up(device, dtype, row_width, score_width, num_sms=num_sms)
        problem = self_check(device, dtype, row_width, score_width, num_sms=num_sms)
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if problem is not None:
        warn(
            "vs-vllm: the triton select backend failed its start-up self-check on %s (%s); "
            "selecting with the torch backend",
            _device_name(device),
            problem,
        )
        return "torch"
    log(
        "vs-vllm: select kernels compiled and checked on %s in %.1f s (%d plans, %s, "
        "rows of %d, scored %d)",
        _device_name(device),
        time.perf_counter() - start,
        variants,
        str(dtype).removeprefix("torch."),
        row_width,
        score_width,
    )
    return "triton"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return str(device)
