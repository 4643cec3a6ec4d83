"""Language-model inputs with visual-token selection, built on HF transformers' model classes.

The same selection as the vLLM plugin, applied to the transformers class of any family a
model adapter covers (``vs_vllm.models``; the adapter supplies the visual rows, the extra
text-model arguments such as deepstack levels, the placeholder masks and the unpruned
positions):

* the prompt is the processor's unpruned ``input_ids`` (N_i image placeholders per image);
* the visual rows come from transformers' own image path (vision tower + merger), packed
  ``(sum N_i, W)`` in prompt order, raster order within each image; their first D columns
  (the adapter's ``score_width``) are scored and go into ``inputs_embeds``, the rest (deepstack
  levels) follow the kept tokens as text-model arguments;
* image i keeps ``k_i = num_kept_tokens(N_i, r_i)`` tokens chosen by
  :func:`~vs_vllm.selection.select_visual_tokens` (per-image indices, ascending);
* the pruned sequence keeps every text token and only the kept placeholder tokens,
  which receive the kept rows;
* M-RoPE positions are transformers' ``get_rope_index`` on the *unpruned* sequence, gathered
  at the kept tokens (text keeps its unpruned positions, gaps included); decoding continues
  at ``max(unpruned positions) + 1``.

:func:`soft_masked_inputs` is the training form: every token stays and each image row is
multiplied by a (differentiable) mask.

Batch size 1 only (``input_ids`` of shape ``(1, L)``). :func:`select_inputs` also takes the
prompt's videos (selected with ``video_keep_ratio``); :func:`soft_masked_inputs` is images only
(training batches with videos go through ``vs_vllm.train.objective``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.media_segments import media_segments, packed_segments
from vs_vllm.models import ModelAdapter, adapter_for
from vs_vllm.positions import token_runs
from vs_vllm.selection import select_video_tokens, select_visual_tokens
from vs_vllm.strategies import SelectionStrategy

__all__ = [
    "SelectedInputs",
    "image_features",
    "image_token_counts",
    "masked_rows",
    "model_adapter",
    "select_inputs",
    "soft_masked_inputs",
    "unpruned_positions",
    "visual_inputs",
]


def model_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter of a transformers model (from its config's architectures)."""
    return adapter_for(model.config, type(model).__name__)


@dataclass(frozen=True)
class SelectedInputs:
    """What the language model consumes for one (possibly pruned) prompt.

    input_ids:      (1, L') token ids of the pruned prompt (kept placeholders included).
    inputs_embeds:  (1, L', H) embeddings: text embeddings, kept image rows at the kept pads.
    position_ids:   (R, 1, L') int64 positions: R = 3 M-RoPE (t, h, w) rows, the unpruned
                    ones gathered, or R = 1 under the contiguous rule (0 .. L' - 1).
    source_indices: (L',) int64 index of every kept token in the unpruned prompt.
    kept_indices:   per image, the kept token indices within that image (ascending).
    images:         the images' token counts N_i and keep counts k_i.
    next_position:  position of the first generated token (M-RoPE: unpruned maximum + 1;
                    contiguous: L'); the
                    t-th generated token (from 0) sits at ``next_position + t``.
    text_kwargs:    extra text-model arguments of the prefill (the adapter's
                    ``hf_text_kwargs``, e.g. the kept tokens' deepstack levels and where they
                    sit), empty for most families.
    video_kept_indices: per video, the kept token indices within it (all when not selected).
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    source_indices: torch.Tensor
    kept_indices: list[torch.Tensor]
    images: PackedImages
    next_position: int
    text_kwargs: dict = field(default_factory=dict)
    video_kept_indices: list[torch.Tensor] = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        """L', the length of the (pruned) prompt."""
        return int(self.inputs_embeds.shape[1])


def _check_prompt(model: torch.nn.Module, input_ids: torch.Tensor, *, videos: bool = False) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"expected input_ids of shape (1, L), got {tuple(input_ids.shape)}")
    _, is_video = model_adapter(model).placeholder_masks(model.config, input_ids)
    has_video = bool(is_video.any())  # ok-sync: HF path, once per prompt
    if has_video and not videos:
        raise ValueError("the prompt has video placeholders: pass the videos' processor fields")


Media = Mapping[str, Any]  # a processor's output (its multimodal fields; other keys ignored)


def image_token_counts(model: torch.nn.Module, media: Media) -> tuple[int, ...]:
    """N_i = T * H * W / merge^2 merged tokens per image of the processor output ``media``."""
    adapter = model_adapter(model)
    merge = adapter.merge_size(model.config)
    return tuple(
        adapter.tokens_per_item(g, merge) for g in adapter.item_grids(model.config, media, "image")
    )


def image_features(model: torch.nn.Module, media: Media) -> torch.Tensor:
    """Packed visual rows (sum N_i, W) of the images of the processor output ``media``:
    transformers' vision tower + merger, raster order; W is the adapter's ``row_width``
    (e.g. main features then the deepstack levels).

    Runs with whatever grad mode the caller has (the tower is frozen in training)."""
    return model_adapter(model).hf_visual_rows(model, media)


def unpruned_positions(
    model: torch.nn.Module, input_ids: torch.Tensor, media: Media
) -> torch.Tensor:
    """(3, 1, L) int64 M-RoPE positions of the unpruned prompt: transformers' ``get_rope_index``."""
    _check_prompt(model, input_ids)
    return model_adapter(model).hf_rope_index(model, input_ids, media)


def masked_rows(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The soft-masked visual rows of training: row j (every column: the main features and
    each deepstack level alike) times ``mask[j]``. Differentiable in both."""
    if mask.shape != rows.shape[:1]:
        raise ValueError(f"expected a ({rows.shape[0]},) mask, got {tuple(mask.shape)}")
    return rows * mask.to(rows.dtype).unsqueeze(-1)


def visual_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    video_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """``inputs_embeds`` (B, L, H) of ``input_ids`` with the visual ``rows`` (one per image
    placeholder, in sequence order) and ``video_rows`` (one per video placeholder) at the
    placeholders, and the extra text-model arguments the rows need (the adapter's
    ``hf_text_kwargs``, given all visual rows in sequence order). Any batch size;
    differentiable."""
    adapter = model_adapter(model)
    d = adapter.score_width(model.config)
    embeds = model.get_input_embeddings()(input_ids)
    is_image, is_video = adapter.placeholder_masks(model.config, input_ids)
    rows = rows.to(embeds.device, embeds.dtype)
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1), rows[:, :d])
    if video_rows is None:
        return embeds, adapter.hf_text_kwargs(model, rows, is_image)
    video_rows = video_rows.to(embeds.device, embeds.dtype)
    embeds = embeds.masked_scatter(is_video.unsqueeze(-1), video_rows[:, :d])
    is_visual = is_image | is_video
    joint = rows.new_empty(int(is_visual.sum()), rows.shape[1])  # ok-sync: HF path
    joint[is_image[is_visual]] = rows
    joint[is_video[is_visual]] = video_rows
    return embeds, adapter.hf_text_kwargs(model, joint, is_visual)


@dataclass(frozen=True)
class _Kept:
    """One modality's selection: the modality, the items' token counts, each item's kept
    indices (ascending) and the kept rows, packed in prompt order."""

    modality: str  # "image" or "video"
    num_tokens: tuple[int, ...]  # per placeholder run
    indices: list[torch.Tensor]  # per placeholder run
    rows: torch.Tensor
    per_item: list[torch.Tensor] | None = None  # per video when its frames are runs


def _keep_mask(is_media: torch.Tensor, kept: _Kept) -> torch.Tensor:
    """(L,) bool: the kept placeholders of one modality (``is_media``: all its placeholders)."""
    name = kept.modality
    starts, ends = token_runs(is_media)
    run_lengths = tuple(end - start for start, end in zip(starts, ends, strict=True))
    if run_lengths != kept.num_tokens:
        raise ValueError(
            f"the prompt has {name} placeholder runs of {list(run_lengths)} tokens but the "
            f"{name}s have {list(kept.num_tokens)} visual tokens"
        )
    keep = torch.zeros_like(is_media)
    for start, idx in zip(starts, kept.indices, strict=True):
        keep[start + idx.to(keep.device)] = True
    return keep


def _assemble(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    full_positions: torch.Tensor,
    images: PackedImages,
    image: _Kept,
    video: _Kept | None = None,
) -> SelectedInputs:
    """Pruned ids, embeddings and positions from the kept rows of each modality."""
    _check_prompt(model, input_ids, videos=video is not None)
    is_image, is_video = model_adapter(model).placeholder_masks(model.config, input_ids[0])
    keep = ~is_image & ~is_video
    keep |= _keep_mask(is_image, image)
    if video is not None:
        keep |= _keep_mask(is_video, video)
    source = torch.nonzero(keep).flatten()  # ok-sync: HF reference/training path

    ids = input_ids.index_select(1, source)
    embeds, text_kwargs = visual_inputs(
        model, ids, image.rows, None if video is None else video.rows
    )
    if model_adapter(model).uses_mrope:  # kept tokens keep their unpruned positions
        positions = full_positions.index_select(2, source.to(full_positions.device))
        next_position = int(full_positions.max()) + 1  # ok-sync: HF path, once per prompt
    else:  # contiguous: the pruned prompt is counted again, 0 .. L' - 1
        positions = full_positions[:, :, : source.numel()]
        next_position = source.numel()
    return SelectedInputs(
        input_ids=ids,
        inputs_embeds=embeds,
        position_ids=positions,
        source_indices=source,
        kept_indices=image.indices,
        images=images,
        next_position=next_position,
        text_kwargs=text_kwargs,
        video_kept_indices=[] if video is None else (video.per_item or video.indices),
    )


@torch.no_grad()
def select_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    media: Media | None,
    strategy: SelectionStrategy,
    keep_ratio: float | Sequence[float] = 1.0,
    *,
    image_embeds: torch.Tensor | None = None,
    video_keep_ratio: float | None = None,
    video_selection: str = "per-video",
    video_embeds: torch.Tensor | None = None,
) -> SelectedInputs:
    """The pruned language-model inputs of one prompt, exactly as the vLLM plugin builds them.

    ``media`` is the processor's output for the prompt (its image and video fields; None or
    without them: a text prompt). ``keep_ratio`` is one ratio for every image or one per
    image. ``image_embeds`` (packed (sum N_i, D), from :func:`image_features`) skips the
    vision tower; ``media`` then needs only the grids. Videos keep every token unless
    ``video_keep_ratio`` is given, then ``video_selection`` says how (``per-video`` or
    ``per-frame``, see ``keep_ratio.video_segments``); ``video_embeds`` (the videos' packed
    rows, from the adapter's ``hf_video_rows``) skips the tower for them. At ratio 1.0 nothing
    is removed and the result is plain transformers'.
    """
    adapter = model_adapter(model)
    media = media or {}
    score_dim = adapter.score_width(model.config)
    grids = adapter.item_grids(model.config, media, "image")
    x = image_embeds
    if x is None and grids:
        x = image_features(model, media)
    if not grids or x is None:
        images = PackedImages((), (), input_ids.device)
        image = _Kept("image", (), [], torch.empty(0, adapter.row_width(model.config)))
    else:
        counts = image_token_counts(model, media)
        ratios = (
            [keep_ratio] * len(grids) if isinstance(keep_ratio, int | float) else list(keep_ratio)
        )
        if len(ratios) != len(grids):
            raise ValueError(f"{len(grids)} images but {len(ratios)} keep ratios")
        images = packed_segments(
            [
                media_segments(adapter, model.config, "image", g, r)
                for g, r in zip(grids, ratios, strict=True)
            ],
            x.device,
        )
        out = select_visual_tokens(x, images, strategy, score_dim=score_dim)
        image = _Kept("image", counts, list(out.indices.split(list(images.num_kept))), out.rows)
    video = None
    grids = adapter.item_grids(model.config, media, "video")
    if grids:
        merge = adapter.merge_size(model.config)
        counts = tuple(adapter.tokens_per_item(g, merge) for g in grids)
        rows = video_embeds
        if rows is None:
            rows = adapter.hf_video_rows(model, media)
        segments = [
            media_segments(
                adapter,
                model.config,
                "video",
                g,
                video_keep_ratio,
                per_frame=video_selection == "per-frame",
            )
            for g in grids
        ]
        kept = select_video_tokens(rows, segments, strategy, score_dim=score_dim)
        indices = per_video = [idx for _, idx in kept]
        if adapter.video_layout == "frame_runs":  # one placeholder run per frame
            per_run, run_counts = [], []
            for g, idx in zip(grids, per_video, strict=True):
                hw = adapter.tokens_per_item((1, *g[1:]), merge)
                for f in range(g[0]):
                    per_run.append(idx[(idx >= f * hw) & (idx < (f + 1) * hw)] - f * hw)
                    run_counts.append(hw)
            indices, counts = per_run, tuple(run_counts)
        rows = torch.cat([r for r, _ in kept])
        video = _Kept("video", counts, indices, rows, per_video)
    full_positions = adapter.hf_rope_index(model, input_ids, media)
    return _assemble(model, input_ids, full_positions, images, image, video)


def soft_masked_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    media: Media,
    image_embeds: torch.Tensor,
    mask: torch.Tensor,
) -> SelectedInputs:
    """Training form: every token kept, image row j multiplied by ``mask[j]``.

    ``media`` holds the images' grids (the processor's output), ``image_embeds`` is the packed
    (sum N_i, D) output of :func:`image_features`, ``mask`` a (sum N_i,) soft mask (e.g. the
    differentiable top-k). Gradients flow into both; nothing is removed from the sequence and
    positions are the unpruned ones.
    """
    images = PackedImages.from_ratio(image_token_counts(model, media), 1.0, image_embeds.device)
    if image_embeds.dim() != 2 or image_embeds.shape[0] != images.total_tokens:
        raise ValueError(
            f"expected image_embeds of shape ({images.total_tokens}, D), "
            f"got {tuple(image_embeds.shape)}"
        )
    rows = masked_rows(image_embeds, mask)
    every = [torch.arange(n, device=image_embeds.device) for n in images.num_tokens]
    image = _Kept("image", images.num_tokens, every, rows)
    full_positions = unpruned_positions(model, input_ids, media)
    return _assemble(model, input_ids, full_positions, images, image)
