"""Each media item's (N, k) selection segments: derived in one place (``media_segments``),
carried with the item by the processor, read back by the model (issue 22: k and video
segments are computed once)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vs_vllm.keep_ratio import num_kept_tokens
from vs_vllm.media_segments import (
    batch_segments,
    carried_segments,
    kept_count,
    media_segments,
    packed_segments,
    run_counts,
    segments_tensor,
)
from vs_vllm.models import adapter_for

ROOT = Path(__file__).resolve().parents[1]


class _Vision:
    spatial_merge_size = 2


class _Config:
    vision_config = _Vision()


QWEN25 = adapter_for(["Qwen2_5_VLForConditionalGeneration"])
QWEN3 = adapter_for(["Qwen3VLForConditionalGeneration"])


def test_an_image_is_one_segment_of_the_rule():
    grid = (1, 14, 20)  # 14 * 20 / 4 = 70 tokens
    assert media_segments(QWEN25, _Config, "image", grid, 0.3) == ((70, num_kept_tokens(70, 0.3)),)
    assert media_segments(QWEN25, _Config, "image", grid, None) == ((70, 70),)
    assert media_segments(QWEN25, _Config, "image", (1, 2, 2), 0.01) == ((1, 1),)


def test_a_video_is_one_segment_or_one_per_frame():
    grid = (3, 8, 12)  # 3 frames of 24 tokens
    assert media_segments(QWEN25, _Config, "video", grid, 0.25) == ((72, 18),)
    per_frame = media_segments(QWEN25, _Config, "video", grid, 0.1, per_frame=True)
    assert per_frame == ((24, 2),) * 3
    assert kept_count(per_frame) == 6
    assert media_segments(QWEN25, _Config, "video", grid, None) == ((72, 72),)
    # Placeholder runs: one per video, or one per frame where frames are runs.
    assert run_counts(QWEN25, ((72, 18),)) == [18]
    assert run_counts(QWEN3, per_frame) == [2, 2, 2]


def test_the_carried_form_round_trips_in_every_batch_layout():
    a, b = ((70, 21),), ((24, 2), (24, 2), (24, 2))
    assert carried_segments(segments_tensor(a)) == a
    assert segments_tensor(b).dtype == torch.int64 and segments_tensor(b).shape == (3, 2)
    stacked = torch.stack([segments_tensor(a), segments_tensor(((9, 1),))])
    assert batch_segments(stacked, 2) == [a, ((9, 1),)]
    assert batch_segments([segments_tensor(a), segments_tensor(b)], 2) == [a, b]
    with pytest.raises(RuntimeError, match="no kept counts"):
        batch_segments(None, 1)
    with pytest.raises(RuntimeError, match="1 items for 2 items"):
        batch_segments([segments_tensor(a)], 2)
    images = packed_segments([a, b])
    assert images.num_tokens == (70, 24, 24, 24) and images.num_kept == (21, 2, 2, 2)


# Who may apply the rule (num_kept_tokens / video_segments) directly: the rule's module, the
# one place that derives segments, the library's PackedImages.from_ratio, the engine budgets
# (a largest k, not an item's), and the benchmarks' reports.
RULE = re.compile(r"\b(num_kept_tokens|video_segments|video_kept_tokens|frame_keep_counts)\(")
ALLOWED = {
    "vs_vllm/keep_ratio.py",
    "vs_vllm/media_segments.py",
    "vs_vllm/batch.py",
    "vs_vllm/vllm_plugin/processor.py",  # get_mm_max_tokens_per_item: the budgets
}


def test_nothing_else_derives_k():
    offenders = []
    for path in sorted((ROOT / "vs_vllm").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in ALLOWED or "/testing/" in rel:
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if RULE.search(code) and not code.lstrip().startswith(("def ", "*", "``")):
                offenders.append(f"{rel}:{no}: {line.strip()}")
    assert not offenders, "k derived outside media_segments:\n" + "\n".join(offenders)
    processor = (ROOT / "vs_vllm/vllm_plugin/processor.py").read_text()
    budgets = processor[processor.index("def get_mm_max_tokens_per_item") :]
    assert len(RULE.findall(processor)) == len(RULE.findall(budgets[: budgets.index("class ")]))
