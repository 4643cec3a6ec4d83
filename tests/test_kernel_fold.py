"""The scorer fold kernel (per-image mean -> ``kbar`` -> ``w``, ``c``) against its reference.

Integer data with sparse {-1, 0, 1} projections make every value exact in float32 for images
of 2^j tokens, whatever the summation order: Triton and torch must then agree bit for bit.
Other sizes (chunk boundaries of 256 rows, a one-token image, N not a power of two) agree to
float32 rounding of the final division, and real-valued data to float32 accuracy; both equal
the scorer's own math (``VisionSelectorScorer.fold``). Row widths up to 5120 and a scored
prefix of wider rows run the column loops several steps.
"""

from __future__ import annotations

import pytest
import torch

from vs_vllm.kernels import fold_scorer
from vs_vllm.kernels.fold_reference import fold_reference
from vs_vllm.kernels.fold_triton import GPU_FOLD_PLAN, INTERPRETER_FOLD_PLAN, fold_triton
from vs_vllm.kernels.startup import _dummy_scorer
from vs_vllm.scorer import VisionSelectorScorer

PLANS = {"interpreter": INTERPRETER_FOLD_PLAN, "gpu": GPU_FOLD_PLAN}


def _cu(sizes, device):
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _exact(sizes, width, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (sum(sizes), width), generator=g).to(dtype).to(device)
    return x, _dummy_scorer(width, device, g)


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "sizes", [(4,), (256, 8), (512, 1, 2, 1024), (16,) * 7], ids=lambda s: f"{len(s)}img"
)
def test_fold_is_exact_on_exact_data(sizes, dtype, plan, device):
    x, (wq, bq, wk, bk) = _exact(sizes, 40, dtype, device)
    got = fold_triton(x, _cu(sizes, device), sizes, wq, bq, wk, bk, 1.0, plan=PLANS[plan])
    ref = fold_reference(x, sizes, wq, bq, wk, bk, 1.0)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.float32 and not torch.isnan(a).any()
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("sizes", [(1,), (255, 257), (7, 513, 3), (1000,)], ids=str)
def test_fold_matches_the_scorer_on_real_data(sizes, plan, device):
    torch.manual_seed(0)
    width = 48
    scorer = VisionSelectorScorer(width)
    with torch.no_grad():
        for p in scorer.parameters():
            p.normal_(0.0, 0.1)
    x = torch.randn(sum(sizes), width).to(torch.bfloat16).to(device)
    s = scorer.to(device)
    args = (s.q_proj.weight, s.q_proj.bias, s.k_proj.weight, s.k_proj.bias, s.scale)
    w, c = fold_triton(x, _cu(sizes, device), sizes, *args, plan=PLANS[plan])
    wr, cr = fold_reference(x, sizes, *args)
    start = 0
    for b, n in enumerate(sizes):
        wb, cb = scorer.fold(x[start : start + n])
        torch.testing.assert_close(w[b], wb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c[b], cb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(wr[b], wb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cr[b], cb, rtol=1e-5, atol=1e-6)
        start += n


@pytest.mark.parametrize(
    ("width", "scored"), [(2048, 2048), (3584, 3584), (5120, 5120), (4096, 1024)]
)
def test_fold_at_real_widths(width, scored, device):
    sizes = (4, 2)
    x, _ = _exact(sizes, width, torch.bfloat16, device, seed=width)
    view = x[:, :scored]  # the scored prefix of wider rows: a strided view, no copy
    wq, bq, wk, bk = _dummy_scorer(scored, device, torch.Generator().manual_seed(1))
    for plan in PLANS.values():
        got = fold_triton(view, _cu(sizes, device), sizes, wq, bq, wk, bk, 1.0, plan=plan)
        ref = fold_reference(view, sizes, wq, bq, wk, bk, 1.0)
        assert torch.equal(got[0].cpu(), ref[0].cpu()) and torch.equal(got[1].cpu(), ref[1].cpu())


def test_fold_dispatch_validates_sizes(device):
    x, (wq, bq, wk, bk) = _exact((4,), 8, torch.float32, device)
    with pytest.raises(ValueError, match="expected packed rows"):
        fold_scorer(x, _cu((3,), device), (3,), wq, bq, wk, bk, 1.0)
    with pytest.raises(ValueError, match="at least one token"):
        fold_scorer(x, _cu((4, 0), device), (4, 0), wq, bq, wk, bk, 1.0)
    for backend in ("torch", "triton"):
        w, c = fold_scorer(x, _cu((4,), device), (4,), wq, bq, wk, bk, 1.0, backend=backend)
        assert w.shape == (1, 8) and c.shape == (1,)
