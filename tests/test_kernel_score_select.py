"""The fused score + select + gather Triton kernel against its PyTorch reference.

Data are small integers so that every score is exact in float32 whatever the summation order:
indices must then equal the reference exactly, and ties are frequent (ties go to the lower
index). Rows are copies, so they must be bit-identical. Output buffers are pre-filled with a
sentinel to prove every element is written.
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


def _packed(sizes, keeps, dtype, device, hidden=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (sum(sizes), hidden), generator=g).to(dtype).to(device)
    w = torch.randint(-2, 3, (len(sizes), hidden), generator=g).float().to(device)
    c = (torch.randint(-4, 5, (len(sizes),), generator=g).float() / 2).to(device)
    cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32).to(device)
    kc = torch.tensor(keeps, dtype=torch.int32).to(device)
    return x, cu, kc, w, c


def _sentinel_outputs(x, total_kept):
    rows = torch.full((total_kept, x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    idx = torch.full((total_kept,), -1, dtype=torch.int64, device=x.device)
    scores = torch.full((x.shape[0],), float("nan"), dtype=torch.float32, device=x.device)
    return rows, idx, scores


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


def _k_values(n):
    return sorted({1, max(1, n // 2), n})


CASES = [(n, k) for n in (1, 2, 7, 64, 1000, 4097) for k in _k_values(n)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k"), CASES)
def test_fused_single_image_matches_reference(n, k, dtype, device):
    x, cu, kc, w, c = _packed([n], [k], dtype, device)
    out = score_select_triton(x, cu, kc, k, w, c, out=_sentinel_outputs(x, k))
    ref = score_select_reference(x, cu, kc, k, w, c)
    _assert_same(out, ref, x, [n], [k])
    assert torch.equal(out.scores.cpu(), ref.scores.cpu())  # exact: integer data


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_mixed_batch(dtype, device):
    sizes = [1, 4097, 7, 64, 2, 1000, 3]
    keeps = [1, 1229, 7, 1, 1, 500, 2]
    x, cu, kc, w, c = _packed(sizes, keeps, dtype, device, seed=1)
    total = sum(keeps)
    out = score_select_triton(x, cu, kc, total, w, c, out=_sentinel_outputs(x, total))
    ref = score_select_reference(x, cu, kc, total, w, c)
    _assert_same(out, ref, x, sizes, keeps)
    assert torch.equal(out.scores.cpu(), ref.scores.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_w_and_scalar_c(dtype, device):
    sizes, keeps = [5, 9, 33], [2, 9, 10]
    x, cu, kc, w, _ = _packed(sizes, keeps, dtype, device, seed=2)
    out = score_select_triton(x, cu, kc, sum(keeps), w[0], 0.25)
    ref = score_select_reference(x, cu, kc, sum(keeps), w[0], 0.25)
    _assert_same(out, ref, x, sizes, keeps)


def test_all_ties_keep_lowest_indices(device):
    n, k = 300, 17
    x = torch.ones(n, D, device=device)
    cu = torch.tensor([0, n], device=device)
    kc = torch.tensor([k], device=device)
    out = score_select_triton(x, cu, kc, k, torch.ones(D, device=device), 0.0)
    assert out.indices.cpu().tolist() == list(range(k))


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


def test_fused_scores_close_on_real_valued_data(device):
    # Real-valued data: scores agree to float32 rounding, and the selection equals the
    # reference selection computed from the kernel's own scores.
    sizes, keeps = [500, 77], [150, 20]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(sum(sizes), 136, generator=g).to(device)
    w = torch.randn(2, 136, generator=g).to(device)
    c = torch.randn(2, generator=g).to(device)
    cu = torch.tensor([0, 500, 577]).to(device)
    kc = torch.tensor(keeps).to(device)
    out = score_select_triton(x, cu, kc, 170, w, c)
    ref = score_select_reference(x, cu, kc, 170, w, c)
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-5, atol=1e-4)
    again = select_by_scores_reference(x, out.scores, cu, kc, 170)
    assert torch.equal(out.indices, again.indices)


def test_zero_images_and_empty_output(device):
    x = torch.zeros(0, D, device=device)
    cu = torch.zeros(1, dtype=torch.int64, device=device)
    kc = torch.zeros(0, dtype=torch.int64, device=device)
    out = score_select_triton(x, cu, kc, 0, torch.zeros(0, D, device=device), torch.zeros(0))
    assert out.rows.shape == (0, D) and out.indices.shape == (0,)


def test_non_contiguous_rows_are_handled(device):
    base = torch.randint(-3, 4, (64, 2 * D)).float().to(device)
    x = base[:, ::2]  # stride(1) == 2
    cu = torch.tensor([0, 64], device=device)
    kc = torch.tensor([10], device=device)
    w = torch.randint(-2, 3, (D,)).float().to(device)
    out = score_select_triton(x, cu, kc, 10, w, 0.0)
    ref = score_select_reference(x, cu, kc, 10, w, 0.0)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.rows, ref.rows)


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


def test_dispatch_picks_backend_and_logs(caplog, monkeypatch):
    monkeypatch.delenv("VS_VLLM_SELECT_BACKEND", raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cuda")) == "triton"
    assert resolve_backend(torch.device("cpu"), "triton") == "triton"
    monkeypatch.setenv("VS_VLLM_SELECT_BACKEND", "triton")
    assert resolve_backend(torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="unknown select backend"):
        resolve_backend(torch.device("cpu"), "cuda")
    # The public functions say which backend ran, in a debug log.
    importlib.import_module("vs_vllm.kernels.score_select")._log_choice.cache_clear()
    x, cu, kc, w, c = _packed([9, 4], [3, 2], torch.float32, "cpu")
    with caplog.at_level(logging.DEBUG, logger="vs_vllm.kernels.score_select"):
        a = score_select(x, cu, kc, 5, w, c, backend="torch")
        b = score_select(x, cu, kc, 5, w, c, backend="triton")
        s = select_by_scores(x, a.scores, cu, kc, 5)
    assert "using torch backend" in caplog.text and "using triton backend" in caplog.text
    assert torch.equal(a.indices, b.indices) and torch.equal(a.indices, s.indices)
