"""GLM-4.1V (``Glm4vForConditionalGeneration``) and GLM-4.5V / 4.6V
(``Glm4vMoeForConditionalGeneration``), which share their vision side and vLLM's
``glm4_1v`` processing.

* **Visual rows** are the merger output, width ``vision_config.out_hidden_size`` (the text
  hidden size), all scored: nothing is only gathered.
* **Images** are laid out as in Qwen2.5-VL: ``<|begin_of_image|>`` + N ``<|image|>`` +
  ``<|end_of_image|>`` (N = ``T*H*W // merge²``), M-RoPE at t = 0 over the merged (H', W')
  grid; the text after the image continues at ``start + max(H', W')`` (transformers'
  ``get_rope_index`` and vLLM's ``get_mrope_input_positions`` agree). ``<|begin_of_image|>``
  / ``<|end_of_image|>`` (``image_start_token_id`` / ``image_end_token_id``) are the vision
  start / end tokens.
* **Videos are not selected** (``video_fields=None``). GLM's processor expands a video's
  ``<|begin_of_video|><|video|><|end_of_video|>`` into, per temporal patch, ``<|begin_of_image|>``
  + n ``<|image|>`` + ``<|end_of_image|>`` + the frame's timestamp text: video frames use the
  **image** token id, and ``config.video_token_id`` never reaches the model. vs-vllm tells the
  modalities apart by token id alone (the HF path's placeholder runs and
  ``mm_token_type_ids``, vLLM's ``fill_kept_mrope_positions``, the pruned prompt's
  replacements), so a video's frame runs would be taken for images. Selecting GLM videos
  needs a way to tell a frame run from an image run other than its token id: e.g. the
  processor's ``mm_token_type_ids`` (2 on video frames) on the HF side and the request's
  placeholder ranges (``mm_position`` offsets) on the vLLM side, then
  ``video_layout="frame_runs"`` with ``MediaFields("pixel_values_videos", "video_grid_thw")``
  (timestamps separate the frames, each frame at t = 0 like an image; vLLM's
  ``_process_video_input`` returns one row block per video). Until then a prompt with a
  video is refused on the HF path (:meth:`Glm4vAdapter.hf_rope_index`).
* **Image size**: ``Glm4vImageProcessor`` counts an image as ``temporal_patch_size`` (2)
  frames against its pixel bounds, so :meth:`Glm4vAdapter.hf_images_kwargs` scales the
  per-image area bounds by 2.
* **End of turn**: GLM's chat template closes an assistant answer with nothing fixed: the
  answer is followed by the next ``<|user|>`` (or ``<|observation|>``) turn or by the end of
  the conversation (the model stops by generating ``<|user|>`` / ``<|endoftext|>``, its
  ``eos_token_id``), so ``end_of_turn`` is empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vs_vllm.models.adapter import MediaTokenIds, ModelAdapter, VllmClasses

_VLLM = "vllm.model_executor.models.glm4_1v"
#: Frames an image counts as against the image processor's pixel bounds (GLM-4.1V / 4.5V /
#: 4.6V all have ``temporal_patch_size`` 2).
_IMAGE_FRAMES = 2


def _vllm(model: str) -> VllmClasses:
    return VllmClasses(
        model=f"{_VLLM}:{model}",
        processing_info=f"{_VLLM}:Glm4vProcessingInfo",
        processor=f"{_VLLM}:Glm4vMultiModalProcessor",
        dummy_inputs=f"{_VLLM}:Glm4vDummyInputsBuilder",
    )


@dataclass(frozen=True)
class Glm4vAdapter(ModelAdapter):
    def token_ids(self, hf_config: Any) -> MediaTokenIds:
        return MediaTokenIds(
            image=int(hf_config.image_token_id),
            video=int(hf_config.video_token_id),  # never in a processed prompt (see above)
            vision_start=int(hf_config.image_start_token_id),
            vision_end=int(hf_config.image_end_token_id),
        )

    def hf_images_kwargs(self, min_pixels: int, max_pixels: int) -> dict[str, Any]:
        """``size`` bounds of GLM's image processor, which compares ``2 * H * W`` (an image
        counted as two frames) with them: the per-image area bounds times 2."""
        return {
            "size": {
                "shortest_edge": min_pixels * _IMAGE_FRAMES,
                "longest_edge": max_pixels * _IMAGE_FRAMES,
            }
        }

    def hf_rope_index(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        media: Mapping[str, Any],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """transformers' ``get_rope_index`` for prompts of images; a prompt with a video (its
        frames are ``<|image|>`` runs inside ``<|begin_of_video|>``) is refused."""
        video_start = getattr(model.config, "video_start_token_id", None)
        if video_start is not None and bool(
            (input_ids == int(video_start)).any()
        ):  # ok-sync: HF path, once per prompt
            raise ValueError(
                f"{self.family}: video frames use the image token, and vision token selection "
                "does not tell them apart from images yet: prompts with videos are not supported"
            )
        return super().hf_rope_index(model, input_ids, media, attention_mask)


ADAPTER = Glm4vAdapter(
    family="glm4v",
    vllm={
        "Glm4vForConditionalGeneration": _vllm("Glm4vForConditionalGeneration"),
        "Glm4vMoeForConditionalGeneration": _vllm("Glm4vMoeForConditionalGeneration"),
    },
    hf_model={
        "Glm4vForConditionalGeneration": "transformers:Glm4vForConditionalGeneration",
        "Glm4vMoeForConditionalGeneration": "transformers:Glm4vMoeForConditionalGeneration",
    },
    hf_processors=("Glm4vProcessor",),
    position_rule="mrope",
    video_fields=None,
    end_of_turn="",
)
