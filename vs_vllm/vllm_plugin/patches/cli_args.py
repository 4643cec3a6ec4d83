"""``vllm serve MODEL --vision-keep-ratio R --vision-selector PATH --vision-selector-strategy S``.

Why: vLLM has no extension point for new ``serve`` flags. It does load general plugins before
it builds the engine-argument parser (``AsyncEngineArgs.add_cli_args`` calls
``load_general_plugins()`` and then ``EngineArgs.add_cli_args``).

How: wrap ``EngineArgs.add_cli_args`` to add a "VisionSelector" argument group, and
``EngineArgs.from_cli_args`` to translate the flags into ``hf_overrides["vision_selector"]`` (the
supported way to configure the model, which Python users also use directly) after checking
them against the model, so a bad setting stops the start with one line instead of a stack
trace from the engine process. ``--trust-request-mm-kwargs`` turns on per-request ratios.

Remove when: vLLM offers plugin-defined CLI arguments.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from typing import Any

from vs_vllm.selection import validate_keep_ratio
from vs_vllm.strategies import available_strategies
from vs_vllm.vllm_plugin.settings import HF_CONFIG_KEY, VIDEO_SELECTION_MODES, SelectorSettings

_MARK = "__vs_vllm_cli_args__"
FLAGS = (
    "vision_keep_ratio",
    "vision_selector",
    "vision_selector_strategy",
    "video_keep_ratio",
    "video_selection",
)


def _ratio(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return validate_keep_ratio(float(text), name=flag)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = flag.lstrip("-").replace("-", "_")  # argparse names the type in errors
    return parse


def add_vision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "VisionSelector",
        "Keep only the top-k visual tokens of each image (vs-vllm plugin).",
    )
    group.add_argument(
        "--vision-keep-ratio",
        type=_ratio("--vision-keep-ratio"),
        default=None,
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
        choices=available_strategies(),
        default=None,
        help="How to choose the kept tokens (default: learned).",
    )
    group.add_argument(
        "--video-keep-ratio",
        type=_ratio("--video-keep-ratio"),
        default=None,
        help="Fraction of each video's visual tokens to keep, in (0, 1] (default: videos are "
        'not selected). Per request: "mm_processor_kwargs": {"video_keep_ratio": r}.',
    )
    group.add_argument(
        "--video-selection",
        choices=VIDEO_SELECTION_MODES,
        default=None,
        help="per-video (default): one top-k of k = max(1, int(N * ratio)) over all the "
        "video's tokens; per-frame: k_f = max(1, int(N_f * ratio)) in every frame.",
    )


def settings_from_args(args: argparse.Namespace) -> SelectorSettings | None:
    """The selection settings the flags ask for, or None when no flag is given."""
    if all(getattr(args, flag, None) is None for flag in FLAGS):
        return None
    raw: dict[str, Any] = {"request_ratios": bool(getattr(args, "trust_request_mm_kwargs", False))}
    if args.vision_keep_ratio is not None:
        raw["keep_ratio"] = args.vision_keep_ratio
    if args.vision_selector is not None:
        raw["checkpoint"] = args.vision_selector
    if args.vision_selector_strategy is not None:
        raw["strategy"] = args.vision_selector_strategy
    if getattr(args, "video_keep_ratio", None) is not None:
        raw["video_keep_ratio"] = args.video_keep_ratio
    if getattr(args, "video_selection", None) is not None:
        raw["video_selection"] = args.video_selection
    return SelectorSettings.from_mapping(raw)


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


def _check_early(engine_args: Any, settings: SelectorSettings) -> None:
    """Check the settings against the model's config before any engine process starts."""
    from vs_vllm.vllm_plugin.patches.pruning_path import PruningPathError, check_vllm_version
    from vs_vllm.vllm_plugin.validation import check_model

    try:
        check_vllm_version()
    except PruningPathError as err:
        raise SystemExit(str(err)) from None

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            engine_args.model,
            revision=engine_args.revision,
            trust_remote_code=engine_args.trust_remote_code,
        )
    except Exception:
        return
    try:
        check_model(engine_args.model, settings, config)
    except ValueError as err:
        raise SystemExit(f"vs-vllm: error: {err}") from None


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
        engine_args = from_cli_args(cls, args)
        settings = settings_from_args(args)
        if settings is not None:
            _check_early(engine_args, settings)
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
