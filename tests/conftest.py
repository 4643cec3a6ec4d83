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
    from vs_vllm.testing.tiny_qwen import build_tiny_qwen25_vl

    return build_tiny_qwen25_vl(tmp_path_factory.mktemp("tiny-qwen25-vl"))


@pytest.fixture(scope="session")
def tiny_training_set(tmp_path_factory):
    """A 6-sample training JSONL (1 or 2 images per sample) with its images, made locally."""
    import json

    from vs_vllm.testing.tiny_qwen import tiny_image

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
