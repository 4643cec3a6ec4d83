"""Kernels of vs-vllm, installed as ``vs_vllm.kernels``.

Each kernel has a Triton implementation and a PyTorch reference with the same signature and
results; the public functions pick Triton on CUDA and the reference elsewhere.
No vLLM and no transformers here.
"""

from vs_vllm.kernels.backend import resolve_backend
from vs_vllm.kernels.fold import fold_scorer
from vs_vllm.kernels.score_select import score_select, select_by_scores
from vs_vllm.kernels.select_io import SelectOutput

__all__ = ["SelectOutput", "fold_scorer", "resolve_backend", "score_select", "select_by_scores"]
