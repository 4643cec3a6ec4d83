"""Which implementation of a kernel runs: Triton on CUDA, the PyTorch reference elsewhere.

``VS_VLLM_SELECT_BACKEND=triton|torch`` forces one (e.g. ``triton`` with ``TRITON_INTERPRET=1``
runs the Triton kernels on the CPU). A caller may pass ``backend=`` explicitly: the serving
model passes the backend its start-up self-check (:mod:`vs_vllm.kernels.startup`) chose.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

BACKEND_ENV = "VS_VLLM_SELECT_BACKEND"
BACKENDS = ("triton", "torch")


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _log_choice(backend: str, reason: str) -> None:
    logger.debug("vs-vllm select kernel: using %s backend (%s)", backend, reason)


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """``$VS_VLLM_SELECT_BACKEND`` when set (it forces), else ``backend``, else triton on CUDA
    and torch elsewhere."""
    backend = os.environ.get(BACKEND_ENV) or backend or None
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown select backend {backend!r}; choose one of {BACKENDS}")
        if backend == "triton" and not _triton_available():
            raise RuntimeError("select backend 'triton' requested but triton is not installed")
        _log_choice(backend, "requested")
        return backend
    if device.type == "cuda" and _triton_available():
        _log_choice("triton", "CUDA tensor")
        return "triton"
    _log_choice("torch", f"{device.type} tensor" if device.type != "cuda" else "no triton")
    return "torch"
