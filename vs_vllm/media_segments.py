"""Each media item's selection segments ``(N, k)``: where k is derived, once.

An image is one segment. A video is one segment (one top-k over all its tokens, the
reference's form) or, with per-frame selection, one segment per frame
(:func:`vs_vllm.keep_ratio.video_segments`); a video that is not selected is one segment that
keeps all its tokens. k always comes from :func:`vs_vllm.keep_ratio.num_kept_tokens`.

Serving: the vLLM processor calls :func:`media_segments` once per item, where it writes the
prompt's placeholders, and carries the result with the item (the per-item fields
:data:`IMAGE_SEGMENTS` / :data:`VIDEO_SEGMENTS`, an ``(S, 2)`` int64 CPU tensor of ``[N, k]``
rows). The model (selection, the encoder CUDA-graph path) and its M-RoPE positions read them
back with :func:`carried_segments`, so the prompt, the encoder output and the positions
cannot disagree on k. The HF reference path and training have no processor: they call
:func:`media_segments` with the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.keep_ratio import num_kept_tokens, video_segments
from vs_vllm.models.adapter import ModelAdapter

#: The per-item fields the processor adds (the model reads them back).
IMAGE_SEGMENTS = "vision_kept_segments"
VIDEO_SEGMENTS = "video_kept_segments"

Segments = tuple[tuple[int, int], ...]


def media_segments(
    adapter: ModelAdapter,
    hf_config: Any,
    modality: Literal["image", "video"],
    grid_thw: Sequence[int],
    ratio: float | None,
    *,
    per_frame: bool = False,
) -> Segments:
    """``(N, k)`` of each selection segment of one image or video of patch grid (T, H, W) at
    keep ``ratio`` (None: every token kept, one segment). ``per_frame``: a video selects in
    each frame (k_f = max(1, int(N_f * r))) instead of once over the whole video."""
    merge = adapter.merge_size(hf_config)
    grid = tuple(int(v) for v in grid_thw)
    n = adapter.tokens_per_item(grid, merge)
    if ratio is None:
        return ((n, n),)
    if modality == "image":
        return ((n, num_kept_tokens(n, ratio)),)
    per_frame_tokens = adapter.tokens_per_item((1, *grid[1:]), merge)
    return tuple(video_segments(grid[0], per_frame_tokens, ratio, per_frame=per_frame))


def segments_tensor(segments: Segments) -> torch.Tensor:
    """The carried form: ``(S, 2)`` int64 ``[N, k]`` rows, on the CPU."""
    return torch.tensor(segments, dtype=torch.int64).reshape(-1, 2)


def carried_segments(value: Any) -> Segments:
    """One item's segments from its carried field (a tensor of ``[N, k]`` rows, or a
    ``MultiModalFieldElem`` holding one). The field is kept on the CPU: no device sync."""
    data = getattr(value, "data", value)
    rows = torch.as_tensor(data).reshape(-1, 2).tolist()  # ok-sync: CPU field
    return tuple((int(n), int(k)) for n, k in rows)


def batch_segments(value: Any, num_items: int) -> list[Segments]:
    """Per item of a batch its segments, from the batched field (a stacked tensor when every
    item has as many segments, else a list of per-item tensors)."""
    if value is None:
        raise RuntimeError(
            f"vs-vllm: the batch has no kept counts ({IMAGE_SEGMENTS} / {VIDEO_SEGMENTS}): "
            "its items did not come through the selecting processor"
        )
    items = list(value) if not isinstance(value, torch.Tensor) else list(value.unbind(0))
    if len(items) != num_items:
        raise RuntimeError(f"vs-vllm: kept counts of {len(items)} items for {num_items} items")
    return [carried_segments(item) for item in items]


def kept_count(segments: Segments) -> int:
    """The item's kept tokens (the sum of its segments' k)."""
    return sum(k for _, k in segments)


def run_counts(adapter: ModelAdapter, segments: Segments) -> list[int]:
    """Kept placeholders of each placeholder run of a video: one run (the video's k), or one
    per frame for a family whose frames are separate runs (selected per frame:
    ``validation.check_video_selection``)."""
    if adapter.video_layout == "frame_runs":
        return [k for _, k in segments]
    return [kept_count(segments)]


def packed_segments(
    segments: Sequence[Segments], device: torch.device | str = "cpu"
) -> PackedImages:
    """Every item's segments, in order, as one :class:`PackedImages` (one selection call)."""
    flat = [segment for item in segments for segment in item]
    return PackedImages(tuple(n for n, _ in flat), tuple(k for _, k in flat), torch.device(device))
