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


def frame_keep_counts(
    num_frames: int, tokens_per_frame: int, keep_ratio: float, *, per_frame: bool
) -> tuple[int, ...] | None:
    """Per-frame keep counts of a video, or None for one top-k over the whole video.

    ``per_frame``: k_f = max(1, int(N_f * r)) in each of the ``num_frames`` frames (every
    moment of a long video keeps some tokens). Otherwise None: the video keeps
    :func:`video_kept_tokens` tokens chosen anywhere in it (the reference's form)."""
    if num_frames < 1:
        raise ValueError(f"a video must have at least one frame, got {num_frames}")
    if not per_frame:
        return None
    return (num_kept_tokens(tokens_per_frame, keep_ratio),) * num_frames


def video_kept_tokens(
    num_frames: int, tokens_per_frame: int, keep_ratio: float, *, per_frame: bool
) -> int:
    """k of a video of ``num_frames`` frames (temporal grid steps) of ``tokens_per_frame``
    tokens: max(1, int(N * r)) over all N = frames * N_f tokens, or the sum of the per-frame
    counts with ``per_frame``."""
    counts = frame_keep_counts(num_frames, tokens_per_frame, keep_ratio, per_frame=per_frame)
    if counts is not None:
        return sum(counts)
    return num_kept_tokens(num_frames * tokens_per_frame, keep_ratio)


def video_segments(
    num_frames: int, tokens_per_frame: int, keep_ratio: float, *, per_frame: bool
) -> list[tuple[int, int]]:
    """(N, k) of each selection segment of one video: the whole video (one top-k), or each
    frame with ``per_frame``. The k's sum to :func:`video_kept_tokens`."""
    counts = frame_keep_counts(num_frames, tokens_per_frame, keep_ratio, per_frame=per_frame)
    if counts is None:
        n = num_frames * tokens_per_frame
        return [(n, num_kept_tokens(n, keep_ratio))]
    return [(tokens_per_frame, k) for k in counts]
