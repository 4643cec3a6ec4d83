"""The vLLM plugin: everything in vs-vllm that imports vLLM lives under this package.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process
(API server, engine cores, workers); it must stay cheap and idempotent.
"""

from __future__ import annotations

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_CLASS = "vs_vllm.vllm_plugin.model:VisionSelectorQwen2_5_VL"


def register() -> None:
    from vllm import ModelRegistry

    from vs_vllm.patches import cli_args, pruning_path

    if _registered_class() != MODEL_CLASS:
        # Overrides vLLM's built-in Qwen2.5-VL: without selection settings the subclass is
        # stock vLLM, so plain and merged VisionSelector checkpoints both serve unchanged.
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    cli_args.apply()
    pruning_path.apply()


def _registered_class() -> str | None:
    from vllm.model_executor.models.registry import ModelRegistry

    model = ModelRegistry.models.get(ARCHITECTURE)
    if model is None:
        return None
    return f"{getattr(model, 'module_name', '')}:{getattr(model, 'class_name', '')}"
