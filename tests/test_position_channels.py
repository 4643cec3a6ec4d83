"""Position channels carried beside kept embeddings survive every float dtype exactly."""

from __future__ import annotations

import pytest
import torch

from vs_vllm.position_channels import (
    NUM_CHANNELS,
    check_grid,
    decode_positions,
    encode_positions,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_round_trip_is_exact_up_to_65535(dtype):
    values = torch.tensor([0, 1, 255, 256, 257, 1000, 4097, 16383, 65535])
    positions = torch.stack([values, values.flip(0), values % 7, values // 3], dim=1)
    channels = encode_positions(positions, dtype)
    assert channels.shape == (len(values), NUM_CHANNELS) and channels.dtype == dtype
    assert torch.equal(decode_positions(channels), positions)


def test_bfloat16_would_lose_plain_integers_above_256():
    # Why the channels are split: bf16 cannot hold 257 (stock EVS carries positions plainly).
    assert torch.tensor(257.0).to(torch.bfloat16).item() != 257


def test_check_grid():
    check_grid((1, 2 * 1000, 2 * 8), 2)  # extent 1000: fine
    with pytest.raises(ValueError, match="too large"):
        check_grid((1, 2 * 70000, 2), 2)
