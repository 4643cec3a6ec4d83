"""The fused score + select + gather Triton kernel against its PyTorch reference.

Data are small integers so that every score is exact in float32 whatever the summation order:
indices must then equal the reference exactly, and ties are frequent (ties go to the lower
index). Rows are copies, so they must be bit-identical. Output buffers are pre-filled with a
sentinel to prove every element is written.

``score_dim`` (Qwen3-VL's ``[main | deepstack levels]`` rows): only the first ``score_dim``
columns are scored, but the kept rows come back whole, all D columns.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from vs_vllm.kernels import resolve_backend, score_select, select_by_scores
from vs_vllm.kernels.score_select_reference import (
    score_select_reference,
    select_by_scores_reference,
)
from vs_vllm.kernels.score_select_triton import score_select_triton, select_by_scores_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
D = 40  # not a power of two, and not a multiple of the kernel's D block
# Scored prefix widths: all columns, a prefix that is not a power of two, a single column.
SCORE_DIMS = [None, D // 3, 1]


def _sd_id(score_dim):
    return "sd=all" if score_dim is None else f"sd={score_dim}"


def _packed(sizes, keeps, dtype, device, hidden=D, seed=0, score_dim=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (sum(sizes), hidden), generator=g).to(dtype).to(device)
    width = hidden if score_dim is None else score_dim
    w = torch.randint(-2, 3, (len(sizes), width), generator=g).float().to(device)
    c = (torch.randint(-4, 5, (len(sizes),), generator=g).float() / 2).to(device)
    cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32).to(device)
    kc = torch.tensor(keeps, dtype=torch.int32).to(device)
    return x, cu, kc, w, c


def _sentinel_outputs(x, total_kept):
    rows = torch.full((total_kept, x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    idx = torch.full((total_kept,), -1, dtype=torch.int64, device=x.device)
    scores = torch.full((x.shape[0],), float("nan"), dtype=torch.float32, device=x.device)
    return rows, idx, scores


def _expected_scores(x, cu, w, c, score_dim=None):
    """``x[:, :score_dim].float() @ w_b + c_b`` per image, computed independently."""
    sd = x.shape[1] if score_dim is None else score_dim
    bounds = cu.tolist()
    num_images = len(bounds) - 1
    w = torch.as_tensor(w).float().cpu()
    w = w.expand(num_images, -1) if w.dim() == 1 else w
    c = torch.as_tensor(c).float().cpu().expand(num_images)
    xs = x.cpu()[:, :sd].float()
    out = torch.empty(x.shape[0])
    for b in range(num_images):
        out[bounds[b] : bounds[b + 1]] = xs[bounds[b] : bounds[b + 1]] @ w[b] + c[b]
    return out


def _assert_full_rows(out, x, cu, keeps):
    """The kept rows are the whole input rows (all D columns), bit for bit."""
    assert out.rows.shape == (sum(keeps), x.shape[1])
    bounds = cu.tolist()
    flat = torch.cat(
        [out.indices[p : p + k].cpu() + bounds[b] for b, (p, k) in enumerate(_offsets(keeps))]
    )
    want = x.cpu()[flat]
    assert torch.equal(out.rows.cpu().view(torch.uint8), want.view(torch.uint8))


def _offsets(keeps):
    pos = 0
    for k in keeps:
        yield pos, k
        pos += k


def _assert_same(out, ref, x, sizes, keeps):
    assert torch.equal(out.indices.cpu(), ref.indices.cpu())
    # Rows are copies: equal bit for bit (and no NaN sentinel left behind).
    assert out.rows.dtype == x.dtype
    assert torch.equal(out.rows.cpu().view(torch.uint8), ref.rows.cpu().view(torch.uint8))
    assert not torch.isnan(out.rows).any()
    assert (out.indices >= 0).all()
    # Per image: ascending, in range, k of them.
    pos = 0
    for n, k in zip(sizes, keeps, strict=True):
        seg = out.indices[pos : pos + k].cpu()
        assert (seg[1:] > seg[:-1]).all() and seg.min() >= 0 and seg.max() < n
        pos += k


def _check_batch(sizes, keeps, dtype, device, *, score_dim, seed, hidden=D, num_sms=None):
    """Run the kernel into sentinel-filled buffers and compare with the reference exactly
    (indices, bit-exact whole rows, float32 scores; then the precomputed-scores path on the
    same scores). Returns the kernel's output and the inputs ``(x, cu, kc, w, c)``."""
    packed = _packed(sizes, keeps, dtype, device, hidden, seed, score_dim)
    x, cu, kc, w, c = packed
    total = sum(keeps)
    out = score_select_triton(
        x,
        cu,
        kc,
        total,
        w,
        c,
        score_dim=score_dim,
        out=_sentinel_outputs(x, total),
        num_sms=num_sms,
    )
    ref = score_select_reference(x, cu, kc, total, w, c, score_dim=score_dim)
    _assert_same(out, ref, x, sizes, keeps)
    _assert_full_rows(out, x, cu, keeps)
    assert not torch.isnan(out.scores).any()
    assert torch.equal(out.scores.cpu(), ref.scores.cpu())
    # And the precomputed-scores path on the same scores.
    by = select_by_scores_triton(
        x, ref.scores, cu, kc, total, out=_sentinel_outputs(x, total)[:2], num_sms=num_sms
    )
    _assert_same(by, ref, x, sizes, keeps)
    return out, packed


def _k_values(n):
    return sorted({1, max(1, n // 2), n})


CASES = [(n, k) for n in (1, 2, 7, 64, 1000, 4097) for k in _k_values(n)]
# The 4097-token image (several score blocks) runs for the full width only: a prefix
# score_dim changes the scoring loop, which the smaller images and the mixed batch cover.
SD_CASES = [(n, k, sd) for sd in SCORE_DIMS for n, k in CASES if sd is None or n < 4096]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("n", "k", "score_dim"), SD_CASES, ids=[f"{n}-{k}-{_sd_id(sd)}" for n, k, sd in SD_CASES]
)
def test_fused_single_image_matches_reference(n, k, score_dim, dtype, device):
    out, (x, cu, _, w, c) = _check_batch([n], [k], dtype, device, score_dim=score_dim, seed=0)
    assert torch.equal(out.scores.cpu(), _expected_scores(x, cu, w, c, score_dim))


@pytest.mark.parametrize("score_dim", SCORE_DIMS, ids=_sd_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_mixed_batch(dtype, score_dim, device):
    sizes = [1, 4097, 7, 64, 2, 1000, 3]
    keeps = [1, 1229, 7, 1, 1, 500, 2]
    out, (x, cu, _, w, c) = _check_batch(sizes, keeps, dtype, device, score_dim=score_dim, seed=1)
    assert torch.equal(out.scores.cpu(), _expected_scores(x, cu, w, c, score_dim))


@pytest.mark.parametrize("score_dim", SCORE_DIMS, ids=_sd_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_w_and_scalar_c(dtype, score_dim, device):
    sizes, keeps = [5, 9, 33], [2, 9, 10]
    x, cu, kc, w, _ = _packed(sizes, keeps, dtype, device, seed=2, score_dim=score_dim)
    total = sum(keeps)
    out = score_select_triton(
        x, cu, kc, total, w[0], 0.25, score_dim=score_dim, out=_sentinel_outputs(x, total)
    )
    ref = score_select_reference(x, cu, kc, total, w[0], 0.25, score_dim=score_dim)
    _assert_same(out, ref, x, sizes, keeps)
    _assert_full_rows(out, x, cu, keeps)
    assert torch.equal(out.scores.cpu(), _expected_scores(x, cu, w[0], 0.25, score_dim))


def test_all_ties_keep_lowest_indices(device):
    n, k = 300, 17
    x = torch.ones(n, D, device=device)
    cu = torch.tensor([0, n], device=device)
    kc = torch.tensor([k], device=device)
    out = score_select_triton(x, cu, kc, k, torch.ones(D, device=device), 0.0)
    assert out.indices.cpu().tolist() == list(range(k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score_dim", [D // 3, 1])
def test_prefix_ties_ignore_the_unscored_columns(score_dim, dtype, device):
    # The scored prefix is the same in every row (all tie: the lowest indices are kept),
    # while the unscored tail grows with the index: scoring whole rows would keep the last
    # ones. The kept rows carry their tails, bit for bit.
    n, k = 70, 9
    x = torch.ones(n, D)
    x[:, score_dim:] = torch.arange(n, dtype=torch.float32)[:, None]
    x = x.to(dtype).to(device)
    cu = torch.tensor([0, n], device=device)
    kc = torch.tensor([k], device=device)
    w = torch.ones(score_dim, device=device)
    out = score_select_triton(
        x, cu, kc, k, w, 0.5, score_dim=score_dim, out=_sentinel_outputs(x, k)
    )
    ref = score_select_reference(x, cu, kc, k, w, 0.5, score_dim=score_dim)
    assert out.indices.cpu().tolist() == list(range(k))
    _assert_same(out, ref, x, [n], [k])
    _assert_full_rows(out, x, cu, [k])
    assert torch.equal(out.scores.cpu(), torch.full((n,), score_dim + 0.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unscored_columns_do_not_change_the_selection(dtype, device):
    sizes, keeps = [33, 6, 70], [5, 6, 1]
    sd = D // 3
    x, cu, kc, w, c = _packed(sizes, keeps, dtype, device, seed=5, score_dim=sd)
    y = x.clone()
    y[:, sd:] = torch.randint(-100, 101, y[:, sd:].shape).to(dtype).to(device)
    a = score_select_triton(x, cu, kc, sum(keeps), w, c, score_dim=sd)
    b = score_select_triton(y, cu, kc, sum(keeps), w, c, score_dim=sd)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    _assert_full_rows(b, y, cu, keeps)


def test_ties_at_threshold_split_by_index(device):
    # Scores: 5 at indices 3 and 8, 2 at indices 0, 4, 6, 9; the rest 0. k=4 keeps both 5s and
    # the first two 2s (0 and 4).
    s = torch.zeros(10)
    s[[3, 8]] = 5.0
    s[[0, 4, 6, 9]] = 2.0
    x = torch.arange(10 * D, dtype=torch.float32).view(10, D).to(device)
    cu = torch.tensor([0, 10], device=device)
    kc = torch.tensor([4], device=device)
    out = select_by_scores_triton(x, s.to(device), cu, kc, 4)
    assert out.indices.cpu().tolist() == [0, 3, 4, 8]
    assert torch.equal(out.rows.cpu(), x.cpu()[[0, 3, 4, 8]])


def test_signed_zero_and_negative_scores(device):
    s = torch.tensor([-0.0, 0.0, -1.0, -0.0, -1e-30, 3.0, -float("inf"), 1e-30])
    x = torch.randn(8, D).to(device)
    cu = torch.tensor([0, 8], device=device)
    for k in range(1, 9):
        kc = torch.tensor([k], device=device)
        out = select_by_scores_triton(x, s.to(device), cu, kc, k)
        ref = select_by_scores_reference(x, s.to(device), cu, kc, k)
        assert torch.equal(out.indices.cpu(), ref.indices.cpu()), k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_by_scores_matches_reference_with_random_floats(dtype, device):
    sizes = [1, 2, 7, 64, 1000, 4097]
    keeps = [1, 1, 3, 64, 100, 2048]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(sizes), D, generator=g).to(dtype).to(device)
    scores = torch.randn(sum(sizes), generator=g)
    scores[100:140] = scores[99]  # a run of exact ties inside the 1000-token image
    cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()]).to(device)
    kc = torch.tensor(keeps).to(device)
    total = sum(keeps)
    out = select_by_scores_triton(
        x, scores.to(device), cu, kc, total, out=_sentinel_outputs(x, total)[:2]
    )
    ref = select_by_scores_reference(x, scores.to(device), cu, kc, total)
    _assert_same(out, ref, x, sizes, keeps)


# Score tolerance by input dtype. x is cast to float32 exactly from every dtype and the
# scores accumulate in float32, so only the summation order differs from the expectation:
# float32 rounding over (at most 136) terms of size ~1.
SCORE_TOL = {dtype: {"rtol": 1e-5, "atol": 1e-4} for dtype in DTYPES}


@pytest.mark.parametrize("score_dim", [None, 45, 1], ids=_sd_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_scores_close_on_real_valued_data(dtype, score_dim, device):
    # Real-valued data: scores agree to float32 rounding, and the selection equals the
    # reference selection computed from the kernel's own scores.
    sizes, keeps = [300, 77], [150, 20]
    hidden = 136
    sd = hidden if score_dim is None else score_dim
    g = torch.Generator().manual_seed(4)
    x = torch.randn(sum(sizes), hidden, generator=g).to(dtype).to(device)
    w = torch.randn(2, sd, generator=g).to(device)
    c = torch.randn(2, generator=g).to(device)
    cu = torch.tensor([0, 300, 377]).to(device)
    kc = torch.tensor(keeps).to(device)
    out = score_select_triton(
        x, cu, kc, 170, w, c, score_dim=score_dim, out=_sentinel_outputs(x, 170)
    )
    ref = score_select_reference(x, cu, kc, 170, w, c, score_dim=score_dim)
    torch.testing.assert_close(out.scores, ref.scores, **SCORE_TOL[dtype])
    torch.testing.assert_close(
        out.scores.cpu(), _expected_scores(x, cu, w, c, score_dim), **SCORE_TOL[dtype]
    )
    again = select_by_scores_reference(x, out.scores, cu, kc, 170)
    assert torch.equal(out.indices, again.indices)
    _assert_full_rows(out, x, cu, keeps)


@pytest.mark.parametrize("score_dim", [None, 5])
def test_zero_images_and_empty_output(score_dim, device):
    x = torch.zeros(0, D, device=device)
    cu = torch.zeros(1, dtype=torch.int64, device=device)
    kc = torch.zeros(0, dtype=torch.int64, device=device)
    w = torch.zeros(0, score_dim or D, device=device)
    out = score_select_triton(x, cu, kc, 0, w, torch.zeros(0), score_dim=score_dim)
    assert out.rows.shape == (0, D) and out.indices.shape == (0,)


@pytest.mark.parametrize("score_dim", SCORE_DIMS, ids=_sd_id)
def test_non_contiguous_rows_are_handled(score_dim, device):
    base = torch.randint(-3, 4, (64, 2 * D)).float().to(device)
    x = base[:, ::2]  # stride(1) == 2
    cu = torch.tensor([0, 64], device=device)
    kc = torch.tensor([10], device=device)
    w = torch.randint(-2, 3, (score_dim or D,)).float().to(device)
    out = score_select_triton(x, cu, kc, 10, w, 0.0, score_dim=score_dim)
    ref = score_select_reference(x, cu, kc, 10, w, 0.0, score_dim=score_dim)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.rows, ref.rows)
    _assert_full_rows(out, x, cu, [10])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score_dim", SCORE_DIMS, ids=_sd_id)
def test_padded_row_stride_is_respected(score_dim, dtype, device):
    # x is a column slice of a wider buffer: unit column stride, row stride D + 24. Scores
    # read the first score_dim columns of each row; rows are gathered at that stride, and
    # the columns past D (filled with 99) never leak into scores or rows.
    sizes, keeps = [40, 3, 25], [7, 3, 25]
    xs, cu, kc, w, c = _packed(sizes, keeps, dtype, device, seed=6, score_dim=score_dim)
    base = torch.full((xs.shape[0], D + 24), 99.0).to(dtype).to(device)
    base[:, :D] = xs
    x = base[:, :D]
    assert x.stride() == (D + 24, 1)
    total = sum(keeps)
    out = score_select_triton(
        x, cu, kc, total, w, c, score_dim=score_dim, out=_sentinel_outputs(x, total)
    )
    ref = score_select_reference(xs, cu, kc, total, w, c, score_dim=score_dim)
    _assert_same(out, ref, xs, sizes, keeps)
    _assert_full_rows(out, xs, cu, keeps)
    assert torch.equal(out.scores.cpu(), _expected_scores(xs, cu, w, c, score_dim))


SCORE_FNS = [score_select_reference, score_select_triton, score_select]


@pytest.mark.parametrize("fn", SCORE_FNS, ids=lambda f: f.__name__)
def test_score_dim_is_validated(fn, device):
    x = torch.zeros(5, D, device=device)
    cu = torch.tensor([0, 2, 5], device=device)
    kc = torch.tensor([1, 2], device=device)
    for bad in (0, -1, D + 1):
        with pytest.raises(ValueError, match=rf"score_dim must be in \[1, {D}\].*got {bad}"):
            fn(x, cu, kc, 3, torch.zeros(D, device=device), 0.0, score_dim=bad)
    for bad in (2.0, True, "3"):
        with pytest.raises(TypeError, match="score_dim must be an int or None"):
            fn(x, cu, kc, 3, torch.zeros(D, device=device), 0.0, score_dim=bad)
    # w must have score_dim columns, shared or per image.
    sd = D // 3
    for w in (torch.zeros(D), torch.zeros(sd + 1), torch.zeros(2, D), torch.zeros(3, sd)):
        with pytest.raises(ValueError, match=rf"w must be \({sd},\) or \(2, {sd}\)"):
            fn(x, cu, kc, 3, w.to(device), 0.0, score_dim=sd)
    # score_dim=None means the full width: a prefix-wide w is rejected.
    with pytest.raises(ValueError, match=rf"w must be \({D},\)"):
        fn(x, cu, kc, 3, torch.zeros(sd, device=device), 0.0)
    # The bounds themselves are accepted.
    for sd, w in ((1, torch.ones(1)), (D, torch.ones(2, D))):
        out = fn(x, cu, kc, 3, w.to(device), 0.0, score_dim=sd)
        assert out.rows.shape == (3, D)


def test_non_unit_stride_w_is_handled(device):
    sizes, keeps = [20, 11], [4, 3]
    sd = D // 3
    x, cu, kc, w, c = _packed(sizes, keeps, torch.float32, device, seed=7, score_dim=sd)
    w_strided = torch.zeros(2, 2 * sd, device=device)
    w_strided[:, ::2] = w
    out = score_select_triton(x, cu, kc, 7, w_strided[:, ::2], c, score_dim=sd)
    ref = score_select_reference(x, cu, kc, 7, w, c, score_dim=sd)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.scores, ref.scores)


def test_reference_rejects_bad_sizes():
    x = torch.zeros(5, D)
    cu = torch.tensor([0, 5])
    with pytest.raises(ValueError, match="keep count"):
        score_select_reference(x, cu, torch.tensor([6]), 6, torch.zeros(D), 0.0)
    with pytest.raises(ValueError, match="sum to"):
        score_select_reference(x, cu, torch.tensor([2]), 3, torch.zeros(D), 0.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        score_select_reference(x, torch.tensor([0, 4]), torch.tensor([2]), 2, torch.zeros(D), 0.0)
    with pytest.raises(ValueError, match="w must be"):
        score_select_reference(x, cu, torch.tensor([2]), 2, torch.zeros(D + 1), 0.0)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        score_select_reference(x.long(), cu, torch.tensor([2]), 2, torch.zeros(D), 0.0)


def test_dispatch_picks_backend_and_logs(caplog, monkeypatch, device):
    monkeypatch.delenv("VS_VLLM_SELECT_BACKEND", raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cuda")) == "triton"
    assert resolve_backend(torch.device("cpu"), "triton") == "triton"
    with pytest.raises(ValueError, match="unknown select backend"):
        resolve_backend(torch.device("cpu"), "cuda")
    # The environment forces a backend, over an explicit one (the self-check's choice).
    monkeypatch.setenv("VS_VLLM_SELECT_BACKEND", "triton")
    assert resolve_backend(torch.device("cpu")) == "triton"
    assert resolve_backend(torch.device("cuda"), "torch") == "triton"
    monkeypatch.setenv("VS_VLLM_SELECT_BACKEND", "torch")
    assert resolve_backend(torch.device("cuda"), "triton") == "torch"
    monkeypatch.setenv("VS_VLLM_SELECT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown select backend"):
        resolve_backend(torch.device("cpu"))
    monkeypatch.delenv("VS_VLLM_SELECT_BACKEND")
    # The public functions say which backend ran, in a debug log. The Triton backend gets
    # tensors where it can run: CUDA when compiled, the CPU under TRITON_INTERPRET=1.
    importlib.import_module("vs_vllm.kernels.backend")._log_choice.cache_clear()
    x, cu, kc, w, c = _packed([9, 4], [3, 2], torch.float32, device)
    with caplog.at_level(logging.DEBUG, logger="vs_vllm.kernels.backend"):
        a = score_select(x, cu, kc, 5, w, c, backend="torch")
        b = score_select(x, cu, kc, 5, w, c, backend="triton")
        s = select_by_scores(x, a.scores, cu, kc, 5)
    assert "using torch backend" in caplog.text and "using triton backend" in caplog.text
    assert torch.equal(a.indices, b.indices) and torch.equal(a.indices, s.indices)
    # score_dim goes through the public entry point to either backend.
    x, cu, kc, w, c = _packed([9, 4], [3, 2], torch.float32, device, seed=8, score_dim=7)
    a = score_select(x, cu, kc, 5, w, c, score_dim=7, backend="torch")
    b = score_select(x, cu, kc, 5, w, c, score_dim=7, backend="triton")
    assert torch.equal(a.indices, b.indices) and torch.equal(a.rows, b.rows)
    assert a.rows.shape == (5, D)
    assert torch.equal(a.scores.cpu(), _expected_scores(x, cu, w, c, 7))


# -- the benchmark's sweep, at small widths --------------------------------------------------
#
# ``benchmarks/kernel_select.py`` sweeps tokens per image x images per batch at keep 0.2. The
# same shapes run here at row width 24 with the first 8 columns scored (a Qwen3-VL-like
# ``[main | 2 deepstack levels]`` row, neither width a power of two), and at full width 24.

SWEEP_TOKENS = (256, 512, 1024, 1296, 2048, 4096, 8192, 16384)
SWEEP_IMAGES = (1, 8, 32)
SWEEP_ROW, SWEEP_SD = 24, 8
SWEEP = [
    pytest.param(n, b, marks=pytest.mark.slow) if n * b >= 65536 else (n, b)
    for b in SWEEP_IMAGES
    for n in SWEEP_TOKENS
]


def _keep(n: int, ratio: float = 0.2) -> int:
    return max(1, min(n, round(n * ratio)))


@pytest.mark.parametrize("score_dim", [SWEEP_SD, None], ids=_sd_id)
@pytest.mark.parametrize(("n", "b"), SWEEP, ids=lambda v: str(v))
def test_benchmark_sweep_shapes(n, b, score_dim, device):
    sizes = [n] * b
    _check_batch(
        sizes,
        [_keep(n)] * b,
        torch.bfloat16,
        device,
        hidden=SWEEP_ROW,
        score_dim=score_dim,
        seed=n + b,
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_image_holds_ninety_percent_of_the_tokens(dtype, device):
    # 32768 tokens: one image of 29491 (90%, several select steps), then small ones of odd
    # sizes, keep 0.2 each.
    sizes = [29491, 1024, 1, 1296, 7, 949]
    assert sum(sizes) == 32768 and sizes[0] / sum(sizes) > 0.9 - 1e-4
    _check_batch(
        sizes,
        [_keep(n) for n in sizes],
        dtype,
        device,
        hidden=SWEEP_ROW,
        score_dim=SWEEP_SD,
        seed=90,
    )


# The block sizes follow the batch and the SM count; a GPU with 132 SMs gets small blocks
# (4 scoring rows and 1 gathered row per program for small batches), the interpreter's default
# plan larger ones. Run the GPU's plan here too, on batches that hit each limit.
GPU_SMS = 132
PLAN_CASES = [
    ([1024], [205]),  # 1 image of 1024: the smallest blocks
    ([7, 300, 1, 64], [3, 60, 1, 64]),  # images smaller than a scoring block, k=N, k=1
    ([1500] * 3, [300] * 3),  # blocks that end inside an image (N not a power of two)
    ([5000, 3, 2000], [1000, 3, 400]),  # an image longer than one select step
]


@pytest.mark.parametrize("num_sms", [GPU_SMS, 1], ids=["sms=132", "sms=1"])
@pytest.mark.parametrize(("sizes", "keeps"), PLAN_CASES, ids=["1x1024", "small", "3x1500", "long"])
def test_launch_plans_of_other_devices(sizes, keeps, num_sms, device):
    _check_batch(
        sizes,
        keeps,
        torch.float16,
        device,
        hidden=40,
        score_dim=None,
        seed=len(sizes),
        num_sms=num_sms,
    )
    _check_batch(
        sizes,
        keeps,
        torch.float32,
        device,
        hidden=40,
        score_dim=13,
        seed=len(sizes) + 1,
        num_sms=num_sms,
    )


def test_launch_plan_spreads_work_over_the_gpu():
    from vs_vllm.kernels.score_select_triton import launch_plan

    small = launch_plan(1024, 205, 3584, 3584, GPU_SMS)
    big = launch_plan(32 * 16384, 32 * 3277, 3584, 3584, GPU_SMS, max_tokens=16384)
    # One image of 1024 tokens still runs on (nearly) every SM: 256 scoring programs and
    # 205 x 4 gather programs.
    assert 1024 // small.block_m >= GPU_SMS
    assert 205 // small.block_k * (3584 // small.block_c + 1) >= GPU_SMS
    # A big batch takes more kept rows per gather program (fewer, fuller programs).
    assert big.block_k > small.block_k
    # Narrow scoring prefixes do not get wider-than-needed tiles.
    assert launch_plan(1024, 205, 24, 8, GPU_SMS).block_sd == 16


def test_select_block_follows_the_largest_image_not_the_batch():
    """Issue 21: ``BLOCK_T`` was sized from the batch's total tokens (94% masked tiles at
    32 x 256). It follows the largest image: the same for 1 or 32 images of 256 tokens."""
    from vs_vllm.kernels.score_select_triton import launch_plan

    one = launch_plan(256, 76, 3584, 3584, GPU_SMS, max_tokens=256)
    many = launch_plan(32 * 256, 32 * 76, 3584, 3584, GPU_SMS, max_tokens=256)
    assert one.block_t == many.block_t == 256
    mixed = launch_plan(31 * 256 + 1000, 31 * 76 + 300, 3584, 3584, GPU_SMS, max_tokens=1000)
    assert mixed.block_t == 1024


# -- real row widths: the column loops run several steps (issue 21) --------------------------
#
# Qwen-VL widths 2048 to 5120, and Qwen3-VL's [main | 3 deepstack levels] rows (4 x D) scored
# on D, at small N: the score kernel's column loop (blocks of at most 1024) and the gather's
# column grid take several steps, with the interpreter's plan and a 132-SM GPU's.

WIDE = [(2048, None), (3584, None), (4096, None), (5120, None), (4 * 1024, 1024), (4 * 2048, 2048)]


@pytest.mark.parametrize("num_sms", [None, GPU_SMS], ids=["interpreter", "sms=132"])
@pytest.mark.parametrize(("hidden", "score_dim"), WIDE, ids=lambda v: str(v))
def test_real_row_widths(hidden, score_dim, num_sms, device):
    for dtype in (torch.bfloat16, torch.float32):
        _check_batch(
            [5, 1, 9],
            [2, 1, 9],
            dtype,
            device,
            score_dim=score_dim,
            seed=hidden,
            hidden=hidden,
            num_sms=num_sms,
        )


# -- NaN scores: ranked lowest, below -inf, ties among NaNs to the lower index ----------------


@pytest.mark.parametrize("fn", [select_by_scores_triton, select_by_scores_reference])
def test_nan_scores_are_kept_last(fn, device):
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([nan, 1.0, nan, -inf, 0.0, -0.0, nan, 3.0], device=device)
    x = torch.arange(8, dtype=torch.float32, device=device).unsqueeze(1).repeat(1, 3)
    cu = torch.tensor([0, 8], device=device)
    want = {
        1: [7],
        3: [1, 4, 7],  # 3, 1, then +0.0 (tie with -0.0: the lower index)
        5: [1, 3, 4, 5, 7],  # ... then -inf, above every NaN
        6: [0, 1, 3, 4, 5, 7],  # then the first NaN
        8: list(range(8)),
    }
    for k, kept in want.items():
        kc = torch.tensor([k], device=device)
        out = fn(x, scores, cu, kc, k)
        assert out.indices.cpu().tolist() == kept, k
        assert torch.equal(out.rows.cpu()[:, 0], torch.tensor(kept, dtype=torch.float32))


def test_a_nan_row_is_kept_last_by_the_fused_kernel(device):
    x, cu, kc, w, c = _packed([6, 5], [5, 2], torch.float32, device, seed=4)
    x[2] = float("nan")  # image 0, token 2: its score is NaN
    ref = score_select_reference(x, cu, kc, 7, w, c)
    out = score_select_triton(x, cu, kc, 7, w, c, num_sms=GPU_SMS)
    assert torch.equal(out.indices.cpu(), ref.indices.cpu())
    assert 2 not in out.indices[:5].cpu().tolist()


def test_rows_go_straight_into_a_wider_buffer(device):
    """The serving path's (k, W + 8) buffer: the kernel writes the first W columns of each
    kept row and leaves the rest alone."""
    x, cu, kc, w, c = _packed([9, 4], [3, 2], torch.bfloat16, device, seed=2)
    buf = torch.full((5, D + 8), -7.0, dtype=torch.bfloat16, device=device)
    for backend in (score_select_triton, score_select_reference):
        buf.fill_(-7.0)
        out = backend(x, cu, kc, 5, w, c, out_rows=buf[:, :D])
        assert out.rows.data_ptr() == buf.data_ptr()
        ref = score_select_reference(x, cu, kc, 5, w, c)
        assert torch.equal(buf[:, :D].cpu(), ref.rows.cpu())
        assert (buf[:, D:] == -7.0).all()
    with pytest.raises(ValueError, match="out_rows must be"):
        score_select_reference(x, cu, kc, 5, w, c, out_rows=buf[:4, :D])
