"""Qwen2.5-VL: visual rows are the merger output (width ``out_hidden_size``), all scored; a
video is one run of tokens whose temporal position is scaled by ``second_per_grid_t *
tokens_per_second``."""

from __future__ import annotations

from vs_vllm.models.adapter import ModelAdapter, VllmClasses

_VLLM = "vllm.model_executor.models.qwen2_5_vl"

ADAPTER = ModelAdapter(
    family="qwen2_5_vl",
    vllm={
        "Qwen2_5_VLForConditionalGeneration": VllmClasses(
            model=f"{_VLLM}:Qwen2_5_VLForConditionalGeneration",
            processing_info=f"{_VLLM}:Qwen2_5_VLProcessingInfo",
            processor=f"{_VLLM}:Qwen2_5_VLMultiModalProcessor",
            dummy_inputs=f"{_VLLM}:Qwen2_5_VLDummyInputsBuilder",
        ),
    },
    hf_model={
        "Qwen2_5_VLForConditionalGeneration": "transformers:Qwen2_5_VLForConditionalGeneration",
    },
    hf_processors=("Qwen2_5_VLProcessor",),
    video_layout="one_run",
)
