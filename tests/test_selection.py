"""The one k rule, ratio validation, the selection setting and the packed-batch sizes."""

from __future__ import annotations

import math

import pytest
import torch

from vs_vllm.batch import PackedImages
from vs_vllm.selection import SelectionConfig, num_kept_tokens, validate_keep_ratio


@pytest.mark.parametrize(
    ("n", "ratio", "k"),
    [
        (1, 1.0, 1),
        (1, 0.01, 1),
        (2, 0.5, 1),
        (3, 0.5, 1),
        (10, 0.3, 3),
        (10, 1.0, 10),
        (10, 0.05, 1),
        (64, 0.2, 12),
        (100, 0.29, 28),  # int(100 * 0.29) == int(28.999999999999996) == 28, as the reference
        (1296, 0.1, 129),
        (16384, 1e-9, 1),
    ],
)
def test_k_rule(n, ratio, k):
    assert num_kept_tokens(n, ratio) == k == max(1, int(n * ratio))


@pytest.mark.parametrize(
    "ratio", [0, 0.0, -0.1, 1.0000001, 2, math.nan, math.inf, -math.inf, True, "0.3", None, [0.3]]
)
def test_bad_ratios_raise_with_value(ratio):
    with pytest.raises(ValueError, match="vision_keep_ratio") as err:
        validate_keep_ratio(ratio)
    assert repr(ratio) in str(err.value)
    with pytest.raises(ValueError):
        num_kept_tokens(10, ratio)


def test_ratio_name_in_message():
    with pytest.raises(ValueError, match="--vision-keep-ratio must be in"):
        validate_keep_ratio(1.5, name="--vision-keep-ratio")


@pytest.mark.parametrize("n", [0, -3, 2.0, True])
def test_bad_token_count(n):
    with pytest.raises(ValueError, match="at least one visual token"):
        num_kept_tokens(n, 0.5)


def test_selection_config():
    cfg = SelectionConfig(keep_ratio=0.3, strategy="norm")
    assert cfg.enabled and cfg.keep_ratio == 0.3
    assert not SelectionConfig(keep_ratio=1).enabled
    with pytest.raises(ValueError, match=r"unknown vision selector strategy 'topk'.*learned"):
        SelectionConfig(keep_ratio=0.3, strategy="topk")
    with pytest.raises(ValueError, match="got 0"):
        SelectionConfig(keep_ratio=0)


def test_packed_images_sizes_and_tensors():
    images = PackedImages.from_ratio([4, 1, 10], 0.5)
    assert images.num_kept == (2, 1, 5)
    assert images.total_tokens == 15 and images.total_kept == 8
    assert images.cu_seqlens.tolist() == [0, 4, 5, 15]
    assert images.keep_counts.tolist() == [2, 1, 5]
    assert images.segment_ids.tolist() == [0] * 4 + [1] + [2] * 10
    assert images.kept_segment_ids.tolist() == [0, 0, 1, 2, 2, 2, 2, 2]
    per_image = PackedImages.from_ratio([10, 10], [0.1, 1.0])
    assert per_image.num_kept == (1, 10)


def test_packed_images_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="1 <= k <= N"):
        PackedImages((3,), (4,), torch.device("cpu"))
    with pytest.raises(ValueError, match="2 images but 1 keep ratios"):
        PackedImages.from_ratio([3, 4], [0.5])
    with pytest.raises(ValueError, match="at least one visual token"):
        PackedImages.from_ratio([0], 0.5)
