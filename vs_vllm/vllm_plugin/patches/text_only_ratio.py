"""Check a text-only request's ``vision_keep_ratio`` / ``video_keep_ratio``.

Why: a request's ratio is checked by the selecting processor, which vLLM runs only for a
prompt with images or videos. For a text-only prompt vLLM's renderer drops
``mm_processor_kwargs`` unread, so ``{"vision_keep_ratio": 5}`` on a text request was accepted
silently while the same value with an image gets a 400. A client that sends one body for
every request (common) would learn about its bad setting only on its first image.

How: wrap ``BaseRenderer._process_tokens`` and ``_process_tokens_async`` (where vLLM decides
whether a prompt goes through the multimodal processor): for a prompt without multimodal data
whose ``mm_processor_kwargs`` hold one of our keys, on a model served with selection, resolve
the ratios exactly as the processor would (``SelectorSettings.resolve_request_ratio`` /
``resolve_request_video_ratio``), so a bad value raises the same ``ValueError`` (a 400 from
the server, the same message). Nothing else changes: a good value is ignored, as before.

Remove when: vLLM validates ``mm_processor_kwargs`` of text-only prompts through the model's
processor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

_MARK = "__vs_vllm_text_only_ratio__"
RENDERER = ("vllm.renderers.base", "BaseRenderer")
METHODS = ("_process_tokens", "_process_tokens_async")


def check_text_only_prompt(model_config: Any, prompt: Any) -> None:
    """``ValueError`` for a bad ratio in a text-only prompt of a selecting model."""
    from vs_vllm.vllm_plugin.settings import REQUEST_KWARG, REQUEST_VIDEO_KWARG, SelectorSettings

    if not isinstance(prompt, dict) or prompt.get("multi_modal_data"):
        return  # the selecting processor checks it
    kwargs = prompt.get("mm_processor_kwargs") or {}
    if REQUEST_KWARG not in kwargs and REQUEST_VIDEO_KWARG not in kwargs:
        return
    settings = SelectorSettings.from_hf_config(getattr(model_config, "hf_config", None))
    if settings is None:
        return  # stock vLLM
    settings.resolve_request_ratio(kwargs)
    settings.resolve_request_video_ratio(kwargs)


def _wrap(method: Callable[..., Any]) -> Callable[..., Any]:
    import inspect

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def checked_async(self: Any, prompt: Any, *args: Any, **kwargs: Any) -> Any:
            check_text_only_prompt(self.model_config, prompt)
            return await method(self, prompt, *args, **kwargs)

        wrapper: Callable[..., Any] = checked_async
    else:

        @functools.wraps(method)
        def checked(self: Any, prompt: Any, *args: Any, **kwargs: Any) -> Any:
            check_text_only_prompt(self.model_config, prompt)
            return method(self, prompt, *args, **kwargs)

        wrapper = checked
    setattr(wrapper, _MARK, True)
    return wrapper


def _renderer() -> type:
    import importlib

    return getattr(importlib.import_module(RENDERER[0]), RENDERER[1])


def apply() -> None:
    renderer = _renderer()
    for name in METHODS:
        method = vars(renderer).get(name)
        if not callable(method):
            raise RuntimeError(
                f"vs-vllm patch text_only_ratio: {RENDERER[1]}.{name} not found; this vLLM "
                "version is not supported"
            )
        if not getattr(method, _MARK, False):
            setattr(renderer, name, _wrap(method))


def is_applied() -> bool:
    renderer = _renderer()
    return all(getattr(vars(renderer).get(name), _MARK, False) for name in METHODS)
