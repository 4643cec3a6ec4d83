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
* **Videos** are one placeholder run per temporal patch (``video_layout="frame_runs"``, like
  Qwen3-VL): GLM's processor expands ``<|begin_of_video|><|video|><|end_of_video|>`` into,
  per temporal patch, ``<|begin_of_image|>`` + n ``<|image|>`` + ``<|end_of_image|>`` + the
  frame's timestamp text, each frame at t = 0 over its (H', W') grid and the next text at
  ``start + max(H', W')`` (transformers' ``get_rope_index`` repeats ``video_grid_thw`` per
  frame; vLLM's ``_process_video_input`` returns one row block per video, frames in order).
  The frames use the **image** token id (``config.video_token_id`` never reaches the model),
  so ``token_ids().video`` is the image token and :meth:`Glm4vAdapter.placeholder_masks`
  tells a frame from an image by the ``<|begin_of_video|>`` / ``<|end_of_video|>`` around it.
  On the vLLM side nothing needs the masks: a video's runs are found from its own placeholder
  range on.
* **Image size**: ``Glm4vImageProcessor`` counts an image as ``temporal_patch_size`` (2)
  frames against its pixel bounds, so :meth:`Glm4vAdapter.hf_images_kwargs` scales the
  per-image area bounds by 2.
* **End of turn**: GLM's chat template closes an assistant answer with nothing fixed: the
  answer is followed by the next ``<|user|>`` (or ``<|observation|>``) turn or by the end of
  the conversation (the model stops by generating ``<|user|>`` / ``<|endoftext|>``, its
  ``eos_token_id``), so ``end_of_turn`` is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vs_vllm.models.adapter import MediaFields, MediaTokenIds, ModelAdapter, VllmClasses

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
            video=int(hf_config.image_token_id),  # a video's frames use the image token
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

    def placeholder_masks(
        self, hf_config: Any, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens inside ``<|begin_of_video|>`` ... ``<|end_of_video|>`` are a video's
        frames, the others images."""
        placeholder = input_ids == int(hf_config.image_token_id)
        opened = (input_ids == int(hf_config.video_start_token_id)).cumsum(-1)
        closed = (input_ids == int(hf_config.video_end_token_id)).cumsum(-1)
        in_video = opened > closed
        return placeholder & ~in_video, placeholder & in_video


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
    video_layout="frame_runs",
    video_fields=MediaFields("pixel_values_videos", "video_grid_thw"),
    end_of_turn="",
)
