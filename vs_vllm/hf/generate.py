"""Running a transformers VL model's language model on :class:`SelectedInputs`.

The text model is called directly with ``inputs_embeds`` and explicit ``position_ids`` of
shape (3, 1, L) (M-RoPE t, h, w), never through ``generate()``'s ``rope_deltas`` logic, so
a pruned prompt keeps its gathered unpruned positions and decoding continues on the unpruned
timeline. (transformers 5.x also accepts (4, B, L) with a leading *text* position row, used
to detect packed sequences for the attention mask; gapped positions there would be taken
for packed sequences, so the 3-row form is the one to use.)

Batch size 1, greedy decoding with the KV cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from vs_vllm.hf.inputs import SelectedInputs, select_inputs
from vs_vllm.strategies import SelectionStrategy

__all__ = [
    "greedy_decode",
    "greedy_decode_logprobs",
    "greedy_generate",
    "language_model_logits",
    "prefill_logits",
]


def language_model_logits(
    model: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    past_key_values: DynamicCache | None = None,
    last_only: bool = False,
    text_kwargs: dict | None = None,
) -> torch.Tensor:
    """Logits (B, L, V) (or (B, 1, V) with ``last_only``) of the text model + ``lm_head``.

    ``position_ids`` is (3, B, L) (M-RoPE) or (1, B, L) (1-D). With ``past_key_values`` the
    cache is extended in place
    (and ``inputs_embeds`` continues the cached sequence). ``text_kwargs`` are the extra
    text-model arguments of the visual tokens (``SelectedInputs.text_kwargs``, from the
    adapter's ``hf_text_kwargs``, e.g. deepstack levels). Differentiable (training)."""
    if position_ids.dim() != 3 or position_ids.shape[0] not in (1, 3):
        raise ValueError(
            f"expected (3, B, L) M-RoPE or (1, B, L) position_ids, got {tuple(position_ids.shape)}"
        )
    if position_ids.shape[1:] != inputs_embeds.shape[:2]:
        raise ValueError(
            f"position_ids {tuple(position_ids.shape)} do not match inputs_embeds "
            f"{tuple(inputs_embeds.shape)}"
        )
    out = model.model.language_model(
        inputs_embeds=inputs_embeds,
        position_ids=position_ids if position_ids.shape[0] == 3 else position_ids[0],
        past_key_values=past_key_values,
        use_cache=past_key_values is not None,
        **(text_kwargs or {}),
    )
    hidden = out.last_hidden_state
    if last_only:
        hidden = hidden[:, -1:]
    return model.lm_head(hidden)


@torch.no_grad()
def prefill_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    media: Mapping[str, Any] | None,
    strategy: SelectionStrategy,
    keep_ratio: float | Sequence[float] = 1.0,
) -> torch.Tensor:
    """(V,) logits at the last prompt position after selection."""
    inputs = select_inputs(model, input_ids, media, strategy, keep_ratio)
    logits = language_model_logits(
        model,
        inputs.inputs_embeds,
        inputs.position_ids,
        last_only=True,
        text_kwargs=inputs.text_kwargs,
    )
    return logits[0, -1]


def _stop_ids(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset({eos_token_id})
    return frozenset(int(t) for t in eos_token_id)


@torch.no_grad()
def greedy_decode_logprobs(
    model: torch.nn.Module,
    inputs: SelectedInputs,
    max_new_tokens: int,
    *,
    eos_token_id: int | Sequence[int] | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy tokens after the prompt ``inputs`` and the float32 log-probability of each
    (what vLLM reports with ``logprobs=1`` for a greedy request): prefill once, then one token
    per step.

    The t-th generated token (from 0) is fed back at position ``inputs.next_position + t`` on
    all three M-RoPE channels. Stops after ``max_new_tokens`` or right after a token in
    ``eos_token_id`` (included in the result) when given."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stop = _stop_ids(eos_token_id)
    cache = DynamicCache(config=model.config.get_text_config())
    logits = language_model_logits(
        model,
        inputs.inputs_embeds,
        inputs.position_ids,
        past_key_values=cache,
        last_only=True,
        text_kwargs=inputs.text_kwargs,
    )
    embed = model.get_input_embeddings()
    device = inputs.inputs_embeds.device
    tokens: list[int] = []
    logprobs: list[float] = []
    while True:
        last = logits[0, -1].float()
        token = int(last.argmax())  # ok-sync: HF greedy decode
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(last, dim=-1)[token]))  # ok-sync: HF greedy decode
        if token in stop or len(tokens) == max_new_tokens:
            return tokens, logprobs
        position = inputs.next_position + len(tokens) - 1
        rows = inputs.position_ids.shape[0]
        position_ids = torch.full((rows, 1, 1), position, dtype=torch.int64, device=device)
        token_embeds = embed(torch.tensor([[token]], dtype=torch.int64, device=device))
        logits = language_model_logits(
            model, token_embeds, position_ids, past_key_values=cache, last_only=True
        )


def greedy_decode(
    model: torch.nn.Module,
    inputs: SelectedInputs,
    max_new_tokens: int,
    *,
    eos_token_id: int | Sequence[int] | None = None,
) -> list[int]:
    """Greedy tokens after the prompt ``inputs`` (see :func:`greedy_decode_logprobs`)."""
    return greedy_decode_logprobs(model, inputs, max_new_tokens, eos_token_id=eos_token_id)[0]


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    media: Mapping[str, Any] | None,
    strategy: SelectionStrategy,
    keep_ratio: float | Sequence[float] = 1.0,
    max_new_tokens: int = 16,
    *,
    eos_token_id: int | Sequence[int] | None = None,
) -> list[int]:
    """Select, prefill and decode greedily: the generated token ids (prompt excluded).

    Equals ``model.generate(..., do_sample=False)`` at ratio 1.0 (pass the model's
    ``eos_token_id`` to stop where generate stops)."""
    inputs = select_inputs(model, input_ids, media, strategy, keep_ratio)
    return greedy_decode(model, inputs, max_new_tokens, eos_token_id=eos_token_id)
