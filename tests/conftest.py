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
