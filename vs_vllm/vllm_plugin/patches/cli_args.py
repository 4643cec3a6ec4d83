"""``vllm serve MODEL --vision-keep-ratio R --vision-selector PATH --vision-selector-strategy S``.

Why: vLLM has no extension point for new ``serve`` flags. It does load general plugins before
it builds the engine-argument parser (``AsyncEngineArgs.add_cli_args`` calls
``load_general_plugins()`` and then ``EngineArgs.add_cli_args``).

How: wrap ``EngineArgs.add_cli_args`` to add a "VisionSelector" argument group, and
``EngineArgs.from_cli_args`` to translate the flags into ``hf_overrides["vision_selector"]`` (the
supported way to configure the model, which Python users also use directly) after checking
them against the model, so a bad setting stops the start with one ``vs-vllm: error:`` line
instead of a stack trace from the engine process. The flags take their values as text and are
checked there too (not by argparse, whose errors print the whole usage): a bad value exits 2,
a setting the model or the deployment cannot serve (EVS with selection, a missing or
mismatched scorer, an unsupported model) exits 1. ``--trust-request-mm-kwargs`` turns on
per-request ratios.

Remove when: vLLM offers plugin-defined CLI arguments.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from vs_vllm.selection import validate_keep_ratio
from vs_vllm.strategies import available_strategies
from vs_vllm.vllm_plugin.settings import (
    HF_CONFIG_KEY,
    MODEL_CHECKED,
    VIDEO_SELECTION_MODES,
    SelectorSettings,
)

_MARK = "__vs_vllm_cli_args__"
FLAGS = (
    "vision_keep_ratio",
    "vision_selector",
    "vision_selector_strategy",
    "video_keep_ratio",
    "video_selection",
)


class FlagError(ValueError):
    """A ``--vision-*`` / ``--video-*`` flag with a value it cannot take."""


def _ratio(flag: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise FlagError(f"{flag} must be a number in (0, 1], got {text!r}") from None
    try:
        return validate_keep_ratio(value, name=flag)
    except ValueError as err:
        raise FlagError(str(err)) from None


def _choice(flag: str, text: str | None, choices: tuple[str, ...]) -> str | None:
    if text is not None and text not in choices:
        raise FlagError(f"{flag} must be one of {', '.join(choices)}, got {text!r}")
    return text


def add_vision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "VisionSelector",
        "Keep only the top-k visual tokens of each image (vs-vllm plugin).",
    )
    group.add_argument(
        "--vision-keep-ratio",
        default=None,
        metavar="R",
        help="Fraction of each image's visual tokens to keep, in (0, 1]: "
        "k = max(1, int(N * ratio)). With --trust-request-mm-kwargs a request may set its own "
        'with "mm_processor_kwargs": {"vision_keep_ratio": r}.',
    )
    group.add_argument(
        "--vision-selector",
        default=None,
        metavar="PATH",
        help="Scorer checkpoint for the learned strategy (a .safetensors file or a directory). "
        "Not needed for a merged VisionSelector model checkpoint.",
    )
    group.add_argument(
        "--vision-selector-strategy",
        default=None,
        metavar="{" + ",".join(available_strategies()) + "}",
        help="How to choose the kept tokens (default: learned).",
    )
    group.add_argument(
        "--video-keep-ratio",
        default=None,
        metavar="R",
        help="Fraction of each video's visual tokens to keep, in (0, 1] (default: videos are "
        'not selected). Per request: "mm_processor_kwargs": {"video_keep_ratio": r}.',
    )
    group.add_argument(
        "--video-selection",
        default=None,
        metavar="{" + ",".join(VIDEO_SELECTION_MODES) + "}",
        help="per-video (default): one top-k of k = max(1, int(N * ratio)) over all the "
        "video's tokens; per-frame: k_f = max(1, int(N_f * ratio)) in every frame.",
    )


def settings_from_args(args: argparse.Namespace) -> SelectorSettings | None:
    """The selection settings the flags ask for, or None when no flag is given. ``FlagError``
    (one line naming the flag) for a value a flag cannot take."""
    if all(getattr(args, flag, None) is None for flag in FLAGS):
        return None
    raw: dict[str, Any] = {
        "request_ratios": bool(getattr(args, "trust_request_mm_kwargs", False)),
        "keep_ratio": _ratio("--vision-keep-ratio", args.vision_keep_ratio),
        "checkpoint": args.vision_selector,
        "strategy": _choice(
            "--vision-selector-strategy", args.vision_selector_strategy, available_strategies()
        ),
        "video_keep_ratio": _ratio("--video-keep-ratio", getattr(args, "video_keep_ratio", None)),
        "video_selection": _choice(
            "--video-selection", getattr(args, "video_selection", None), VIDEO_SELECTION_MODES
        ),
    }
    return SelectorSettings.from_mapping({k: v for k, v in raw.items() if v is not None})


def merge_hf_overrides(overrides: Any, settings: SelectorSettings) -> Any:
    """``hf_overrides`` (None, a dict, a JSON string or a callable) with our settings added."""
    value = settings.to_dict()
    if callable(overrides):
        user = overrides

        def with_selector(config: Any) -> Any:
            config = user(config)
            setattr(config, HF_CONFIG_KEY, value)
            return config

        return with_selector
    if isinstance(overrides, str):
        overrides = json.loads(overrides)
    merged = dict(overrides or {})
    merged[HF_CONFIG_KEY] = {**dict(merged.get(HF_CONFIG_KEY) or {}), **value}
    return merged


# Where ``vllm serve`` builds its parser: vLLM 0.32 and 0.33 moved it.
SERVE_PARSER_MODULES = (
    "vllm.entrypoints.launchers.cli_args",  # 0.32
    "vllm.entrypoints.common.cli_args",  # 0.33
)


def serve_parser(parser: Any) -> Any:
    """``vllm serve``'s own argument parser (``make_arg_parser``) in this vLLM."""
    import importlib

    for name in SERVE_PARSER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        make = getattr(module, "make_arg_parser", None)
        if make is not None:
            return make(parser)
    raise RuntimeError(
        f"vs-vllm: vLLM's serve parser (make_arg_parser) not found in {SERVE_PARSER_MODULES}"
    )


def fail(message: str, code: int = 1) -> NoReturn:
    """Stop ``vllm serve`` before any engine process starts, with one line."""
    print(f"vs-vllm: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _check_early(engine_args: Any, settings: SelectorSettings) -> bool:
    """Check the settings against the deployment and the model's config before any engine
    process starts. True when the model was checked (its config was readable here); False
    for a model whose config is not local yet (a hub id), which ``engine_config`` checks once
    vLLM has it."""
    from vs_vllm.vllm_plugin.patches.pruning_path import PruningPathError, check_vllm_version
    from vs_vllm.vllm_plugin.validation import check_evs, check_model, warn_if_keeps_everything

    try:
        check_vllm_version()
    except PruningPathError as err:
        raise SystemExit(str(err)) from None
    try:
        check_evs(getattr(engine_args, "video_pruning_rate", None))
    except ValueError as err:
        fail(str(err))
    warn_if_keeps_everything(settings)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            engine_args.model,
            revision=engine_args.revision,
            trust_remote_code=engine_args.trust_remote_code,
        )
    except Exception:
        return False
    try:
        check_model(engine_args.model, settings, config)
    except ValueError as err:
        fail(str(err))
    return True


def _wrap_add_cli_args(add_cli_args: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(add_cli_args)
    def add_cli_args_with_vision(parser: Any, *args: Any, **kwargs: Any) -> Any:
        parser = add_cli_args(parser, *args, **kwargs)
        if not any(a.dest == "vision_keep_ratio" for a in parser._actions):
            add_vision_args(parser)
        return parser

    setattr(add_cli_args_with_vision, _MARK, True)
    return staticmethod(add_cli_args_with_vision)


def _wrap_from_cli_args(from_cli_args: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(from_cli_args)
    def from_cli_args_with_vision(cls: Any, args: argparse.Namespace) -> Any:
        try:
            settings = settings_from_args(args)
        except FlagError as err:
            fail(str(err), code=2)
        except ValueError as err:  # a combination the settings refuse
            fail(str(err))
        engine_args = from_cli_args(cls, args)
        if settings is not None:
            if _check_early(engine_args, settings):
                # Checked once on this path: engine_config does not read the model again.
                setattr(engine_args, MODEL_CHECKED, True)
            engine_args.hf_overrides = merge_hf_overrides(engine_args.hf_overrides, settings)
        return engine_args

    setattr(from_cli_args_with_vision, _MARK, True)
    return classmethod(from_cli_args_with_vision)


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    add = vars(EngineArgs).get("add_cli_args")
    from_args = vars(EngineArgs).get("from_cli_args")
    if not isinstance(add, staticmethod) or not isinstance(from_args, classmethod):
        raise RuntimeError(
            "vs-vllm patch cli_args: EngineArgs.add_cli_args (staticmethod) / from_cli_args "
            "(classmethod) not found; this vLLM version is not supported"
        )
    if not getattr(add.__func__, _MARK, False):
        EngineArgs.add_cli_args = _wrap_add_cli_args(add.__func__)
    if not getattr(from_args.__func__, _MARK, False):
        EngineArgs.from_cli_args = _wrap_from_cli_args(from_args.__func__)


def is_applied() -> bool:
    from vllm.engine.arg_utils import EngineArgs

    return bool(
        getattr(vars(EngineArgs)["add_cli_args"].__func__, _MARK, False)
        and getattr(vars(EngineArgs)["from_cli_args"].__func__, _MARK, False)
    )
