"""``batch.pack_rows``: the tower's per-item outputs back to one packed (sum N_i, W) tensor
without a copy when they are consecutive blocks of one buffer (issue 21: ``_select_images``
re-packed the tower output with ``torch.cat``)."""

from __future__ import annotations

import torch

from vs_vllm.batch import pack_rows


def test_consecutive_splits_of_one_buffer_are_a_view():
    packed = torch.randn(17, 6)
    parts = packed.split([5, 1, 11])  # how vLLM's models split the tower's output per item
    out = pack_rows(parts)
    assert out.data_ptr() == packed.data_ptr() and out.shape == packed.shape
    assert torch.equal(out, packed)
    wide = torch.randn(9, 10)[:, :6]  # the scored prefix of wider rows: a strided view
    out = pack_rows(wide.split([4, 5]))
    assert out.data_ptr() == wide.data_ptr() and torch.equal(out, wide)


def test_anything_else_is_concatenated():
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    out = pack_rows([a, b])
    assert torch.equal(out, torch.cat([a, b])) and out.data_ptr() != a.data_ptr()
    packed = torch.randn(8, 4)
    swapped = pack_rows([packed[4:], packed[:4]])  # blocks out of order
    assert torch.equal(swapped, torch.cat([packed[4:], packed[:4]]))
    gap = pack_rows([packed[:3], packed[4:]])  # a row between them
    assert gap.shape == (7, 4) and torch.equal(gap, torch.cat([packed[:3], packed[4:]]))
    assert pack_rows([a]) is a
