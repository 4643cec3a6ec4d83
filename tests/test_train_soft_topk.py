"""Differentiable top-k of training: exact gradients, mask sums, hard top-k agreement."""

from __future__ import annotations

import pytest
import torch

from vs_vllm.batch import PackedImages
from vs_vllm.kernels import select_by_scores
from vs_vllm.train.soft_topk import SoftTopK, hard_topk_mask, soft_topk_mask

LAYOUTS = [[7], [1, 5, 17], [3, 3, 3]]


def _cu(sizes, device="cpu"):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], device=device)


def _keeps(sizes, kind):
    return [{"one": 1, "half": max(1, n // 2), "n_minus_1": max(1, n - 1)}[kind] for n in sizes]


def _segment_sums(mask, sizes):
    return torch.stack([s.sum() for s in mask.double().split(sizes)])


def _loop_reference(x, sizes, keeps, steps=64):
    """The reference's soft top-k, one image at a time, in plain PyTorch."""
    out = []
    for xs, k in zip(x.split(sizes), keeps, strict=True):
        lo, hi = -xs.max() - 10, -xs.min() + 10
        for _ in range(steps):
            mid = (lo + hi) / 2
            if torch.sigmoid(xs + mid).sum() < k:
                lo = mid
            else:
                hi = mid
        out.append(torch.sigmoid(xs + (lo + hi) / 2))
    return torch.cat(out)


@pytest.mark.parametrize("sizes", LAYOUTS, ids=str)
@pytest.mark.parametrize("kind", ["one", "half", "n_minus_1"])
def test_gradcheck_scores(sizes, kind):
    g = torch.Generator().manual_seed(sum(sizes))
    x = (torch.randn(sum(sizes), generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    images = (_cu(sizes), torch.tensor(_keeps(sizes, kind)))
    assert torch.autograd.gradcheck(
        lambda s: soft_topk_mask(s, images), (x,), eps=1e-6, atol=1e-6, rtol=1e-4
    )


@pytest.mark.parametrize("sizes", [[7], [5, 17], [3, 3, 3]], ids=str)
def test_gradcheck_scores_and_float_k(sizes):
    """Soft (non-integer) k, differentiable too: d p / d k_b = v / sum_b(v)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(sizes), generator=g, dtype=torch.float64).requires_grad_()
    k = torch.tensor([n * 0.4 + 0.3 for n in sizes], dtype=torch.float64, requires_grad=True)
    cu = _cu(sizes)
    assert torch.autograd.gradcheck(
        lambda s, kk: soft_topk_mask(s, (cu, kk)), (x, k), eps=1e-6, atol=1e-6, rtol=1e-4
    )


def test_gradcheck_through_packed_images_and_function():
    images = PackedImages.from_ratio([4, 9, 2], 0.5)
    x = torch.randn(15, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: soft_topk_mask(s, images), (x,), eps=1e-6, atol=1e-6, rtol=1e-4
    )
    p = SoftTopK.apply(x, images.segment_ids, images.cu_seqlens, images.keep_counts, 3)
    assert torch.equal(p, soft_topk_mask(x, images))


@pytest.mark.parametrize("std", [0.01, 1.0, 10.0])
def test_mask_sums_to_k(std):
    sizes = [1, 2, 5, 64, 333, 2048]
    g = torch.Generator().manual_seed(int(std * 100))
    x = torch.randn(sum(sizes), generator=g) * std
    for ratio in (0.1, 0.3, 0.9, 1.0):
        images = PackedImages.from_ratio(sizes, ratio)
        p = soft_topk_mask(x, images)
        assert p.dtype == torch.float32
        assert ((p >= 0) & (p <= 1)).all()
        sums = _segment_sums(p, sizes)
        assert torch.allclose(sums, torch.tensor(images.num_kept, dtype=torch.float64), atol=1e-4)
    soft_k = torch.tensor([1.0, 1.5, 2.25, 10.7, 100.1, 1000.9])
    p = soft_topk_mask(x, (_cu(sizes), soft_k))
    assert torch.allclose(_segment_sums(p, sizes), soft_k.double(), atol=1e-4)


def test_single_token_images():
    x = torch.tensor([3.0, -50.0, 0.0])
    p = soft_topk_mask(x, PackedImages([1, 1, 1], [1, 1, 1], "cpu"))
    assert torch.equal(p, torch.ones(3))


@pytest.mark.parametrize("sizes", [[1, 5, 17], [3, 3, 3], [40, 1, 7, 200]], ids=str)
def test_vectorized_equals_per_image_loop(sizes):
    g = torch.Generator().manual_seed(len(sizes))
    x = torch.randn(sum(sizes), generator=g, dtype=torch.float64) * 2
    keeps = [max(1, n // 3) for n in sizes]
    p = soft_topk_mask(x, (_cu(sizes), torch.tensor(keeps)))
    ref = _loop_reference(x, sizes, keeps)
    # Where k == N the reference stops at sigmoid(10) per token; here the mask is exactly 1.
    full = torch.cat([torch.full((n,), k == n) for n, k in zip(sizes, keeps, strict=True)])
    assert torch.allclose(p[~full], ref[~full], atol=1e-12)
    assert torch.equal(p[full], torch.ones_like(p[full]))
    assert (ref[full] > 1 - 1e-4).all()


def test_monotonic_within_each_image():
    sizes = [50, 9, 120]
    x = torch.randn(sum(sizes))
    p = soft_topk_mask(x, PackedImages.from_ratio(sizes, 0.3))
    for xs, ps in zip(x.split(sizes), p.split(sizes), strict=True):
        order = torch.argsort(xs)
        assert (ps[order].diff() >= 0).all()
        assert ps[order[-1]] > ps[order[0]]


def test_large_scores_approach_hard_mask():
    sizes = [30, 12]
    images = PackedImages.from_ratio(sizes, 0.25)
    x = torch.randperm(sum(sizes)).float() * 20  # distinct scores, far apart
    assert torch.allclose(soft_topk_mask(x, images), hard_topk_mask(x, images), atol=1e-4)


def _kernel_mask(scores, sizes, keeps):
    cu, kc = _cu(sizes), torch.tensor(keeps)
    x = torch.zeros(scores.shape[0], 4)
    out = select_by_scores(x, scores, cu, kc, sum(keeps))
    local = out.indices.split(keeps)
    mask = torch.zeros(scores.shape[0])
    for start, idx in zip(cu[:-1].tolist(), local, strict=True):
        mask[start + idx] = 1.0
    return mask


@pytest.mark.parametrize("seed", range(4))
def test_hard_mask_matches_select_by_scores(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 6, 17, 33, 4]
    keeps = [1, 3, 5, 33, 1]
    # Small integers: many ties, which must go to the lower index as in the kernel.
    scores = torch.randint(-2, 3, (sum(sizes),), generator=g).float()
    for s in (scores, scores + torch.rand(sum(sizes), generator=g)):
        hard = hard_topk_mask(s, (_cu(sizes), torch.tensor(keeps)))
        assert torch.equal(hard, _kernel_mask(s, sizes, keeps))
        assert [int(m.sum()) for m in hard.split(sizes)] == keeps


def test_hard_mask_packed_images_and_dtype():
    images = PackedImages.from_ratio([5, 8], 0.4)
    s = torch.tensor([0.0, 0.0, 1.0, 0.0, -1.0, 3, 3, 3, 2, 1, 0, 9, 3], dtype=torch.bfloat16)
    mask = hard_topk_mask(s, images)
    assert mask.dtype == torch.bfloat16
    # k = 2 of 5: the 1 and the first 0; k = 3 of 8: the 9 and the first two 3s.
    assert mask.tolist() == [*[1, 0, 1, 0, 0], *[1, 1, 0, 0, 0, 0, 1, 0]]


def test_saturated_gradients_are_finite():
    # k == N: mask exactly 1, gradient exactly 0.
    x = (torch.randn(6) * 1e4).requires_grad_()
    p = soft_topk_mask(x, PackedImages([6], [6], "cpu"))
    assert torch.equal(p, torch.ones(6))
    (p * torch.arange(6.0)).sum().backward()
    assert torch.equal(x.grad, torch.zeros(6))
    # Huge scores, k < N: every token saturates (sum_b(v) == 0): gradient 0, not NaN.
    x = torch.tensor([1e4, -1e4, 2e4, -3e4, 5e3], requires_grad=True)
    p = soft_topk_mask(x, (torch.tensor([0, 3, 5]), torch.tensor([1, 1])))
    assert torch.isfinite(p).all()
    (p * torch.randn(5)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_input_dtype_kept_and_gradient_sums_to_zero():
    x = torch.randn(40, dtype=torch.bfloat16, requires_grad=True)
    images = PackedImages.from_ratio([25, 15], 0.2)
    p = soft_topk_mask(x, images)
    assert p.dtype == torch.bfloat16
    x64 = x.detach().double().requires_grad_()
    p64 = soft_topk_mask(x64, images)
    (p64 * torch.randn(40, dtype=torch.float64)).sum().backward()
    # Moving the sum away from k is impossible: per image, the gradient sums to zero.
    zero = torch.zeros(2, dtype=torch.float64)
    assert torch.allclose(_segment_sums(x64.grad, [25, 15]), zero, atol=1e-12)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        soft_topk_mask(torch.randn(4), PackedImages([5], [1], "cpu"))
    with pytest.raises(ValueError):
        soft_topk_mask(torch.randn(4, 2), (torch.tensor([0, 8]), torch.tensor([1])))
    with pytest.raises(ValueError):
        soft_topk_mask(torch.randn(4), (torch.tensor([0, 2, 4]), torch.tensor([1, 1, 1])))
    with pytest.raises(ValueError):
        soft_topk_mask(torch.randn(4), (torch.tensor([0, 5]), 1))
