"""The selection setting: keep-ratio validation, the one k function, the strategy name.

Every caller that needs to know how many visual tokens an image keeps (the vLLM processor
that writes placeholders, the model's embedding path, training, benchmarks) goes through
:func:`num_kept_tokens`, so the prompt and the encoder output always agree on k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

DEFAULT_STRATEGY = "learned"


def validate_keep_ratio(keep_ratio: object, *, name: str = "vision_keep_ratio") -> float:
    """Return ``keep_ratio`` as a float if it is a real number in (0, 1]; raise ``ValueError``.

    Booleans and strings are refused even though Python would coerce them: a request that
    sends ``"0.3"`` or ``true`` is almost certainly a client bug.
    """
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, Real):
        raise ValueError(f"{name} must be a number in (0, 1], got {keep_ratio!r}")
    value = float(keep_ratio)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {keep_ratio!r}")
    return value


def num_kept_tokens(num_tokens: int, keep_ratio: float) -> int:
    """k = max(1, int(N * keep_ratio)), exactly the reference's rule.

    ``num_tokens`` must be a positive int; ``keep_ratio`` must be in (0, 1].
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"an image must have at least one visual token, got N={num_tokens!r}")
    ratio = validate_keep_ratio(keep_ratio)
    return max(1, int(num_tokens * ratio))


@dataclass(frozen=True)
class SelectionConfig:
    """What the user asked for: how much to keep, how to choose, and where the scorer lives."""

    keep_ratio: float = 1.0
    strategy: str = DEFAULT_STRATEGY
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_ratio", validate_keep_ratio(self.keep_ratio))
        # Imported here: the registry imports the strategies, which import this module.
        from vs_vllm.strategies import available_strategies

        if self.strategy not in available_strategies():
            raise ValueError(
                f"unknown vision selector strategy {self.strategy!r}; "
                f"choose one of {', '.join(available_strategies())}"
            )

    @property
    def enabled(self) -> bool:
        """Selection changes nothing at ratio 1.0: every token is kept, in order."""
        return self.keep_ratio < 1.0
