"""The vLLM plugin: everything in vs-vllm that imports vLLM lives under this package.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process
(API server, engine cores, workers); it must stay cheap and idempotent. It registers, for
every architecture a model adapter supports (``vs_vllm.models``), a selecting subclass of
vLLM's own class under vLLM's own architecture name, and applies the patches.
"""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    from vs_vllm.models import supported_architectures
    from vs_vllm.vllm_plugin.classes import class_path
    from vs_vllm.vllm_plugin.patches import (
        cli_args,
        ec_guard,
        engine_config,
        pruning_path,
        text_only_ratio,
    )

    for architecture in supported_architectures():
        if _registered_class(architecture) != class_path(architecture):
            # Overrides vLLM's built-in class: without selection settings the subclass is
            # stock vLLM, so plain and merged VisionSelector checkpoints both serve unchanged.
            ModelRegistry.register_model(architecture, class_path(architecture))
    cli_args.apply()
    ec_guard.apply()
    engine_config.apply()
    pruning_path.apply()
    text_only_ratio.apply()


def _registered_class(architecture: str) -> str | None:
    from vllm.model_executor.models.registry import ModelRegistry

    model = ModelRegistry.models.get(architecture)
    if model is None:
        return None
    return f"{getattr(model, 'module_name', '')}:{getattr(model, 'class_name', '')}"
