"""Qwen3-VL, and Qwen3-VL-MoE and Qwen3.5 (dense and MoE), which share its vision side.

* **Visual rows** are ``[main | deepstack level 1 | ... | level L]``, width ``D * (1 + L)``
  with ``D = out_hidden_size`` (vLLM's ``Qwen3VLForConditionalGeneration`` returns them so,
  and splits them again after the encoder cache). Selection scores the main D columns and
  gathers whole rows, so each kept token's deepstack features follow it into the decoder
  layers they are added to.
* **M-RoPE**: an image is laid out exactly as in Qwen2.5-VL (t = 0, rows, columns; the text
  after it continues at ``max(H', W')``). A video is one run per frame, each frame preceded by
  its timestamp text and laid out like an image (``video_layout="frame_runs"``).
* **HF reference**: transformers' ``get_image_features`` returns the main rows and the
  deepstack levels separately; the text model takes the levels as ``deepstack_visual_embeds``
  with ``visual_pos_masks`` (where the visual tokens are in the sequence).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vs_vllm.models.adapter import ModelAdapter, VllmClasses

_QWEN3_VL = "vllm.model_executor.models.qwen3_vl"
_PROCESSOR = f"{_QWEN3_VL}:Qwen3VLMultiModalProcessor"
_DUMMY = f"{_QWEN3_VL}:Qwen3VLDummyInputsBuilder"


def _vllm(module: str, model: str, info: str) -> VllmClasses:
    base = f"vllm.model_executor.models.{module}"
    return VllmClasses(f"{base}:{model}", f"{base}:{info}", _PROCESSOR, _DUMMY)


@dataclass(frozen=True)
class Qwen3VLAdapter(ModelAdapter):
    def deepstack_levels(self, hf_config: Any) -> int:
        return len(getattr(hf_config.vision_config, "deepstack_visual_indexes", None) or ())

    def row_width(self, hf_config: Any) -> int:
        return self.score_width(hf_config) * (1 + self.deepstack_levels(hf_config))

    def hf_visual_rows(self, model: torch.nn.Module, media: Mapping[str, Any]) -> torch.Tensor:
        return self._rows(self.hf_tower_output(model, media, "image"))

    def hf_video_rows(self, model: torch.nn.Module, media: Mapping[str, Any]) -> torch.Tensor:
        return self._rows(self.hf_tower_output(model, media, "video"))

    @staticmethod
    def _rows(out: Any) -> torch.Tensor:
        main = torch.cat(tuple(out.pooler_output), dim=0)
        levels = [torch.cat(tuple(level), dim=0) for level in (out.deepstack_features or ())]
        return torch.cat([main, *levels], dim=1) if levels else main

    def hf_text_kwargs(
        self, model: torch.nn.Module, rows: torch.Tensor, visual_mask: torch.Tensor
    ) -> dict[str, Any]:
        levels = self.deepstack_levels(model.config)
        if not levels:
            return {}
        d = self.score_width(model.config)
        if rows.shape[1] != d * (1 + levels):
            raise ValueError(
                f"expected visual rows of width {d * (1 + levels)} ({levels} deepstack levels), "
                f"got {rows.shape[1]}"
            )
        return {
            "visual_pos_masks": visual_mask,
            "deepstack_visual_embeds": [rows[:, d * (i + 1) : d * (i + 2)] for i in range(levels)],
        }


ADAPTER = Qwen3VLAdapter(
    family="qwen3_vl",
    vllm={
        "Qwen3VLForConditionalGeneration": _vllm(
            "qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessingInfo"
        ),
        "Qwen3VLMoeForConditionalGeneration": _vllm(
            "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeProcessingInfo"
        ),
        "Qwen3_5ForConditionalGeneration": _vllm(
            "qwen3_5", "Qwen3_5ForConditionalGeneration", "Qwen3_5ProcessingInfo"
        ),
        "Qwen3_5MoeForConditionalGeneration": _vllm(
            "qwen3_5", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeProcessingInfo"
        ),
    },
    hf_model={
        "Qwen3VLForConditionalGeneration": "transformers:Qwen3VLForConditionalGeneration",
        "Qwen3VLMoeForConditionalGeneration": "transformers:Qwen3VLMoeForConditionalGeneration",
        "Qwen3_5ForConditionalGeneration": "transformers:Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForConditionalGeneration": "transformers:Qwen3_5MoeForConditionalGeneration",
    },
    hf_processors=("Qwen3VLProcessor",),
    video_layout="frame_runs",
)
