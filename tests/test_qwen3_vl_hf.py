"""Qwen3-VL through the adapter on the HF transformers path (no vLLM engine): deepstack rows,
the selection reference, the soft mask of training, and ``vs-vllm train``.

The tiny Qwen3-VL has deepstack on 2 levels: its visual rows are ``[main | level 1 | level 2]``.
"""

from __future__ import annotations

import pytest
import torch

from tiny_models.tiny_qwen3_vl import build_tiny_qwen3_vl, tiny_image
from vs_vllm.hf import (
    image_features,
    language_model_logits,
    load_hf_model,
    masked_rows,
    select_inputs,
    soft_masked_inputs,
    visual_inputs,
)
from vs_vllm.models import adapter_for
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.strategies import build_strategy

D = 64


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl-hf"))


@pytest.fixture(scope="module")
def model_and_processor(qwen3_dir):
    return load_hf_model(qwen3_dir)


@pytest.fixture(scope="module")
def two_images(model_and_processor):
    _, processor = model_and_processor
    images = [tiny_image(300, 200, seed=0), tiny_image(120, 250, seed=1)]
    pads = "<|vision_start|><|image_pad|><|vision_end|>"
    text = f"<|im_start|>user\n{pads}{pads}compare<|im_end|>\n<|im_start|>assistant\n"
    return processor(text=[text], images=images, return_tensors="pt")


def test_visual_rows_are_main_then_deepstack_levels(model_and_processor, two_images):
    model, _ = model_and_processor
    with torch.no_grad():
        rows = image_features(model, two_images)
        out = model.model.get_image_features(
            two_images["pixel_values"], two_images["image_grid_thw"], return_dict=True
        )
    assert rows.shape == (int(two_images["image_grid_thw"].prod(-1).sum()) // 4, 3 * D)
    torch.testing.assert_close(rows[:, :D], torch.cat(out.pooler_output), rtol=0, atol=0)
    for level, feats in enumerate(out.deepstack_features):
        torch.testing.assert_close(
            rows[:, D * (level + 1) : D * (level + 2)], torch.cat(feats), rtol=0, atol=0
        )


def test_ratio_one_equals_transformers_forward(model_and_processor, two_images):
    """At keep 1.0 the reference path (main rows in inputs_embeds, levels as
    deepstack_visual_embeds, get_rope_index positions) is transformers' own forward."""
    model, _ = model_and_processor
    strategy = build_strategy("norm")
    with torch.no_grad():
        plain = model(**two_images).logits[0]
        ours = select_inputs(
            model,
            two_images["input_ids"],
            two_images,
            strategy,
            1.0,
        )
        logits = language_model_logits(
            model, ours.inputs_embeds, ours.position_ids, text_kwargs=ours.text_kwargs
        )[0]
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-5)


def test_pruned_prompt_gathers_every_level_at_the_kept_tokens(model_and_processor, two_images):
    model, _ = model_and_processor
    with torch.no_grad():
        rows = image_features(model, two_images)
        pruned = select_inputs(
            model,
            two_images["input_ids"],
            {"image_grid_thw": two_images["image_grid_thw"]},
            build_strategy("norm"),
            0.3,
            image_embeds=rows,
        )
    offsets = [0, pruned.images.num_tokens[0]]
    kept_rows = torch.cat([rows[o + k] for o, k in zip(offsets, pruned.kept_indices, strict=True)])
    levels = pruned.text_kwargs["deepstack_visual_embeds"]
    assert len(levels) == 2
    for level, embeds in enumerate(levels):
        torch.testing.assert_close(embeds, kept_rows[:, D * (level + 1) : D * (level + 2)])
    mask = pruned.text_kwargs["visual_pos_masks"]
    assert int(mask.sum()) == sum(pruned.images.num_kept)
    # Norm scores only the main D columns: the kept tokens are the top-k main-feature norms.
    first = rows[: offsets[1], :D].norm(dim=-1)
    k = pruned.images.num_kept[0]
    top = torch.sort(torch.topk(first, k).indices).values
    assert torch.equal(pruned.kept_indices[0], top)


def test_soft_mask_scales_main_and_every_level(model_and_processor, two_images):
    model, _ = model_and_processor
    ids = two_images["input_ids"]
    with torch.no_grad():
        rows = image_features(model, two_images)
        plain = model(**two_images).logits[0]
    mask = torch.rand(rows.shape[0], generator=torch.Generator().manual_seed(0))
    embeds, kwargs = visual_inputs(model, ids, masked_rows(rows, mask))
    is_image = ids[0] == adapter_for(model.config).token_ids(model.config).image
    torch.testing.assert_close(embeds[0, is_image], rows[:, :D] * mask[:, None])
    for level, level_rows in enumerate(kwargs["deepstack_visual_embeds"]):
        want = rows[:, D * (level + 1) : D * (level + 2)] * mask[:, None]
        torch.testing.assert_close(level_rows, want)
    ones = soft_masked_inputs(model, ids, two_images, rows, torch.ones(rows.shape[0]))
    with torch.no_grad():
        logits = language_model_logits(
            model, ones.inputs_embeds, ones.position_ids, text_kwargs=ones.text_kwargs
        )[0]
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_vs_vllm_train_on_qwen3_vl(qwen3_dir, tiny_training_set, tmp_path):
    """``vs-vllm train --model <Qwen3-VL dir>``: the scorer trains on the main D columns,
    only it moves, and it is saved with the model's hidden size."""
    from vs_vllm.checkpoint import load_scorer, read_scorer_metadata
    from vs_vllm.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(qwen3_dir),
            "--data",
            str(tiny_training_set),
            "--image-root",
            str(tiny_training_set.parent),
            "--out",
            str(out),
            "--keep-ratio",
            "0.3",
            "--max-steps",
            "2",
            "--global-batch",
            "2",
            "--micro-batch",
            "2",
            "--lr",
            "1e-2",
            "--no-progress",
        ]
    )
    assert code == 0
    path = out / "vision_selector.safetensors"
    trained = load_scorer(path, D).state_dict()
    assert read_scorer_metadata(path)["hidden_size"] == D
    torch.manual_seed(0)  # the trainer's initial scorer (--seed 0): every weight moved
    initial = VisionSelectorScorer(D).state_dict()
    assert all(not torch.equal(trained[k], initial[k].to(trained[k].dtype)) for k in initial)
