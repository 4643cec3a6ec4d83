"""M-RoPE positions of kept visual tokens, carried beside their embeddings.

vLLM's pruning interface lets a model return, with each kept embedding, extra channels that
describe its position; the runner hands them back to ``recompute_mrope_positions`` after the
encoder runs. Per kept token we carry ``[t, h, w, c]``: its (t, h, w) position inside its image
in the unpruned grid, and ``c`` = the unpruned image's largest offset + 1, so the text after the
image continues exactly where it would without pruning (the reference semantics).

The channels travel inside the embedding tensor, in its dtype. bfloat16 holds integers exactly
only up to 256, and a merged grid can be wider than that, so each value is split into a high
and a low byte: 8 channels, exact in every float dtype for values below 65536.
"""

from __future__ import annotations

import torch

from vs_vllm.positions import media_extent

NUM_CHANNELS = 8
_BASE = 256


def check_grid(grid_thw: tuple[int, int, int], merge_size: int) -> None:
    """Refuse a media whose positions could not be carried exactly (host ints only)."""
    extent = media_extent(grid_thw, merge_size)
    if extent >= _BASE * _BASE:
        raise ValueError(f"media grid {grid_thw} is too large: position extent {extent}")


def encode_positions(positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(k, 4) int64 -> (k, 8) in ``dtype``: [hi, lo] per value, each in [0, 256).

    Values must be below 65536; :func:`check_grid` checks that on the host."""
    hi = torch.div(positions, _BASE, rounding_mode="floor")
    lo = positions - hi * _BASE
    return torch.stack([hi, lo], dim=2).reshape(positions.shape[0], NUM_CHANNELS).to(dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """(k, 8) float channels -> (k, 4) int64 positions."""
    pairs = channels.to(torch.float32).round().to(torch.int64).reshape(-1, 4, 2)
    return pairs[:, :, 0] * _BASE + pairs[:, :, 1]
