"""Every selection strategy through the one interface, plus each one's own semantics."""

from __future__ import annotations

import math

import pytest
import torch

from vs_vllm.batch import PackedImages
from vs_vllm.kernels.score_select_reference import select_by_scores_reference
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.selection import select_by_ratio, select_visual_tokens
from vs_vllm.strategies import (
    DiversityStrategy,
    NormStrategy,
    RandomStrategy,
    UniformStrategy,
    available_strategies,
    build_strategy,
)
from vs_vllm.strategies.diversity import divprune_indices

HIDDEN = 24
SIZES = [1, 2, 7, 64, 150]


def _scorer() -> VisionSelectorScorer:
    torch.manual_seed(0)
    scorer = VisionSelectorScorer(HIDDEN)
    with torch.no_grad():
        for p in scorer.parameters():
            p.normal_(0.0, 0.2)
    return scorer


def _tokens(sizes=SIZES, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(sizes), HIDDEN, generator=g).to(dtype)


def _per_image(t: torch.Tensor, sizes):
    return list(torch.split(t, list(sizes)))


def test_registry_names():
    assert available_strategies() == ("learned", "uniform", "random", "norm", "diversity")
    with pytest.raises(ValueError, match="choose one of learned, uniform"):
        build_strategy("fastv")
    with pytest.raises(ValueError, match="needs a scorer checkpoint"):
        build_strategy("learned")


@pytest.mark.parametrize("name", ["learned", "uniform", "random", "norm", "diversity"])
@pytest.mark.parametrize("ratio", [1e-6, 0.1, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_contract(name, ratio, dtype):
    strategy = build_strategy(name, _scorer())
    x = _tokens(dtype=dtype)
    images = PackedImages.from_ratio(SIZES, ratio)
    out = select_visual_tokens(x, images, strategy)
    assert out.rows.shape == (images.total_kept, HIDDEN) and out.rows.dtype == dtype
    kept = _per_image(out.indices, images.num_kept)
    for idx, n, k, xi, rows in zip(
        kept,
        SIZES,
        images.num_kept,
        _per_image(x, SIZES),
        _per_image(out.rows, images.num_kept),
        strict=True,
    ):
        assert len(idx) == k == max(1, int(n * ratio))
        assert (idx[1:] > idx[:-1]).all() and idx.min() >= 0 and idx.max() < n  # sorted, unique
        assert torch.equal(rows, xi[idx])
    again = select_visual_tokens(x.clone(), images, strategy)
    assert torch.equal(out.indices, again.indices)  # deterministic


@pytest.mark.parametrize("name", available_strategies())
def test_ratio_one_is_identity(name):
    x = _tokens()
    out = select_by_ratio(x, SIZES, 1.0, build_strategy(name, _scorer()))
    assert out.rows is x
    assert torch.equal(out.indices, torch.cat([torch.arange(n) for n in SIZES]))


def test_wrong_token_count_rejected():
    with pytest.raises(ValueError, match="expected packed visual tokens"):
        select_by_ratio(_tokens()[:-1], SIZES, 0.5, NormStrategy())


def test_learned_is_topk_of_the_scorer():
    scorer = _scorer()
    x = _tokens()
    images = PackedImages.from_ratio(SIZES, 0.3)
    out = build_strategy("learned", scorer).select(x, images)
    for xi, k, idx in zip(
        _per_image(x, SIZES),
        images.num_kept,
        _per_image(out.indices, images.num_kept),
        strict=True,
    ):
        s = scorer(xi)
        expected = torch.sort(torch.topk(s, k).indices).values
        assert torch.equal(idx, expected)


def test_learned_scores_match_scorer():
    scorer = _scorer()
    x = _tokens()
    images = PackedImages.from_ratio(SIZES, 0.3)
    got = build_strategy("learned", scorer).scores(x, images)
    want = torch.cat([scorer(xi) for xi in _per_image(x, SIZES)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_uniform_known_answers():
    def pick(n, k):
        return UniformStrategy().select(torch.zeros(n, 2), PackedImages((n,), (k,), "cpu")).indices

    assert pick(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert pick(10, 1).tolist() == [5]
    assert pick(9, 3).tolist() == [1, 4, 7]
    assert pick(7, 7).tolist() == list(range(7))
    assert pick(100, 4).tolist() == [12, 37, 62, 87]


def test_norm_keeps_largest_norms():
    x = torch.zeros(6, 3)
    x[:, 0] = torch.tensor([1.0, 5.0, 2.0, 5.0, 0.5, 3.0])
    out = NormStrategy().select(x, PackedImages((6,), (3,), "cpu"))
    assert out.indices.tolist() == [1, 3, 5]


def test_random_depends_only_on_the_image():
    a, b = _tokens([64], seed=1), _tokens([150], seed=2)
    alone = RandomStrategy().select(a, PackedImages.from_ratio([64], 0.25)).indices
    packed = select_by_ratio(torch.cat([b, a]), [150, 64], 0.25, RandomStrategy()).indices
    assert torch.equal(packed[37:], alone)  # same image, other batch position -> same tokens
    other = RandomStrategy().select(_tokens([64], seed=3), PackedImages.from_ratio([64], 0.25))
    assert not torch.equal(other.indices, alone)  # another image -> another subset


def test_random_is_roughly_uniform():
    # Over many images each position is kept about k/N of the time.
    counts = torch.zeros(50)
    for seed in range(200):
        out = RandomStrategy().select(_tokens([50], seed=seed), PackedImages((50,), (10,), "cpu"))
        counts[out.indices] += 1
    freq = counts / 200
    assert (freq - 0.2).abs().max() < 0.12
    assert math.isclose(freq.mean().item(), 0.2, rel_tol=1e-6)


def test_random_scores_use_no_global_rng():
    x = _tokens([64])
    images = PackedImages.from_ratio([64], 0.3)
    torch.manual_seed(1)
    first = RandomStrategy().select(x, images).indices
    torch.manual_seed(2)
    assert torch.equal(RandomStrategy().select(x, images).indices, first)


def test_diversity_known_case_duplicates():
    e = torch.eye(3)
    # Two copies of e0, two of e1, one e2: one of each direction is kept, lowest index on ties.
    x = torch.stack([e[0], e[0], e[1], e[1], e[2]])
    assert divprune_indices(x, 3).tolist() == [0, 2, 4]


def test_diversity_known_case_angles():
    # Unit vectors at 0, 10, 20, 90 and 180 degrees. The first pick is 180 (its nearest
    # neighbour, 90, is farthest), then 0 (opposite), then 90 (the farthest from both).
    deg = torch.tensor([0.0, 10.0, 20.0, 90.0, 180.0]) * math.pi / 180
    x = torch.stack([torch.cos(deg), torch.sin(deg)], dim=1)
    assert divprune_indices(x, 1).tolist() == [4]
    assert divprune_indices(x, 2).tolist() == [0, 4]
    assert divprune_indices(x, 3).tolist() == [0, 3, 4]
    out = DiversityStrategy().select(x, PackedImages((5,), (3,), "cpu"))
    assert torch.equal(out.rows, x[[0, 3, 4]])


def test_diversity_matches_quadratic_definition():
    # The O(kND) greedy equals DivPrune's formulation on the full distance matrix.
    x = _tokens([150], seed=5)
    f = torch.nn.functional.normalize(x, dim=-1)
    dist = 1 - f @ f.t()
    k = 20
    dist_no_self = dist + torch.diag(torch.full((150,), float("inf")))
    chosen = [int(torch.argmax(dist_no_self.min(dim=0).values))]
    for _ in range(k - 1):
        m = dist[chosen].min(dim=0).values
        m[chosen] = -float("inf")
        chosen.append(int(torch.argmax(m)))
    assert divprune_indices(x, k).tolist() == sorted(chosen)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_score_strategies_use_the_select_kernel(backend, monkeypatch):
    """``select`` is the strategy's scores through ``kernels.select_by_scores`` on the
    strategy's backend (Triton under the interpreter here): the same kept indices and rows as
    the reference on the same scores, and the backend the serving model set is the one
    dispatched to."""
    import vs_vllm.strategies.base as base

    x = _tokens()
    images = PackedImages.from_ratio(SIZES, 0.3)
    asked = []
    kernel = base.select_by_scores

    def spy(*args, **kwargs):
        asked.append(kwargs.get("backend"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(base, "select_by_scores", spy)
    for strategy in (NormStrategy(), RandomStrategy()):
        strategy.backend = backend
        scores = strategy.scores(x, images)
        ref = select_by_scores_reference(
            x, scores, images.cu_seqlens, images.keep_counts, images.total_kept
        )
        got = strategy.select(x, images)
        assert torch.equal(got.indices, ref.indices) and torch.equal(got.rows, ref.rows)
    assert asked == [backend, backend]
