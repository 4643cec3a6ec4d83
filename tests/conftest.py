"""Shared test setup. Triton kernels run under the interpreter on the CPU unless the
environment says otherwise (TRITON_INTERPRET=0 on a GPU machine runs them compiled)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def kernel_device() -> torch.device:
    """Where Triton kernels run: CUDA when compiled kernels can run, the CPU when interpreted."""
    if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def device() -> torch.device:
    return kernel_device()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL built locally once per test session (never downloaded)."""
    from tiny_models.tiny_qwen import build_tiny_qwen25_vl

    return build_tiny_qwen25_vl(tmp_path_factory.mktemp("tiny-qwen25-vl"))


@pytest.fixture(scope="session")
def tiny_training_set(tmp_path_factory):
    """A 6-sample training JSONL (1 or 2 images per sample) with its images, made locally."""
    import json

    from tiny_models.tiny_qwen import tiny_image

    root = tmp_path_factory.mktemp("train-data")
    lines = []
    for i in range(6):
        names = [f"img{i}_{j}.png" for j in range(1 + i % 2)]
        for j, name in enumerate(names):
            tiny_image(112 + 28 * j, 84 + 28 * (i % 3), seed=10 * i + j).save(root / name)
        marker = "<image>\n" * len(names)
        lines.append(
            {
                "image": names if len(names) > 1 else names[0],
                "conversations": [
                    {"from": "human", "value": f"{marker}what is shown?"},
                    {"from": "gpt", "value": ["a cat", "two dogs", "the sea"][i % 3]},
                ],
            }
        )
    path = root / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture(scope="session")
def scorer_path(tmp_path_factory):
    """A random scorer for the tiny model, weights widened so scores are well apart (no
    near-ties at the top-k boundary between engines that round differently)."""
    from vs_vllm.checkpoint import save_scorer
    from vs_vllm.scorer import VisionSelectorScorer

    torch.manual_seed(7)
    scorer = VisionSelectorScorer(64)
    with torch.no_grad():
        for p in scorer.parameters():
            p.normal_(0.0, 0.1)
    return save_scorer(scorer, tmp_path_factory.mktemp("scorer") / "scorer.safetensors")


@pytest.fixture(scope="session")
def plugin_run(tiny_model_dir, scorer_path, tmp_path_factory):
    """The single-process reference: the plugin (learned, per-request ratios) on the real
    vLLM CPU engine, on tests.engine.harness.REQUESTS. Started once per test session."""
    from tests.engine.harness import REQUESTS, run_engine, selector_overrides

    spec = {
        "model": str(tiny_model_dir),
        "hf_overrides": selector_overrides(scorer_path),
        "requests": REQUESTS,
    }
    return run_engine(tmp_path_factory.mktemp("plugin"), spec)
