"""The selection settings of a served model, as vLLM carries them.

Server-wide settings live in the model's HF config under ``vision_selector`` (set with
``--hf-overrides``, ``LLM(..., hf_overrides=...)`` or the ``--vision-*`` flags, which translate
to it), so every vLLM process (API server, engine cores, workers) reads the same values from
the same place. A request may override the keep ratio with
``mm_processor_kwargs={"vision_keep_ratio": r}``; the processor resolves the ratio of every
image and hands it to the model as a per-image field, so the prompt and the encoder output
always agree on k, and the ratio is part of the multimodal cache key. Videos are selected only
when ``video_keep_ratio`` is set (``--video-keep-ratio``); a request may then set its own with
``mm_processor_kwargs={"video_keep_ratio": r}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from vs_vllm.selection import DEFAULT_STRATEGY, SelectionConfig, validate_keep_ratio

HF_CONFIG_KEY = "vision_selector"
REQUEST_KWARG = "vision_keep_ratio"
REQUEST_VIDEO_KWARG = "video_keep_ratio"
VIDEO_SELECTION_MODES = ("per-video", "per-frame")
#: Set on ``EngineArgs`` by the serve flags' check (``patches.cli_args``) once it has checked
#: the model: ``patches.engine_config`` then skips that check (validation once per path).
MODEL_CHECKED = "_vs_vllm_model_checked"

_FIELDS = ("keep_ratio", "strategy", "checkpoint", "request_ratios", "video_keep_ratio")


@dataclass(frozen=True)
class SelectorSettings:
    """``hf_config.vision_selector``: the server's selection settings.

    keep_ratio:     default ratio for requests that do not set their own.
    strategy:       learned | uniform | random | norm | diversity.
    checkpoint:     scorer file or directory for ``learned``; None means the scorer weights are
                    read from the model checkpoint itself (merged VisionSelector layout).
    request_ratios: whether requests may ask for a larger ratio than ``keep_ratio``; if so the
                    engine's budgets are sized for every image's full token count.
    video_keep_ratio: ratio for videos; None (default) leaves videos untouched.
    video_selection: ``per-video`` (one top-k over all the video's tokens, the reference's
                    form) or ``per-frame`` (k_f = max(1, int(N_f * r)) in every frame).
    """

    keep_ratio: float = 1.0
    strategy: str = DEFAULT_STRATEGY
    checkpoint: str | None = None
    request_ratios: bool = False
    video_keep_ratio: float | None = None
    video_selection: str = "per-video"

    def __post_init__(self) -> None:
        SelectionConfig(self.keep_ratio, self.strategy, self.checkpoint)  # validates
        if self.video_keep_ratio is not None:
            ratio = validate_keep_ratio(self.video_keep_ratio, name="video_keep_ratio")
            object.__setattr__(self, "video_keep_ratio", ratio)
        if self.video_selection not in VIDEO_SELECTION_MODES:
            raise ValueError(
                f"video_selection must be one of {', '.join(VIDEO_SELECTION_MODES)}, "
                f"got {self.video_selection!r}"
            )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> SelectorSettings:
        unknown = set(raw) - {*_FIELDS, "video_selection"}
        if unknown:
            raise ValueError(
                f"unknown {HF_CONFIG_KEY} setting(s) {sorted(unknown)}; expected "
                f"{', '.join((*_FIELDS, 'video_selection'))}"
            )
        return cls(**raw)

    @classmethod
    def from_hf_config(cls, hf_config: object) -> SelectorSettings | None:
        """The settings of a model, or None when selection is not configured (stock vLLM)."""
        raw = getattr(hf_config, HF_CONFIG_KEY, None)
        if raw is None:
            return None
        if isinstance(raw, SelectorSettings):
            return raw
        if not isinstance(raw, Mapping):
            raise ValueError(f"{HF_CONFIG_KEY} must be a mapping, got {raw!r}")
        return cls.from_mapping(raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def budget_ratio(self) -> float:
        """The largest ratio an image may be processed at: what budgets are sized for."""
        return 1.0 if self.request_ratios else self.keep_ratio

    @property
    def selects_videos(self) -> bool:
        return self.video_keep_ratio is not None

    @property
    def video_budget_ratio(self) -> float:
        """The largest ratio a video may be processed at (1.0 when videos are untouched)."""
        if self.video_keep_ratio is None or self.request_ratios:
            return 1.0
        return self.video_keep_ratio

    def resolve_request_ratio(self, mm_kwargs: Mapping[str, object]) -> float:
        """The ratio for one request: its own ``vision_keep_ratio`` if given, else the default.

        Raises ``ValueError`` naming the field for a bad value, or for a ratio above what the
        engine was sized for.
        """
        if REQUEST_KWARG not in mm_kwargs:
            return self.keep_ratio
        return self._request_ratio(mm_kwargs, REQUEST_KWARG, self.budget_ratio, self.keep_ratio)

    def resolve_request_video_ratio(self, mm_kwargs: Mapping[str, object]) -> float | None:
        """The video ratio for one request, or None when videos are not selected (a request
        that sets ``video_keep_ratio`` then gets a ``ValueError`` naming the server flag)."""
        if self.video_keep_ratio is None:
            if REQUEST_VIDEO_KWARG in mm_kwargs:
                raise ValueError(
                    f"mm_processor_kwargs.{REQUEST_VIDEO_KWARG}: this server does not select "
                    "video tokens; start it with --video-keep-ratio"
                )
            return None
        if REQUEST_VIDEO_KWARG not in mm_kwargs:
            return self.video_keep_ratio
        return self._request_ratio(
            mm_kwargs, REQUEST_VIDEO_KWARG, self.video_budget_ratio, self.video_keep_ratio
        )

    def _request_ratio(
        self, mm_kwargs: Mapping[str, object], key: str, budget: float, default: float
    ) -> float:
        ratio = validate_keep_ratio(mm_kwargs[key], name=f"mm_processor_kwargs.{key}")
        if ratio > budget:
            raise ValueError(
                f"mm_processor_kwargs.{key}={ratio} is larger than this server's ratio "
                f"{default}; start the server with --trust-request-mm-kwargs (or "
                "vision_selector.request_ratios=true) to allow it"
            )
        return ratio
