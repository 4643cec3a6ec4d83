"""What vs-vllm needs to know about a model family, behind one interface.

A family (Qwen2.5-VL, Qwen3-VL, ...) is one :class:`ModelAdapter` in one file of this package.
Everything else (the vLLM plugin, positions, the HF reference path, training, the tiny test
models) asks the adapter and never names a family. The adapter holds:

* the vLLM classes it extends and the HF classes of the reference path, by import path (so
  this package imports neither vLLM nor transformers);
* the media token ids, and the one tokens-per-item rule ``T * H * W // merge**2``;
* the split of the vision tower's output rows into the scored part (the first
  ``score_width`` columns) and the part that is only gathered (Qwen3-VL's deepstack levels);
* the names of its multimodal fields (the HF processor's outputs, which vLLM carries per
  item under the same names): :class:`MediaFields`, read through :meth:`ModelAdapter.item_grids`
  and :meth:`ModelAdapter.video_t_factors`;
* how vLLM's model class runs its vision tower (:meth:`ModelAdapter.vllm_media_inputs`,
  :meth:`ModelAdapter.vllm_tower_rows`: the only calls of that class's private methods);
* its position rule: M-RoPE (kept tokens keep their unpruned (t, h, w); the M-RoPE layout of
  its media, i.e. how a video's frames sit in the prompt) or 1-D (the kept tokens take
  contiguous positions);
* its chat format's end-of-turn text (training labels);
* the HF hooks of the reference path and training (visual rows, language-model keyword
  arguments for the gathered part, unpruned positions).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "MediaFields",
    "MediaTokenIds",
    "Modality",
    "ModelAdapter",
    "VllmClasses",
    "import_object",
]

Modality = Literal["image", "video"]

#: How a video sits in the prompt. ``"one_run"``: one run of video tokens, temporal position
#: ``int(t * second_per_grid_t * tokens_per_second)`` (Qwen2.5-VL). ``"frame_runs"``: one run
#: per frame, separated by timestamp text, every frame at temporal position 0 like an image
#: (Qwen3-VL).
VideoLayout = Literal["one_run", "frame_runs"]

#: How the LLM places visual tokens. ``"mrope"``: 3-D (t, h, w) M-RoPE; a kept token keeps the
#: position it has in the unpruned prompt (the runner recomputes positions from the 8 position
#: channels selection appends). ``"contiguous"``: 1-D RoPE; the pruned prompt simply holds k
#: placeholders, so the kept tokens take consecutive positions (the HF path: drop the tokens,
#: then count positions) and no channel is appended.
PositionRule = Literal["mrope", "contiguous"]


def import_object(path: str) -> Any:
    """``"package.module:Name"`` -> the object."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class VllmClasses:
    """The vLLM classes a family's selecting model extends, as ``module:Name`` paths."""

    model: str
    processing_info: str
    processor: str
    dummy_inputs: str


@dataclass(frozen=True)
class MediaFields:
    """The multimodal fields of one modality, by name: the HF processor's outputs, which vLLM's
    processor passes on per item under the same names."""

    pixels: str  # every item's pixels, concatenated (patch rows or tiles)
    grid: str  # per item, its token layout (a (T, H, W) patch grid, or a tile count)
    per_item: tuple[str, ...] = ()  # further per-item fields selection reads

    @property
    def names(self) -> tuple[str, ...]:
        return (self.pixels, self.grid, *self.per_item)


def field_value(value: Any) -> Any:
    """A field as a tensor or list (vLLM wraps an item's field in a ``MultiModalFieldElem``)."""
    return getattr(value, "data", value)


def field_scalars(value: Any) -> list[Any]:
    """A per-item scalar field (one value per item: a tensor, or a list of values or field
    elements) as a list of Python numbers. The fields are kept on the CPU: no device sync."""
    value = field_value(value)
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist()  # ok-sync: CPU field
    if isinstance(value, int | float):
        return [value]
    return [x for v in value for x in field_scalars(v)]


@dataclass(frozen=True)
class MediaTokenIds:
    """The media token ids of a family's *processed* prompt (what vLLM and transformers'
    processor put in it). ``video`` is the token that fills a video's placeholder runs, which
    may be the image token (see :meth:`ModelAdapter.placeholder_masks`)."""

    image: int
    video: int
    vision_start: int
    vision_end: int


@dataclass(frozen=True)
class ModelAdapter:
    """One model family. Subclass it for a family whose HF hooks differ (see ``qwen3_vl``)."""

    family: str
    #: architecture name (``config.architectures[0]``) -> the vLLM classes it extends
    vllm: Mapping[str, VllmClasses]
    #: architecture name -> the transformers class of the reference path and training
    hf_model: Mapping[str, str]
    #: the HF processor classes (class names) of the family: training finds the adapter of a
    #: processor by them
    hf_processors: tuple[str, ...] = ()
    video_layout: VideoLayout = "one_run"
    position_rule: PositionRule = "mrope"
    image_fields: MediaFields = MediaFields("pixel_values", "image_grid_thw")
    #: None: the family has no video input
    video_fields: MediaFields | None = MediaFields(
        "pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",)
    )
    #: the text that closes a turn in the chat format (part of each answer's training labels)
    end_of_turn: str = "<|im_end|>"
    #: the private methods of vLLM's model class that ``vllm_media_inputs`` /
    #: ``vllm_tower_rows`` call (each one listed in ``vllm_plugin.private_surface``)
    vllm_private_methods: tuple[str, ...] = (
        "_parse_and_validate_multimodal_inputs",
        "_process_image_input",
        "_process_video_input",
    )

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.vllm)

    @property
    def uses_mrope(self) -> bool:
        return self.position_rule == "mrope"

    # -- multimodal fields ------------------------------------------------------------------

    def fields(self, modality: Modality) -> MediaFields | None:
        return self.image_fields if modality == "image" else self.video_fields

    def field_names(self) -> tuple[str, ...]:
        """Every multimodal field name of the family."""
        fields = (self.image_fields, self.video_fields)
        return tuple(name for f in fields if f is not None for name in f.names)

    def item_grids(
        self, hf_config: Any, data: Mapping[str, Any], modality: Modality
    ) -> list[tuple[int, int, int]]:
        """Each item's (T, H, W) patch grid (``tokens_per_item`` of it is the item's token
        count), from a mapping of fields (a processor output, vLLM's batched inputs, or one
        item's fields); ``[]`` when it has no such item."""
        fields = self.fields(modality)
        value = None if fields is None else data.get(fields.grid)
        if value is None:
            return []
        value = field_value(value)
        rows = value.tolist() if isinstance(value, torch.Tensor) else value  # ok-sync: CPU
        if rows and not isinstance(rows[0], list | tuple | torch.Tensor):
            rows = [rows]  # one item's (3,) grid
        return [tuple(int(v) for v in field_value(g)) for g in rows]  # type: ignore[misc]

    def video_t_factors(self, hf_config: Any, data: Mapping[str, Any], count: int) -> list[float]:
        """Each video's temporal position scale (see :meth:`video_t_factor`), from its fields."""
        fields = self.video_fields
        names = () if fields is None else fields.per_item
        value = data.get(names[0]) if names else None
        if value is None:
            return [self.video_t_factor(hf_config, None)] * count
        seconds = [float(s) for s in field_scalars(value)]
        if len(seconds) != count:
            raise ValueError(f"{len(seconds)} video time scales for {count} videos")
        return [self.video_t_factor(hf_config, s) for s in seconds]

    # -- vLLM's model class (the only calls of its private methods) -------------------------

    def vllm_media_inputs(self, model: Any, kwargs: Mapping[str, object]) -> Mapping[str, Any]:
        """The batch's inputs per modality, parsed by the family's vLLM model class."""
        return model._parse_and_validate_multimodal_inputs(**kwargs)

    def vllm_tower_rows(self, model: Any, modality: Modality, media_input: Any) -> Any:
        """The family's vision tower on one modality's parsed inputs: per-item rows (or packed
        rows), width ``row_width``."""
        if modality == "image":
            return model._process_image_input(media_input)
        return model._process_video_input(media_input)

    # -- config -----------------------------------------------------------------------------

    def token_ids(self, hf_config: Any) -> MediaTokenIds:
        return MediaTokenIds(
            image=int(hf_config.image_token_id),
            video=int(hf_config.video_token_id),
            vision_start=int(hf_config.vision_start_token_id),
            vision_end=int(hf_config.vision_end_token_id),
        )

    def placeholder_masks(
        self, hf_config: Any, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(is_image, is_video)``: bool masks of ``input_ids``' (any shape, last dimension
        the sequence) image and video placeholders in a processed prompt. By token id; a family
        whose video frames use the image token tells them apart otherwise (GLM-4.1V)."""
        ids = self.token_ids(hf_config)
        return input_ids == ids.image, input_ids == ids.video

    def merge_size(self, hf_config: Any) -> int:
        return int(hf_config.vision_config.spatial_merge_size)

    @staticmethod
    def tokens_per_item(grid_thw: Sequence[int], merge_size: int) -> int:
        """LLM-side tokens of one image or video of patch grid (T, H, W): ``T*H*W // merge²``."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // (merge_size * merge_size)

    def patch_size(self, hf_config: Any) -> int:
        """Pixels per patch side."""
        return int(hf_config.vision_config.patch_size)

    def tokens_per_second(self, hf_config: Any) -> float:
        return float(getattr(hf_config.vision_config, "tokens_per_second", 1.0))

    def score_width(self, hf_config: Any) -> int:
        """D: the columns of a visual row that are scored (the scorer's hidden size)."""
        return int(hf_config.vision_config.out_hidden_size)

    def row_width(self, hf_config: Any) -> int:
        """The width of a visual row as the vision tower returns it (>= ``score_width``)."""
        return self.score_width(hf_config)

    def video_t_factor(self, hf_config: Any, second_per_grid_t: float | None) -> float:
        """Temporal position scale of a video's frames (0: every frame at t = 0)."""
        if self.video_layout == "frame_runs":
            return 0.0
        if second_per_grid_t is None:
            return 1.0
        return float(second_per_grid_t) * self.tokens_per_second(hf_config)

    # -- HF transformers (reference path, training) -----------------------------------------

    def hf_model_class(self, architecture: str) -> type:
        try:
            return import_object(self.hf_model[architecture])
        except KeyError:
            raise ValueError(f"{self.family}: no HF class for {architecture}") from None

    def hf_item_fields(self, processor: Any, out: Mapping[str, Any]) -> dict[str, Any]:
        """Per-item fields transformers' processor does not return but the adapter reads
        (added to each processed training piece); none for most families."""
        return {}

    def hf_images_kwargs(self, min_pixels: int, max_pixels: int) -> dict[str, Any]:
        """The image processor's call-time arguments that bound an image's area in pixels
        (training data; Qwen's processors keep the bounds in ``size``)."""
        return {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}

    def hf_tower_output(
        self, model: torch.nn.Module, media: Mapping[str, Any], modality: Modality
    ) -> Any:
        """transformers' ``get_image_features`` / ``get_video_features`` on the processor's
        fields of ``modality`` (pixels cast to the model's dtype)."""
        fields = self.fields(modality)
        assert fields is not None
        pixels = media[fields.pixels].to(model.dtype)
        tower = (
            model.model.get_image_features
            if modality == "image"
            else model.model.get_video_features
        )
        return tower(pixels, media[fields.grid], return_dict=True)

    def hf_visual_rows(self, model: torch.nn.Module, media: Mapping[str, Any]) -> torch.Tensor:
        """Packed image rows (sum N_i, ``row_width``) of the processor output ``media``:
        transformers' vision tower, raster order."""
        per_image = self.hf_tower_output(model, media, "image").pooler_output
        return per_image[0] if len(per_image) == 1 else torch.cat(per_image, dim=0)

    def hf_video_rows(self, model: torch.nn.Module, media: Mapping[str, Any]) -> torch.Tensor:
        """Packed video rows (sum N_v, ``row_width``), in prompt order."""
        per_video = self.hf_tower_output(model, media, "video").pooler_output
        return per_video[0] if len(per_video) == 1 else torch.cat(per_video, dim=0)

    def hf_text_kwargs(
        self, model: torch.nn.Module, rows: torch.Tensor, visual_mask: torch.Tensor
    ) -> dict[str, Any]:
        """Extra keyword arguments of the HF text model for the visual ``rows`` placed at
        ``visual_mask`` (B, L) (their first ``score_width`` columns go into inputs_embeds)."""
        return {}

    def hf_rope_index(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        media: Mapping[str, Any],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(R, B, L) int64 positions of unpruned prompts: R = 3 M-RoPE rows (transformers'
        ``get_rope_index`` with the processor's grid fields in ``media``), or R = 1 under the
        contiguous rule (0, 1, 2, ...)."""
        if not self.uses_mrope:
            b, length = input_ids.shape
            return torch.arange(length, device=input_ids.device).expand(1, b, length).clone()
        is_image, is_video = self.placeholder_masks(model.config, input_ids)
        mm_token_type_ids = is_image.to(torch.int64) + 2 * is_video.to(torch.int64)
        grids: dict[str, Any] = {}
        for fields in (self.image_fields, self.video_fields):
            if fields is not None and media.get(fields.grid) is not None:
                grids.update({n: media[n] for n in (fields.grid, *fields.per_item) if n in media})
        positions, _ = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            attention_mask=attention_mask,
            **grids,
        )
        return positions.to(torch.int64)
