"""The HF transformers selection path (``vs_vllm.hf``) on a tiny random Qwen2.5-VL (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from tiny_models.tiny_qwen import num_image_tokens, tiny_image
from vs_vllm.hf import (
    greedy_decode,
    greedy_generate,
    image_features,
    language_model_logits,
    prefill_logits,
    select_inputs,
    soft_masked_inputs,
    unpruned_positions,
)
from vs_vllm.positions import reference_positions
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.selection import num_kept_tokens
from vs_vllm.strategies import build_strategy

SIZES = {"one": [(300, 200)], "two": [(300, 200), (120, 250)]}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _prompt(processor, sizes):
    content = [{"type": "image"} for _ in sizes]
    content.append({"type": "text", "text": "Describe this image in one sentence."})
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    images = [tiny_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    return processor(text=[text], images=images, return_tensors="pt")


@pytest.fixture(scope="module")
def prompts(processor):
    return {name: _prompt(processor, sizes) for name, sizes in SIZES.items()}


def _args(inputs):
    return inputs["input_ids"], inputs


def _logits(model, selected):
    with torch.no_grad():
        return language_model_logits(model, selected.inputs_embeds, selected.position_ids)[0]


# -- 1. ratio 1.0 is plain transformers --------------------------------------------------------


@pytest.mark.parametrize("name", list(SIZES))
def test_full_ratio_matches_generate(model, processor, prompts, name):
    inputs = prompts[name]
    n_pads = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_pads == sum(num_image_tokens(w, h) for w, h in SIZES[name])
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    got = greedy_generate(model, *_args(inputs), build_strategy("norm"), 1.0, 12, eos_token_id=eos)
    assert got == expected


@pytest.mark.parametrize("name", list(SIZES))
def test_full_ratio_prefill_matches_forward(model, prompts, name):
    inputs = prompts[name]
    with torch.no_grad():
        plain = model(**inputs).logits
    got = prefill_logits(model, *_args(inputs), build_strategy("norm"), 1.0)
    torch.testing.assert_close(got, plain[0, -1], atol=1e-5, rtol=0)
    selected = select_inputs(model, *_args(inputs), build_strategy("uniform"), 1.0)
    assert torch.equal(selected.input_ids, inputs["input_ids"])
    torch.testing.assert_close(_logits(model, selected), plain[0], atol=1e-5, rtol=0)


# -- 2. pruned sequence and positions ----------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.3, (0.5, 0.2)])
def test_pruned_sequence_and_positions(model, prompts, ratio):
    inputs = prompts["two"]
    input_ids = inputs["input_ids"]
    image_id = model.config.image_token_id
    counts = [num_image_tokens(w, h) for w, h in SIZES["two"]]
    ratios = ratio if isinstance(ratio, tuple) else (ratio, ratio)
    kept = [num_kept_tokens(n, r) for n, r in zip(counts, ratios, strict=True)]
    selected = select_inputs(model, *_args(inputs), build_strategy("norm"), ratio)

    num_text = int((input_ids != image_id).sum())
    assert selected.seq_len == num_text + sum(kept)
    assert selected.input_ids.shape == (1, num_text + sum(kept))
    assert selected.position_ids.shape == (3, 1, num_text + sum(kept))
    assert selected.images.num_kept == tuple(kept)
    assert [len(k) for k in selected.kept_indices] == kept
    for idx, n in zip(selected.kept_indices, counts, strict=True):
        assert torch.all(idx[1:] > idx[:-1]) and int(idx[0]) >= 0 and int(idx[-1]) < n

    # Gather the unpruned get_rope_index positions at the kept tokens, by hand.
    mm_types = (input_ids == image_id).long()
    full, _ = model.model.get_rope_index(
        input_ids, mm_types, image_grid_thw=inputs["image_grid_thw"]
    )
    pad_seq = torch.nonzero(input_ids[0] == image_id).flatten().tolist()
    keep = [i for i in range(input_ids.shape[1]) if input_ids[0, i] != image_id]
    start = 0
    for idx, n in zip(selected.kept_indices, counts, strict=True):
        keep += [pad_seq[start + j] for j in idx.tolist()]
        start += n
    keep.sort()
    assert selected.source_indices.tolist() == keep
    assert torch.equal(selected.input_ids[0], input_ids[0, keep])
    assert torch.equal(selected.position_ids, full[:, :, keep])
    assert torch.equal(unpruned_positions(model, input_ids, inputs), full)
    assert selected.next_position == int(full.max()) + 1
    # The vLLM-side helper agrees.
    expected = reference_positions(full[:, 0], input_ids[0] == image_id, selected.kept_indices)
    assert torch.equal(selected.position_ids[:, 0], expected)


def test_decode_positions_continue_the_unpruned_timeline(model, prompts, monkeypatch):
    """Every decode step feeds one token at next_position + t on all three channels."""
    inputs = prompts["two"]
    selected = select_inputs(model, *_args(inputs), build_strategy("norm"), 0.1)
    seen = []
    real = model.model.language_model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["position_ids"].clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(model.model.language_model, "forward", spy)
    greedy_decode(model, selected, 4)
    assert torch.equal(seen[0], selected.position_ids)
    for t, pos in enumerate(seen[1:]):
        assert pos.shape == (3, 1, 1)
        assert pos.flatten().tolist() == [selected.next_position + t] * 3
    assert len(seen) == 4


# -- 3. pruning changes the result and equals a hand-built pruned prompt -----------------------


def _brute_force_pruned(model, inputs, ratio):
    """Independent construction: norm top-k per image, hand-made M-RoPE positions."""
    input_ids = inputs["input_ids"][0]
    grid = inputs["image_grid_thw"]
    merge = model.config.vision_config.spatial_merge_size
    image_id = model.config.image_token_id
    with torch.no_grad():
        x = model.model.visual(inputs["pixel_values"], grid_thw=grid).pooler_output
    embed = model.get_input_embeddings()
    rows, positions = [], []
    pos = 0  # next free position
    offset = 0  # first row of the current image in x
    image = 0
    i = 0
    while i < len(input_ids):
        if input_ids[i] != image_id:
            with torch.no_grad():
                rows.append(embed(input_ids[i : i + 1])[0])
            positions.append((pos, pos, pos))
            pos += 1
            i += 1
            continue
        _, h, w = (int(v) for v in grid[image])
        gh, gw = h // merge, w // merge
        n = gh * gw
        feats = x[offset : offset + n]
        k = max(1, int(n * ratio))
        norms = torch.linalg.vector_norm(feats, dim=-1)
        order = torch.sort(norms, descending=True, stable=True).indices[:k]
        for j in sorted(order.tolist()):
            rows.append(feats[j])
            positions.append((pos, pos + j // gw, pos + j % gw))
        pos += max(gh, gw)
        offset += n
        image += 1
        i += n
    embeds = torch.stack(rows).unsqueeze(0)
    position_ids = torch.tensor(positions, dtype=torch.int64).t().unsqueeze(1)
    return embeds, position_ids, pos


@pytest.mark.parametrize("name", list(SIZES))
def test_pruning_matches_brute_force(model, prompts, name):
    inputs = prompts[name]
    strategy = build_strategy("norm")
    pruned = prefill_logits(model, *_args(inputs), strategy, 0.1)
    full = prefill_logits(model, *_args(inputs), strategy, 1.0)
    assert (pruned - full).abs().max() > 1e-3

    embeds, position_ids, next_position = _brute_force_pruned(model, inputs, 0.1)
    selected = select_inputs(model, *_args(inputs), strategy, 0.1)
    assert torch.equal(selected.position_ids, position_ids)
    assert selected.next_position == next_position
    torch.testing.assert_close(selected.inputs_embeds, embeds, atol=0, rtol=0)
    with torch.no_grad():
        expected = language_model_logits(model, embeds, position_ids)[0]
    torch.testing.assert_close(_logits(model, selected), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pruned, expected[-1], atol=1e-5, rtol=0)


# -- 4. soft mask (training form) --------------------------------------------------------------


def test_soft_mask(model, prompts):
    inputs = prompts["two"]
    input_ids, media = _args(inputs)
    with torch.no_grad():
        plain = model(**inputs).logits[0]
        x = image_features(model, media)
    ones = torch.ones(x.shape[0])
    soft = soft_masked_inputs(model, input_ids, media, x, ones)
    assert torch.equal(soft.input_ids, input_ids)
    torch.testing.assert_close(_logits(model, soft), plain, atol=1e-5, rtol=0)

    mask = ones.clone()
    mask[::3] = 0.0
    masked = soft_masked_inputs(model, input_ids, media, x, mask)
    assert masked.seq_len == input_ids.shape[1]
    assert torch.equal(masked.position_ids, soft.position_ids)
    assert (_logits(model, masked) - plain).abs().max() > 1e-3


def test_soft_mask_is_differentiable(model, prompts):
    inputs = prompts["one"]
    input_ids, media = _args(inputs)
    with torch.no_grad():
        x = image_features(model, media)
    mask = torch.full((x.shape[0],), 0.5, requires_grad=True)
    soft = soft_masked_inputs(model, input_ids, media, x, mask)
    logits = language_model_logits(model, soft.inputs_embeds, soft.position_ids)
    logits[0, -1].logsumexp(-1).backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mask"):
        soft_masked_inputs(model, input_ids, media, x, mask[:-1])


# -- 5. strategies -----------------------------------------------------------------------------


def _expected_indices(name, feats, k, scorer):
    n = feats.shape[0]
    if name == "uniform":
        return [((2 * j + 1) * n) // (2 * k) for j in range(k)]
    scores = scorer(feats) if name == "learned" else torch.linalg.vector_norm(feats, dim=-1)
    return sorted(torch.sort(scores, descending=True, stable=True).indices[:k].tolist())


@pytest.mark.parametrize("name", ["norm", "uniform", "learned"])
def test_strategies(model, prompts, name):
    inputs = prompts["two"]
    input_ids, media = _args(inputs)
    scorer = None
    if name == "learned":
        torch.manual_seed(1)
        scorer = VisionSelectorScorer(model.config.text_config.hidden_size)
        with torch.no_grad():  # larger than the 1e-4 init so the scores are well apart
            for proj in (scorer.q_proj, scorer.k_proj):
                proj.weight.normal_(0.0, 0.1)
                proj.bias.normal_(0.0, 0.1)
    strategy = build_strategy(name, scorer)
    with torch.no_grad():
        x = image_features(model, media)
    selected = select_inputs(model, input_ids, media, strategy, 0.3)
    again = select_inputs(model, input_ids, media, strategy, 0.3, image_embeds=x)
    offset = 0
    for idx, again_idx, n in zip(
        selected.kept_indices, again.kept_indices, selected.images.num_tokens, strict=True
    ):
        k = num_kept_tokens(n, 0.3)
        with torch.no_grad():
            expected = _expected_indices(name, x[offset : offset + n], k, scorer)
        assert idx.tolist() == expected
        assert torch.equal(idx, again_idx)
        offset += n
    torch.testing.assert_close(again.inputs_embeds, selected.inputs_embeds, atol=0, rtol=0)

    tokens = greedy_generate(model, input_ids, media, strategy, 0.3, 6)
    assert len(tokens) == 6
    assert tokens == greedy_decode(model, selected, 6)
