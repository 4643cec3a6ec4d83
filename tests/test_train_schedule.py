"""Curriculum weight, learning-rate schedule and selection loss of training."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vs_vllm.train.schedule import bce_weight, cosine_with_warmup, selection_loss


def test_bce_weight_endpoints_linear_and_clamped():
    assert bce_weight(0, 280) == pytest.approx(0.1)
    assert bce_weight(280, 280) == pytest.approx(2.0)
    assert bce_weight(140, 280) == pytest.approx(1.05)
    assert bce_weight(70, 280) == pytest.approx(0.1 + 1.9 / 4)
    assert bce_weight(-5, 280) == pytest.approx(0.1)
    assert bce_weight(1000, 280) == pytest.approx(2.0)
    assert bce_weight(100, 100, start=0.1, end=3.0) == pytest.approx(3.0)  # LLaVA-OV
    with pytest.raises(ValueError):
        bce_weight(0, 0)


def _lrs(total, peak=5e-5, **kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = cosine_with_warmup(opt, total, **kwargs)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_with_warmup_shape():
    total, peak = 280, 5e-5
    warmup = math.ceil(0.03 * total)  # 9 steps
    lrs = _lrs(total, peak)
    assert lrs[0] == 0.0
    for s in range(warmup):  # linear warmup
        assert lrs[s] == pytest.approx(peak * s / warmup)
    assert lrs[warmup] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak)
    decay = lrs[warmup:]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(peak / 2, rel=1e-2)
    assert lrs[total] == pytest.approx(0.0, abs=1e-15)


def test_cosine_with_warmup_min_lr_and_past_the_end():
    total, peak = 100, 1.0
    lrs = _lrs(total, peak, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[total] == pytest.approx(0.1)
    assert min(lrs[10:]) == pytest.approx(0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, 10, warmup_ratio=0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)  # no warmup: peak at once
    for _ in range(15):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # stays at the minimum


def test_selection_loss_matches_manual_bce():
    lm = torch.tensor(2.5, requires_grad=True)
    soft = torch.tensor([0.9, 0.2, 0.5, 0.0, 1.0], requires_grad=True)
    hard = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    total, bce = selection_loss(lm, soft, hard, 0.7)
    eps = 1e-6
    manual = (
        -(math.log(0.9) + math.log(0.8) + math.log(0.5) + math.log(1 - eps) + math.log(1 - eps)) / 5
    )
    assert bce.item() == pytest.approx(manual, rel=1e-5)
    assert total.item() == pytest.approx(2.5 + 0.7 * manual, rel=1e-5)
    assert bce.item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy(soft.detach(), hard).item(), rel=1e-4
    )
    total.backward()
    assert lm.grad.item() == pytest.approx(1.0)
    assert torch.isfinite(soft.grad).all()
    # d/dp of -log p, weighted 0.7 and averaged over 5 tokens.
    assert soft.grad[0].item() == pytest.approx(-0.7 / 0.9 / 5, rel=1e-5)
    assert soft.grad[1].item() == pytest.approx(0.7 / 0.8 / 5, rel=1e-5)


def test_selection_loss_saturated_wrong_and_empty():
    lm = torch.tensor(1.0)
    total, bce = selection_loss(lm, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), 2.0)
    assert bce.item() == pytest.approx(-math.log(1e-6), rel=1e-3)  # clamped: finite
    assert torch.isfinite(total)
    total, bce = selection_loss(lm, torch.zeros(0), torch.zeros(0), 2.0)
    assert bce.item() == 0.0 and total.item() == 1.0
    with pytest.raises(ValueError):
        selection_loss(lm, torch.zeros(3), torch.zeros(2), 1.0)
