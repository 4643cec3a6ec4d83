"""VisionSelector on HF transformers' model classes (any family a model adapter covers):
the reference the vLLM path is tested against.

:func:`select_inputs` builds the pruned prompt (same selection, same positions as the vLLM
plugin), :func:`greedy_generate` decodes it, :func:`soft_masked_inputs` is the training form
(every token kept, image rows scaled by a soft mask).
"""

from vs_vllm.hf.generate import (
    greedy_decode,
    greedy_decode_logprobs,
    greedy_generate,
    language_model_logits,
    prefill_logits,
)
from vs_vllm.hf.inputs import (
    SelectedInputs,
    image_features,
    image_token_counts,
    masked_rows,
    model_adapter,
    select_inputs,
    soft_masked_inputs,
    unpruned_positions,
    visual_inputs,
)
from vs_vllm.hf.load import load_hf_model

__all__ = [
    "SelectedInputs",
    "greedy_decode",
    "greedy_decode_logprobs",
    "greedy_generate",
    "image_features",
    "image_token_counts",
    "language_model_logits",
    "load_hf_model",
    "masked_rows",
    "model_adapter",
    "prefill_logits",
    "select_inputs",
    "soft_masked_inputs",
    "unpruned_positions",
    "visual_inputs",
]
