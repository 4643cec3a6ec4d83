"""The selection settings of a served model, as vLLM carries them.

Server-wide settings live in the model's HF config under ``vision_selector`` (set with
``--hf-overrides``, ``LLM(..., hf_overrides=...)`` or the ``--vision-*`` flags, which translate
to it), so every vLLM process (API server, engine cores, workers) reads the same values from
the same place. A request may override the keep ratio with
``mm_processor_kwargs={"vision_keep_ratio": r}``; the processor resolves the ratio of every
image and hands it to the model as a per-image field, so the prompt and the encoder output
always agree on k, and the ratio is part of the multimodal cache key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from vs_vllm.selection import DEFAULT_STRATEGY, SelectionConfig, validate_keep_ratio

HF_CONFIG_KEY = "vision_selector"
REQUEST_KWARG = "vision_keep_ratio"


@dataclass(frozen=True)
class SelectorSettings:
    """``hf_config.vision_selector``: the server's selection settings.

    keep_ratio:     default ratio for requests that do not set their own.
    strategy:       learned | uniform | random | norm | diversity.
    checkpoint:     scorer file or directory for ``learned``; None means the scorer weights are
                    read from the model checkpoint itself (merged VisionSelector layout).
    request_ratios: whether requests may ask for a larger ratio than ``keep_ratio``; if so the
                    engine's budgets are sized for every image's full token count.
    """

    keep_ratio: float = 1.0
    strategy: str = DEFAULT_STRATEGY
    checkpoint: str | None = None
    request_ratios: bool = False

    def __post_init__(self) -> None:
        SelectionConfig(self.keep_ratio, self.strategy, self.checkpoint)  # validates

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> SelectorSettings:
        unknown = set(raw) - {"keep_ratio", "strategy", "checkpoint", "request_ratios"}
        if unknown:
            raise ValueError(
                f"unknown {HF_CONFIG_KEY} setting(s) {sorted(unknown)}; expected keep_ratio, "
                "strategy, checkpoint, request_ratios"
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

    def resolve_request_ratio(self, mm_kwargs: Mapping[str, object]) -> float:
        """The ratio for one request: its own ``vision_keep_ratio`` if given, else the default.

        Raises ``ValueError`` naming the field for a bad value, or for a ratio above what the
        engine was sized for.
        """
        if REQUEST_KWARG not in mm_kwargs:
            return self.keep_ratio
        ratio = validate_keep_ratio(
            mm_kwargs[REQUEST_KWARG], name=f"mm_processor_kwargs.{REQUEST_KWARG}"
        )
        if ratio > self.budget_ratio:
            raise ValueError(
                f"mm_processor_kwargs.{REQUEST_KWARG}={ratio} is larger than this server's "
                f"vision keep ratio {self.keep_ratio}; start the server with "
                "--trust-request-mm-kwargs (or vision_selector.request_ratios=true) to allow it"
            )
        return ratio
