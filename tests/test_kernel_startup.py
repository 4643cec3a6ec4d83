"""No Triton compile on the request path, and the start-up self-check (issue 21, points 2-3).

- Bounded variants: the planner, over every batch shape up to the engine's encoder budget,
  yields only the plans the warm-up launches; and every launch of a served batch, keyed the
  way Triton keys its compiled variants (Triton's own ``native_specialize_impl`` on every
  non-constexpr argument, honouring each kernel's ``do_not_specialize``, plus the constexprs
  and launch options), is one the warm-up already launched.
- The self-check: Triton equals torch on the dummy batch (interpreter, both plans); a kernel
  made to fail, or to return wrong rows, gives one warning line naming the backend and the
  torch backend; ``VS_VLLM_SELECT_BACKEND`` forces a backend without a check.
"""

from __future__ import annotations

import inspect
import logging
from functools import partial

import pytest
import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

import vs_vllm.kernels.fold_triton as fold_mod
import vs_vllm.kernels.score_select_triton as sel_mod
from vs_vllm.batch import PackedImages
from vs_vllm.kernels import startup
from vs_vllm.kernels.score_select_triton import _GPU, launch_plan, reachable_plans

GPU_SMS = 132
ROW, SCORED = 40, 24
KERNELS = {
    sel_mod: ("_score_kernel", "_select_kernel", "_gather_kernel"),
    fold_mod: ("_chunk_sum_kernel", "_chunk_reduce_kernel", "_project_kernel"),
}


def _dns(kernel) -> set:
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:  # the interpreter's InterpretedFunction
        names = kernel.kwargs.get("do_not_specialize") or ()
    return set(names)


def variant_key(kernel, args, kwargs) -> tuple:
    """What Triton compiles a variant for: constexprs, options, and the specialisation of
    every other argument (dtype, ==1 / divisible by 16, pointer alignment)."""
    sig = inspect.signature(kernel.fn)
    launch_opts = {k: v for k, v in kwargs.items() if k not in sig.parameters}
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    dns = _dns(kernel)
    key = []
    for name, param in sig.parameters.items():
        value = bound.arguments[name]
        if "constexpr" in str(param.annotation):
            key.append((name, value))
        else:
            spec = native_specialize_impl(BaseBackend, value, False, name not in dns, True)
            key.append((name, spec))
    return (kernel.fn.__name__, tuple(key), tuple(sorted(launch_opts.items())))


class Recorder:
    """Stands in for a kernel object: records each launch's variant key, runs it or not."""

    def __init__(self, kernel, seen: set, execute: bool) -> None:
        self.kernel, self.seen, self.execute = kernel, seen, execute

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.add(variant_key(self.kernel, args, kwargs))
            if self.execute:
                self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def record(monkeypatch):
    def start(execute: bool) -> set:
        seen: set = set()
        for module, names in KERNELS.items():
            for name in names:
                kernel = getattr(module, name)
                kernel = getattr(kernel, "kernel", kernel)
                monkeypatch.setattr(module, name, Recorder(kernel, seen, execute))
        return seen

    return start


def test_every_size_argument_is_not_specialized():
    """The arguments that follow the batch (token, image and kept counts) must not key a
    variant; the widths and strides are fixed per model."""
    per_batch = {"num_tokens", "num_images", "search_steps", "total_kept", "K", "N"}
    for module, names in KERNELS.items():
        for name in names:
            kernel = getattr(module, name)
            params = inspect.signature(kernel.fn).parameters
            assert per_batch & set(params) <= _dns(kernel), name


def test_the_planner_yields_only_warmed_plans_up_to_the_encoder_budget():
    budget = 16384  # vLLM's default encoder budget for these models is of this order
    plans = set(reachable_plans(ROW, SCORED, _GPU))
    edges = sorted({1, 2, 255, 256, 257, 1023, 1024, 1025, 4095, 4096, 4097, budget})
    seen = set()
    for total in range(1, budget + 1, 7):
        for largest in {min(total, e) for e in edges} | {total}:
            for kept in {1, max(1, total // 5), total} | {min(total, e) for e in edges}:
                plan = launch_plan(total, kept, ROW, SCORED, GPU_SMS, _GPU, largest)
                assert plan in plans, (total, largest, kept, plan)
                seen.add(plan)
    assert seen == plans  # and every warmed plan is reachable (no wasted compile)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_served_batches_launch_only_warmed_variants(record, dtype):
    seen = record(execute=True)
    startup.warm_up(torch.device("cpu"), dtype, ROW, SCORED, num_sms=GPU_SMS)
    warmed = set(seen)
    per_kernel: dict[str, int] = {}
    for name, _, _ in warmed:
        per_kernel[name] = per_kernel.get(name, 0) + 1
    # Score: one image (shared w/c) and several; select: each block_t bucket; gather: each
    # block_k bucket; the fold's kernels: one each (the projection: kbar, w, c strides).
    assert per_kernel == {
        "_score_kernel": 2,
        "_select_kernel": len(_GPU.block_t_buckets),
        "_gather_kernel": len(_GPU.block_k_buckets),
        "_chunk_sum_kernel": 1,
        "_chunk_reduce_kernel": 1,
        "_project_kernel": 3,
    }
    record(execute=False)  # the same variant keys, without running the batches
    from vs_vllm.media_selection import MediaItem, select_media
    from vs_vllm.scorer import VisionSelectorScorer
    from vs_vllm.strategies import build_strategy

    strategies = [build_strategy("learned", VisionSelectorScorer(SCORED)), build_strategy("norm")]
    shapes = [(1,), (3,), (700,), (1024, 5), (5000,), (64,) * 9, (2048, 4096, 300)]
    for strategy in strategies:
        strategy.backend = "triton"
        for sizes in shapes:
            for ratio in (0.01, 0.3, 1.0 - 1e-9):
                items = [MediaItem((1, 2, 2 * n), ((n, max(1, int(n * ratio))),)) for n in sizes]
                x = torch.zeros(sum(sizes), ROW, dtype=dtype)
                served: set = set()
                for module, names in KERNELS.items():
                    for name in names:
                        getattr(module, name).seen = served
                _with_gpu_plans(
                    partial(select_media, x, items, strategy, merge_size=1, score_dim=SCORED)
                )
                selects = any(k < n for item in items for n, k in item.segments)
                assert bool(served) == selects, "launched nothing / launched for keep-all"
                assert served <= warmed, f"{sizes} at {ratio}: a variant the warm-up missed"


def _with_gpu_plans(fn):
    """Run ``fn`` with the GPU's plans in the interpreter (what ``num_sms=132`` selects)."""
    saved = (sel_mod.limits_for, fold_mod.fold_plan_for)
    sel_mod.limits_for = lambda device, num_sms=None: (GPU_SMS, _GPU)
    fold_mod.fold_plan_for = lambda device, num_sms=None: fold_mod.GPU_FOLD_PLAN
    try:
        return fn()
    finally:
        sel_mod.limits_for, fold_mod.fold_plan_for = saved


# -- the self-check ----------------------------------------------------------------------


@pytest.mark.parametrize("num_sms", [None, GPU_SMS], ids=["interpreter", "sms=132"])
@pytest.mark.parametrize(("row", "scored"), [(40, 40), (24, 8), (136, 45)])
def test_self_check_passes_when_triton_agrees(row, scored, num_sms):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert startup.self_check(torch.device("cpu"), dtype, row, scored, num_sms=num_sms) is None


def _prepare(caplog, **kw):
    with caplog.at_level(logging.INFO, logger="vs_vllm.kernels.startup"):
        backend = startup.prepare_select_backend(
            torch.device("cpu"), torch.bfloat16, ROW, SCORED, check_on_cpu=True, **kw
        )
    return backend, [r for r in caplog.records if r.name == "vs_vllm.kernels.startup"]


def test_prepare_picks_triton_after_a_good_check(caplog, monkeypatch):
    monkeypatch.delenv("VS_VLLM_SELECT_BACKEND", raising=False)
    backend, records = _prepare(caplog)
    assert backend == "triton"
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "compiled and checked" in records[0].getMessage()


def test_a_kernel_that_raises_falls_back_to_torch_with_one_warning(caplog, monkeypatch):
    monkeypatch.delenv("VS_VLLM_SELECT_BACKEND", raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(sel_mod, "score_select_triton", broken)
    backend, records = _prepare(caplog)
    assert backend == "torch"
    assert [r.levelno for r in records] == [logging.WARNING]
    text = records[0].getMessage()
    assert "triton select backend failed its start-up self-check" in text
    assert "illegal memory access" in text and "\n" not in text and "torch backend" in text


def test_a_kernel_that_returns_wrong_rows_falls_back_to_torch(caplog, monkeypatch):
    monkeypatch.delenv("VS_VLLM_SELECT_BACKEND", raising=False)
    real = sel_mod.select_by_scores_triton

    def off_by_one(*args, **kwargs):
        out = real(*args, **kwargs)
        out.rows[0, 0] += 1
        return out

    monkeypatch.setattr(sel_mod, "select_by_scores_triton", off_by_one)
    backend, records = _prepare(caplog)
    assert backend == "torch"
    assert "kept rows differ from the torch reference" in records[-1].getMessage()


def test_a_wrong_fold_falls_back_to_torch(caplog, monkeypatch):
    monkeypatch.delenv("VS_VLLM_SELECT_BACKEND", raising=False)
    real = fold_mod.fold_triton

    def wrong(*args, **kwargs):
        w, c = real(*args, **kwargs)
        return w, c + 2**-10

    monkeypatch.setattr(fold_mod, "fold_triton", wrong)
    backend, records = _prepare(caplog)
    assert backend == "torch" and "fold c differ" in records[-1].getMessage()


@pytest.mark.parametrize("forced", ["torch", "triton"])
def test_the_environment_forces_a_backend_without_a_check(caplog, monkeypatch, forced):
    monkeypatch.setenv("VS_VLLM_SELECT_BACKEND", forced)
    monkeypatch.setattr(startup, "self_check", lambda *a, **k: pytest.fail("checked"))
    backend, records = _prepare(caplog)
    assert backend == forced
    assert len(records) == 1 and "forced by VS_VLLM_SELECT_BACKEND" in records[0].getMessage()


def test_no_gpu_means_the_dispatch_default(monkeypatch):
    monkeypatch.delenv("VS_VLLM_SELECT_BACKEND", raising=False)
    monkeypatch.setattr(startup, "warm_up", lambda *a, **k: pytest.fail("warmed on a CPU"))
    assert startup.prepare_select_backend(torch.device("cpu"), torch.bfloat16, 8, 8) is None


def test_packed_images_know_their_largest_image():
    assert PackedImages((3, 9, 4), (1, 2, 3), "cpu").max_tokens == 9
