"""Kernels of vs-vllm, installed as ``vs_vllm.kernels``.

Each kernel has a Triton implementation and a PyTorch reference with the same signature and
results; the public functions pick Triton on CUDA and the reference elsewhere.
No vLLM and no transformers here.
"""

from vs_vllm.kernels.score_select import (
    SelectOutput,
    resolve_backend,
    score_select,
    select_by_scores,
)

__all__ = ["SelectOutput", "resolve_backend", "score_select", "select_by_scores"]
