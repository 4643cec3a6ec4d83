"""The keep ratio and the one rule that turns it into k.

Every caller that needs to know how many visual tokens an image keeps (the vLLM processor
that writes placeholders, the model's embedding path, training, benchmarks) goes through
:func:`num_kept_tokens`, so the prompt and the encoder output always agree on k. A leaf
module: it imports nothing from vs_vllm.
"""

from __future__ import annotations

import math
from numbers import Real


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
