"""VisionSelectorScorer: reference semantics, the folded form, init and names."""

from __future__ import annotations

import math

import pytest
import torch

from vs_vllm.scorer import VisionSelectorScorer


def _randomized(hidden: int, dtype=torch.float64, seed: int = 0) -> VisionSelectorScorer:
    torch.manual_seed(seed)
    scorer = VisionSelectorScorer(hidden).to(dtype)
    with torch.no_grad():
        for p in scorer.parameters():
            p.normal_(0.0, 0.1)
    return scorer


def naive_scores(scorer: VisionSelectorScorer, x: torch.Tensor) -> torch.Tensor:
    """The reference's quadratic form: mean_j(q_i . k_j) / sqrt(D/2)."""
    q = scorer.q_proj(x)
    k = scorer.k_proj(x)
    return (q @ k.t()).mean(dim=1) / math.sqrt(scorer.hidden_size // 2)


@pytest.mark.parametrize(("n", "hidden"), [(1, 2), (7, 16), (64, 40), (333, 130)])
def test_linear_form_equals_quadratic_reference_fp64(n, hidden):
    scorer = _randomized(hidden)
    x = torch.randn(n, hidden, dtype=torch.float64)
    got = scorer(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, naive_scores(scorer, x), rtol=0, atol=1e-10)


def test_fold_gives_w_and_c():
    scorer = _randomized(24)
    x = torch.randn(50, 24, dtype=torch.float64)
    w, c = scorer.fold(x)
    assert w.shape == (24,) and c.shape == ()
    torch.testing.assert_close(x @ w + c, naive_scores(scorer, x), rtol=0, atol=1e-10)


def test_fold_packed_equals_per_image_fold():
    scorer = _randomized(24)
    sizes = [1, 9, 30]
    x = torch.randn(sum(sizes), 24, dtype=torch.float64)
    cu = torch.tensor([0, 1, 10, 40])
    w, c = scorer.fold_packed(x, cu)
    assert w.shape == (3, 24) and c.shape == (3,)
    for b, (s, e) in enumerate([(0, 1), (1, 10), (10, 40)]):
        wb, cb = scorer.fold(x[s:e])
        torch.testing.assert_close(w[b], wb, rtol=0, atol=1e-12)
        torch.testing.assert_close(c[b], cb, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scores_are_float32_for_low_precision_input(dtype):
    scorer = _randomized(32, dtype=torch.float32)
    x = torch.randn(20, 32).to(dtype)
    got = scorer(x)
    assert got.dtype == torch.float32
    ref = naive_scores(scorer.double(), x.double()).float()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_gradients_reach_both_projections():
    scorer = _randomized(16, dtype=torch.float32)
    scorer(torch.randn(10, 16)).sum().backward()
    for name, p in scorer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert scorer.k_proj.weight.grad.abs().sum() > 0


def test_init_and_parameter_names():
    torch.manual_seed(0)
    scorer = VisionSelectorScorer(512)
    names = dict(scorer.named_parameters())
    assert list(names) == ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"]
    assert names["q_proj.weight"].shape == (256, 512)
    assert names["k_proj.bias"].shape == (256,)
    for key in ("q_proj.weight", "k_proj.weight"):
        assert abs(names[key].std().item() - 1e-4) < 5e-6
        assert abs(names[key].mean().item()) < 1e-5
    for key in ("q_proj.bias", "k_proj.bias"):
        assert torch.count_nonzero(names[key]) == 0


def test_parameter_count_at_qwen25_vl_7b_size():
    assert VisionSelectorScorer.num_parameters_for(3584) == 12_848_640
    assert VisionSelectorScorer.num_parameters_for(2048) == 4_196_352
    scorer = VisionSelectorScorer(3584)
    assert sum(p.numel() for p in scorer.parameters()) == 12_848_640


@pytest.mark.parametrize("hidden", [0, 1, 33])
def test_odd_or_tiny_hidden_size_rejected(hidden):
    with pytest.raises(ValueError, match="even"):
        VisionSelectorScorer(hidden)


def test_bad_token_shapes_rejected():
    scorer = VisionSelectorScorer(8)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        scorer(torch.randn(3, 6))
    with pytest.raises(ValueError, match="N=0"):
        scorer(torch.randn(0, 8))
