"""The selecting vLLM classes, one per supported architecture, built from the adapters.

For an architecture ``A`` whose family adapter names vLLM's classes ``M`` (model), ``I``
(processing info), ``P`` (processor) and ``D`` (dummy inputs), this module builds::

    class VisionSelector_<A>(SelectingModel, M)             # registered as A
    class VisionSelector_<A>_ProcessingInfo(SelectingProcessingInfo, I)
    class VisionSelector_<A>_Processor(SelectingProcessor, P)

and registers the processor pair for the model class with vLLM's multimodal registry. The
classes are built on first access (``ModelRegistry`` imports ``module:Name`` lazily, in each
process), so importing this module costs nothing and needs no vLLM model module.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from vs_vllm.models import ModelAdapter, adapter_for, supported_architectures
from vs_vllm.models.adapter import import_object

PREFIX = "VisionSelector_"


def class_name(architecture: str) -> str:
    return PREFIX + architecture


def class_path(architecture: str) -> str:
    """``module:Name`` of the selecting model class, as vLLM's ModelRegistry takes it."""
    return f"{__name__}:{class_name(architecture)}"


def _subclass(name: str, mixin: type, base: type, adapter: ModelAdapter) -> type:
    cls = type(name, (mixin, base), {"vs_adapter": adapter, "__module__": __name__})
    cls.__qualname__ = name
    return cls


@cache
def model_class(architecture: str) -> type:
    """The selecting model class of ``architecture`` (built once per process)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from vs_vllm.vllm_plugin.model import SelectingModel
    from vs_vllm.vllm_plugin.processor import SelectingProcessingInfo, SelectingProcessor

    adapter = adapter_for([architecture])
    classes = adapter.vllm[architecture]
    name = class_name(architecture)
    info = _subclass(
        f"{name}_ProcessingInfo",
        SelectingProcessingInfo,
        import_object(classes.processing_info),
        adapter,
    )
    processor = _subclass(
        f"{name}_Processor", SelectingProcessor, import_object(classes.processor), adapter
    )
    model = _subclass(name, SelectingModel, import_object(classes.model), adapter)
    # vLLM's SupportsMultiModalPruning flag: the mixin implements recompute_mrope_positions
    # for every M-RoPE family, also one whose own class does not prune (e.g. GLM-4.1V). Runners
    # switch the pruning path on only when MultiModalConfig says so (the pruning_path patch).
    model.supports_multimodal_pruning = adapter.uses_mrope
    globals().update({info.__name__: info, processor.__name__: processor})
    return MULTIMODAL_REGISTRY.register_processor(
        processor, info=info, dummy_inputs=import_object(classes.dummy_inputs)
    )(model)


def __getattr__(name: str) -> Any:
    if name.startswith(PREFIX):
        architecture = name.removeprefix(PREFIX)
        for suffix in ("_ProcessingInfo", "_Processor"):
            if architecture.endswith(suffix):
                model_class(architecture.removesuffix(suffix))
                return globals()[name]
        if architecture in supported_architectures():
            return model_class(architecture)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
