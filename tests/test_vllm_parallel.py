"""The plugin under tensor parallelism and chunked prefill, on the real vLLM CPU engine.

Every run is compared with the single-process reference run (`plugin_run`, session fixture):
the same prompt token counts, the same greedy tokens, the same logprobs (float32; TP changes
the order of reductions, hence a small tolerance there). Every rank selects the same tokens:
the scorer is loaded from the same file on each rank and selection is deterministic.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.harness import REQUESTS, TP2_ENV, run_engine, selector_overrides

pytestmark = pytest.mark.slow


def _assert_same(run, reference, atol):
    for ours, ref in zip(run["results"], reference["results"], strict=True):
        assert ours["prompt_token_ids"] == ref["prompt_token_ids"]
        assert ours["token_ids"] == ref["token_ids"]
        torch.testing.assert_close(ours["logprobs"], ref["logprobs"], rtol=0, atol=atol)


def test_tensor_parallel_2_offline(tiny_model_dir, scorer_path, plugin_run, tmp_path_factory):
    spec = {
        "model": str(tiny_model_dir),
        "hf_overrides": selector_overrides(scorer_path),
        "requests": REQUESTS,
        "llm_kwargs": {"tensor_parallel_size": 2},
    }
    run = run_engine(tmp_path_factory.mktemp("tp2"), spec, env=TP2_ENV)
    _assert_same(run, plugin_run, atol=1e-4)


def test_chunked_prefill_16_tokens(tiny_model_dir, scorer_path, plugin_run, tmp_path_factory):
    """Kept tokens of one image are split over several 16-token steps."""
    spec = {
        "model": str(tiny_model_dir),
        "hf_overrides": selector_overrides(scorer_path),
        "requests": REQUESTS,
        "llm_kwargs": {"max_num_batched_tokens": 16, "enable_chunked_prefill": True},
    }
    run = run_engine(tmp_path_factory.mktemp("chunked"), spec)
    _assert_same(run, plugin_run, atol=1e-5)
