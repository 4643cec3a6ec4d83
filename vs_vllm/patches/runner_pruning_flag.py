"""Turn on the model runner's multimodal-pruning path for models that select tokens.

Why: vLLM recomputes M-RoPE positions after the encoder only when the runner's
``is_multimodal_pruning_enabled`` is set. ``GPUModelRunner.load_model`` sets it only when
video pruning (EVS) is configured (``MultiModalConfig.is_multimodal_pruning_enabled()`` looks
at ``video_pruning_rate`` alone), and ``CPUModelRunner.load_model`` never sets it (an upstream
bug: EVS fails on the CPU backend for the same reason). Image selection needs it either way.

How: wrap both ``load_model`` methods; afterwards, if the loaded model says it prunes
(``model.is_multimodal_pruning_enabled``, which our model sets when selection is configured),
set the runner flag. Nothing changes for other models.

Remove when: vLLM asks the model itself whether it prunes (e.g. a model-level
``is_multimodal_pruning_enabled`` read by every runner).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

TARGETS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
)
_MARK = "__vs_vllm_pruning_flag__"


def _wrap(load_model: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(load_model)
    def load_model_then_enable_pruning(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load_model(self, *args, **kwargs)
        if getattr(self.get_model(), "is_multimodal_pruning_enabled", False):
            self.is_multimodal_pruning_enabled = True
        return result

    setattr(load_model_then_enable_pruning, _MARK, True)
    return load_model_then_enable_pruning


def apply() -> None:
    for module_name, class_name in TARGETS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a vLLM build without that runner
            continue
        runner = getattr(module, class_name)
        if "load_model" not in vars(runner):
            raise RuntimeError(
                f"vs-vllm patch runner_pruning_flag: {class_name}.load_model not found in "
                f"{module_name}; this vLLM version is not supported"
            )
        if not getattr(runner.load_model, _MARK, False):
            runner.load_model = _wrap(runner.load_model)


def is_applied() -> bool:
    module = importlib.import_module(TARGETS[1][0])
    return bool(getattr(getattr(module, TARGETS[1][1]).load_model, _MARK, False))
