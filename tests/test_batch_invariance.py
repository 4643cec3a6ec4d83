"""Batch- and rank-invariant selection: an image keeps bit-identical scores, kept indices and
rows whatever else shares its batch and wherever it sits in it (issue 21).

Every tensor-parallel rank selects on its own, so this is also what makes all ranks keep the
same tokens. The bar is vLLM's ``VLLM_BATCH_INVARIANT`` mode: fixed reduction orders, no
atomics. The image is the issue's measured case (bf16 rows, D = 384, 700 tokens), alone, then
first, in the middle and last among 7 other images of other sizes. Real-valued data (not the
kernel tests' small integers), so a batch-dependent summation order would show.

- the torch path: every strategy through ``select_visual_tokens`` (what serving runs on the
  CPU engine, and the fallback on a GPU);
- the Triton kernels under ``TRITON_INTERPRET=1``, with the interpreter's plans and with the
  launch plans of a 132-SM GPU (``num_sms=132``, the fold's ``GPU_FOLD_PLAN``);
- a static check that nothing in the serving path uses an atomic or an accumulating scatter.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vs_vllm.batch import PackedImages
from vs_vllm.kernels.fold_triton import GPU_FOLD_PLAN, fold_triton
from vs_vllm.kernels.score_select_triton import score_select_triton, select_by_scores_triton
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.selection import select_visual_tokens
from vs_vllm.strategies import available_strategies, build_strategy

ROOT = Path(__file__).resolve().parents[1]
D = 384
N = 700
KEEP = 0.3
OTHERS = (37, 256, 511, 129, 300, 64, 190)
# The image alone, then first, in the middle and last among the others.
LAYOUTS = {"alone": 0, "first": 1, "middle": 4, "last": 8}


def _rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g).to(torch.bfloat16)


IMAGE = _rows(N, 0)
OTHER_ROWS = [_rows(n, 10 + i) for i, n in enumerate(OTHERS)]


def _batch(layout: str) -> tuple[torch.Tensor, PackedImages, int]:
    """(packed rows, images, index of the image) for a layout."""
    if layout == "alone":
        parts, at = [IMAGE], 0
    else:
        at = LAYOUTS[layout] - 1
        parts = [*OTHER_ROWS[:at], IMAGE, *OTHER_ROWS[at:]]
    sizes = tuple(p.shape[0] for p in parts)
    return torch.cat(parts), PackedImages.from_ratio(sizes, KEEP), at


def _scorer() -> VisionSelectorScorer:
    torch.manual_seed(3)
    scorer = VisionSelectorScorer(D)
    with torch.no_grad():
        for p in scorer.parameters():
            p.normal_(0.0, 0.05)
    return scorer


def _image_part(out, images: PackedImages, at: int):
    """The image's own scores, kept indices and kept rows (as bits)."""
    t0 = sum(images.num_tokens[:at])
    k0 = sum(images.num_kept[:at])
    k = images.num_kept[at]
    return (
        out.scores[t0 : t0 + N].view(torch.int32).clone(),
        out.indices[k0 : k0 + k].clone(),
        out.rows[k0 : k0 + k].view(torch.int16).clone(),
    )


def _assert_invariant(run):
    """``run(x, images)`` -> SelectOutput; the image's part is the same bits in every layout."""
    parts = {}
    for layout in LAYOUTS:
        x, images, at = _batch(layout)
        parts[layout] = _image_part(run(x, images), images, at)
    alone = parts["alone"]
    for layout, got in parts.items():
        for name, a, b in zip(("scores", "indices", "rows"), alone, got, strict=True):
            assert torch.equal(a, b), f"{layout}: the image's {name} depend on its batch"
    return alone


@pytest.mark.parametrize("name", available_strategies())
def test_every_strategy_is_batch_invariant_on_the_torch_path(name):
    strategy = build_strategy(name, _scorer() if name == "learned" else None)
    strategy.backend = "torch"
    scores, indices, _ = _assert_invariant(
        lambda x, images: select_visual_tokens(x, images, strategy)
    )
    assert indices.numel() == int(N * KEEP)
    if name in ("learned", "norm", "random"):
        assert torch.unique(scores).numel() > N // 2  # real scores, not a constant


@pytest.mark.parametrize("name", ["learned", "norm", "random"])
def test_score_strategies_are_batch_invariant_on_the_triton_backend(name):
    """The strategies as serving calls them, on the Triton backend (interpreter plans)."""
    strategy = build_strategy(name, _scorer() if name == "learned" else None)
    strategy.backend = "triton"
    _assert_invariant(lambda x, images: select_visual_tokens(x, images, strategy))


def test_learned_is_batch_invariant_with_a_gpus_launch_plans():
    """Fold + score + select + gather with the block sizes a 132-SM GPU uses."""
    s = _scorer()

    def run(x, images):
        w, c = fold_triton(
            x,
            images.cu_seqlens,
            images.num_tokens,
            s.q_proj.weight,
            s.q_proj.bias,
            s.k_proj.weight,
            s.k_proj.bias,
            s.scale,
            plan=GPU_FOLD_PLAN,
        )
        return score_select_triton(
            x,
            images.cu_seqlens,
            images.keep_counts,
            images.total_kept,
            w,
            c,
            num_sms=132,
            max_tokens=images.max_tokens,
        )

    scores, _, _ = _assert_invariant(run)
    # And it selects what the torch path selects (scores within float32 rounding).
    x, images, _ = _batch("alone")
    ref = select_visual_tokens(x, images, build_strategy("learned", s))
    torch.testing.assert_close(scores.view(torch.float32), ref.scores, rtol=1e-4, atol=1e-5)


def test_precomputed_scores_are_batch_invariant_with_a_gpus_launch_plans():
    def run(x, images):
        scores = torch.linalg.vector_norm(x.float(), dim=-1)  # row-local: any order is fine
        return select_by_scores_triton(
            x,
            scores,
            images.cu_seqlens,
            images.keep_counts,
            images.total_kept,
            num_sms=132,
            max_tokens=images.max_tokens,
        )

    _assert_invariant(run)


# -- nothing in the serving path accumulates in an order the hardware picks ----------------

SERVING_PATH = [
    *sorted((ROOT / "kernels").glob("*.py")),
    *sorted((ROOT / "vs_vllm" / "strategies").glob("*.py")),
    ROOT / "vs_vllm" / "selection.py",
    ROOT / "vs_vllm" / "media_selection.py",
    ROOT / "vs_vllm" / "batch.py",
    ROOT / "vs_vllm" / "scorer.py",
    ROOT / "vs_vllm" / "positions.py",
    ROOT / "vs_vllm" / "position_channels.py",
    ROOT / "vs_vllm" / "vllm_plugin" / "model.py",
]
FORBIDDEN = re.compile(
    r"atomic_\w+|\.index_add_?\(|scatter_add_?\(|scatter_reduce_?\(|index_reduce_?\(|"
    r"accumulate\s*=\s*True"
)


def test_no_atomic_or_accumulating_scatter_in_the_serving_path():
    assert all(p.exists() for p in SERVING_PATH)
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in SERVING_PATH
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if FORBIDDEN.search(line.split("#")[0])
    ]
    assert not offenders, "order-dependent accumulation in the serving path:\n" + "\n".join(
        offenders
    )


def test_the_static_check_finds_what_it_forbids():
    for line in (
        "tl.atomic_add(p, v)",
        "s.index_add_(0, i, x)",
        "t.scatter_add(0, i, v)",
        "x.index_put_((i,), v, accumulate=True)",
    ):
        assert FORBIDDEN.search(line), line
