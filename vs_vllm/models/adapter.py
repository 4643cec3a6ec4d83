"""What vs-vllm needs to know about a model family, behind one interface.

A family (Qwen2.5-VL, Qwen3-VL, ...) is one :class:`ModelAdapter` in one file of this package.
Everything else (the vLLM plugin, positions, the HF reference path, training, the tiny test
models) asks the adapter and never names a family. The adapter holds:

* the vLLM classes it extends and the HF classes of the reference path, by import path (so
  this package imports neither vLLM nor transformers);
* the media token ids, and the one tokens-per-item rule ``T * H * W // merge**2``;
* the split of the vision tower's output rows into the scored part (the first
  ``score_width`` columns) and the part that is only gathered (Qwen3-VL's deepstack levels);
* the M-RoPE layout of its media (how a video's frames sit in the prompt);
* the HF hooks of the reference path and training (visual rows, language-model keyword
  arguments for the gathered part, unpruned positions).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["MediaTokenIds", "ModelAdapter", "VllmClasses", "import_object"]

#: How a video sits in the prompt. ``"one_run"``: one run of video tokens, temporal position
#: ``int(t * second_per_grid_t * tokens_per_second)`` (Qwen2.5-VL). ``"frame_runs"``: one run
#: per frame, separated by timestamp text, every frame at temporal position 0 like an image
#: (Qwen3-VL).
VideoLayout = Literal["one_run", "frame_runs"]


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
class MediaTokenIds:
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
    video_layout: VideoLayout = "one_run"

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.vllm)

    # -- config -----------------------------------------------------------------------------

    def token_ids(self, hf_config: Any) -> MediaTokenIds:
        return MediaTokenIds(
            image=int(hf_config.image_token_id),
            video=int(hf_config.video_token_id),
            vision_start=int(hf_config.vision_start_token_id),
            vision_end=int(hf_config.vision_end_token_id),
        )

    def merge_size(self, hf_config: Any) -> int:
        return int(hf_config.vision_config.spatial_merge_size)

    @staticmethod
    def tokens_per_item(grid_thw: Sequence[int], merge_size: int) -> int:
        """LLM-side tokens of one image or video of patch grid (T, H, W): ``T*H*W // merge²``."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // (merge_size * merge_size)

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

    def hf_visual_rows(
        self, model: torch.nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """Packed visual rows (sum N_i, ``row_width``): transformers' vision tower, raster order."""
        out = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        per_image = out.pooler_output
        return per_image[0] if len(per_image) == 1 else torch.cat(per_image, dim=0)

    def hf_video_rows(
        self,
        model: torch.nn.Module,
        pixel_values_videos: torch.Tensor,
        video_grid_thw: torch.Tensor,
    ) -> torch.Tensor:
        """Packed video rows (sum N_v, ``row_width``), in prompt order."""
        out = model.model.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
        per_video = out.pooler_output
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
        image_grid_thw: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        *,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(3, B, L) int64 M-RoPE positions of unpruned prompts (``get_rope_index``)."""
        ids = self.token_ids(model.config)
        mm_token_type_ids = (input_ids == ids.image).to(torch.int64)
        mm_token_type_ids += 2 * (input_ids == ids.video).to(torch.int64)
        videos: dict[str, Any] = {}
        if video_grid_thw is not None:
            videos["video_grid_thw"] = video_grid_thw
            if second_per_grid_ts is not None:
                videos["second_per_grid_ts"] = second_per_grid_ts
        positions, _ = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
            **videos,
        )
        return positions.to(torch.int64)
