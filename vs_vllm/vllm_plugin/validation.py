"""Checks of the server's selection settings against the model, run before the engine starts
(so a bad setting stops ``vllm serve`` with one clear line) and again where the model loads."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from vs_vllm.checkpoint import CheckpointError, load_scorer_state
from vs_vllm.models import ModelAdapter, adapter_for
from vs_vllm.strategies import strategy_class
from vs_vllm.vllm_plugin.settings import SelectorSettings

logger = logging.getLogger("vllm.vs_vllm.validation")  # under "vllm." for vLLM's log config

EVS_ERROR = (
    "--video-pruning-rate (vLLM's EVS) and vision token selection cannot be combined: use "
    "--video-keep-ratio to select video tokens with the scorer, or drop the --vision-* flags "
    "to use EVS alone"
)


def check_evs(video_pruning_rate: float | None) -> None:
    """vLLM's EVS prunes video tokens on its own path; selection replaces it. ``ValueError``
    when both are asked for (checked before the engine starts, and where the model loads)."""
    if video_pruning_rate:
        raise ValueError(EVS_ERROR)


@functools.cache
def warn_if_keeps_everything(settings: SelectorSettings) -> bool:
    """One warning line (once per process) when selection is configured but keeps every
    token: a scorer or strategy without a keep ratio below 1.0 and no video ratio. Returns
    whether it warned."""
    if settings.keep_ratio < 1.0 or settings.selects_videos:
        return False
    logger.warning(
        "vs-vllm: keep ratio 1.0 selects nothing: every image token is kept; add "
        "--vision-keep-ratio R (or keep_ratio in hf_overrides['vision_selector']) to select"
    )
    return True


def check_architecture(architectures: list[str] | None, model: str) -> ModelAdapter:
    """The model's adapter; ``ValueError`` (one line naming the supported ones) if none."""
    return adapter_for(list(architectures or ()), model)


def check_video_selection(settings: SelectorSettings, adapter: ModelAdapter) -> None:
    """A family whose frames are separate placeholder runs (timestamp text between them) can
    only select per frame: its prompt needs every frame's k before the vision tower runs."""
    if (
        settings.selects_videos
        and adapter.video_layout == "frame_runs"
        and settings.video_selection != "per-frame"
    ):
        raise ValueError(
            f"{adapter.family} models select video tokens per frame only (each frame is its "
            "own placeholder run after its timestamp text, so the prompt needs every frame's "
            "k before the vision tower runs): add --video-selection per-frame"
        )


def check_scorer(settings: SelectorSettings, model: str, hidden_size: int) -> None:
    """The learned strategy needs a scorer of the model's hidden size, from ``--vision-selector``
    or from the model checkpoint itself. Raises ``ValueError`` with the reason."""
    if not strategy_class(settings.strategy).needs_checkpoint:
        return
    if settings.checkpoint is not None:
        try:
            load_scorer_state(settings.checkpoint, hidden_size)
        except CheckpointError as err:
            raise ValueError(f"--vision-selector: {err}") from None
        return
    if not Path(model).is_dir():
        return  # a hub id: the engine checks once the weights are downloaded
    try:
        load_scorer_state(model, hidden_size)
    except CheckpointError as err:
        raise ValueError(
            f"the 'learned' strategy needs scorer weights: pass --vision-selector PATH, pick a "
            f"training-free --vision-selector-strategy, or serve a merged VisionSelector "
            f"checkpoint ({err})"
        ) from None


def check_model(model: str, settings: SelectorSettings, hf_config: object) -> None:
    """All checks for a model whose HF config is ``hf_config``."""
    adapter = check_architecture(getattr(hf_config, "architectures", None), model)
    check_video_selection(settings, adapter)
    if getattr(hf_config, "vision_config", None) is not None:
        check_scorer(settings, model, adapter.score_width(hf_config))
