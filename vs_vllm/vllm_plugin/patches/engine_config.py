"""Check ``hf_overrides={"vision_selector": ...}`` when the engine config is built.

Why: ``LLM(MODEL, hf_overrides={"vision_selector": {...}})`` is the Python form of
``vllm serve MODEL --vision-keep-ratio ...``, but nothing in vLLM looks at that key. On a
supported model the selecting class checks it when the model loads, in the engine process,
after the engine started; on an unsupported model (``LlamaForCausalLM``, ...) no selecting
class runs at all, so the settings would be dropped without a word and the user would serve
every visual token thinking they were selected. The ``serve`` flags are checked by
``cli_args``; this is the same check for every other way of building an engine.

How: wrap ``EngineArgs.create_engine_config`` (every engine is built through it: ``LLM``,
``AsyncLLM``, ``vllm serve``, ``vllm bench``); after vLLM built the config (``hf_overrides``
applied), run :func:`vs_vllm.vllm_plugin.validation.check_model` on the model's HF config when
it has selection settings, and raise ``ValueError`` with one line (unsupported architecture
naming the supported ones, unknown settings, missing scorer, per-video selection on a
frame-run family, EVS with selection) before any engine process starts; warn once when the
settings keep every token.

Remove when: vLLM offers a hook to validate model-specific ``hf_overrides``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from vs_vllm.vllm_plugin.settings import MODEL_CHECKED

_MARK = "__vs_vllm_engine_config__"


def check_engine_config(config: Any, *, model_checked: bool = False) -> None:
    """``ValueError`` when the config's model has selection settings that cannot apply.
    ``model_checked``: the serve flags' check already read the model (skip that part)."""
    from vs_vllm.vllm_plugin.settings import HF_CONFIG_KEY, SelectorSettings
    from vs_vllm.vllm_plugin.validation import check_evs, check_model, warn_if_keeps_everything

    model_config = getattr(config, "model_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    if getattr(hf_config, HF_CONFIG_KEY, None) is None:
        return  # stock vLLM
    model = str(getattr(model_config, "model", ""))
    mm_config = getattr(model_config, "multimodal_config", None)
    try:
        settings = SelectorSettings.from_hf_config(hf_config)
        if settings is not None:
            check_evs(getattr(mm_config, "video_pruning_rate", None))
            if not model_checked:
                check_model(model, settings, hf_config)
            warn_if_keeps_everything(settings)
    except ValueError as err:
        raise ValueError(f"vs-vllm: hf_overrides[{HF_CONFIG_KEY!r}]: {err}") from None


def _wrap(create_engine_config: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(create_engine_config)
    def create_engine_config_checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = create_engine_config(self, *args, **kwargs)
        check_engine_config(config, model_checked=bool(getattr(self, MODEL_CHECKED, False)))
        return config

    setattr(create_engine_config_checked, _MARK, True)
    return create_engine_config_checked


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    create = vars(EngineArgs).get("create_engine_config")
    if not callable(create):
        raise RuntimeError(
            "vs-vllm patch engine_config: EngineArgs.create_engine_config not found; this vLLM "
            "version is not supported"
        )
    if not getattr(create, _MARK, False):
        EngineArgs.create_engine_config = _wrap(create)


def is_applied() -> bool:
    from vllm.engine.arg_utils import EngineArgs

    return bool(getattr(vars(EngineArgs).get("create_engine_config"), _MARK, False))
