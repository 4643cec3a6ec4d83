"""``benchmarks/quality.py``: KL / top-1 agreement / accuracy of every strategy x keep ratio
against the full-token model, on the tiny random Qwen2.5-VL (CPU, a few prompts)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from benchmarks.device_name import device_slug

STRATEGIES = ("uniform", "random", "norm", "diversity")
NUMERIC = (
    "keep_ratio",
    "visual_tokens_mean",
    "kept_tokens_mean",
    "kl",
    "kl_max",
    "top1",
    "kl_answer",
    "top1_answer",
)


def _rows(out_dir, name="quality"):
    path = out_dir / device_slug(torch.device("cpu")) / f"{name}.csv"
    assert path.is_file()
    assert (path.with_suffix(".png")).stat().st_size > 0
    return list(csv.DictReader(path.open()))


def _check_metrics(rows, labels, ratios):
    at = {(r["strategy"], float(r["keep_ratio"])): r for r in rows}
    assert len(at) == len(rows) == 1 + len(labels) * len(ratios)
    full = at["full", 1.0]
    assert float(full["kl"]) == 0.0 and float(full["top1"]) == 1.0
    for label in labels:
        for ratio in ratios:
            r = at[label, ratio]
            for key in ("kl", "kl_max", "kl_answer"):
                assert float(r[key]) >= 0.0, (label, ratio, key)
            for key in ("top1", "top1_answer"):
                assert 0.0 <= float(r[key]) <= 1.0, (label, ratio, key)
            if ratio == 1.0:
                assert float(r["kl"]) == pytest.approx(0.0, abs=1e-6), (label, r["kl"])
                assert float(r["kl_answer"]) == pytest.approx(0.0, abs=1e-6), label
                assert float(r["top1"]) == 1.0 and float(r["top1_answer"]) == 1.0, label
                assert r["kept_tokens_mean"] == r["visual_tokens_mean"]
            else:
                assert float(r["kept_tokens_mean"]) < float(r["visual_tokens_mean"])
    return at


@pytest.mark.slow
def test_tiny_generated_images(tmp_path, capsys):
    """Default model and prompts (no scorer: learned is a random scorer, labelled so)."""
    from benchmarks.quality import RANDOM_SCORER_LABEL, main

    argv = ["--samples", "3", "--ratios", "0.5,0.2,1.0", "--answer-positions", "3"]
    argv += ["--work", str(tmp_path / "work"), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    rows = _rows(tmp_path / "a")
    labels = (RANDOM_SCORER_LABEL, *STRATEGIES)
    at = _check_metrics(rows, labels, (0.5, 0.2, 1.0))
    # selection changes the distribution, more so with fewer tokens (mean over strategies)
    for ratio in (0.5, 0.2):
        assert all(float(at[s, ratio]["kl"]) > 0.0 for s in labels)
    mean_kl = {r: sum(float(at[s, r]["kl"]) for s in labels) / len(labels) for r in (0.5, 0.2)}
    assert mean_kl[0.2] > mean_kl[0.5]
    for r in rows:
        assert r["samples"] == "3"
        assert r["accuracy"] == ""  # generated prompts have no reference answers
        assert "--samples 3" in r["command"]
        assert r["model"].startswith("tiny random Qwen2.5-VL")
        assert r["scorer"].startswith("random")
    assert RANDOM_SCORER_LABEL in capsys.readouterr().out

    # deterministic: a second run writes the same numbers
    assert main([*argv, "--out", str(tmp_path / "b"), "--name", "again"]) == 0
    again = _rows(tmp_path / "b", "again")
    for first, second in zip(rows, again, strict=True):
        assert {k: first[k] for k in NUMERIC} == {k: second[k] for k in NUMERIC}


def _write_data(root, answers):
    from tiny_models.tiny_qwen import tiny_image

    lines = []
    for i, answer in enumerate(answers):
        tiny_image(140 + 28 * i, 112, seed=20 + i).save(root / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nwhat is shown?"}]
        if i == 1:  # multi-turn: the last answer is the one evaluated
            turns += [{"from": "gpt", "value": "a cat"}, {"from": "human", "value": "and?"}]
        turns.append({"from": "gpt", "value": answer})
        lines.append({"image": f"{i}.png", "conversations": turns})
    text_only = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    lines.append({"conversations": text_only})
    path = root / "held_out.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.mark.slow
def test_data_with_answers_and_scorer(tmp_path, tiny_model_dir, scorer_path):
    """--model/--data/--scorer: references set to the full model's own greedy answers, so the
    full model (and every strategy at ratio 1.0) scores accuracy 1."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from benchmarks import quality
    from vs_vllm.hf import greedy_decode, select_inputs
    from vs_vllm.strategies import build_strategy

    data = _write_data(tmp_path, ["placeholder"] * 2)
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "5"]
    args = quality.parse_args(argv)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    items, skipped = quality.data_items(model.eval(), processor, args, print)
    assert skipped == 1 and len(items) == 2
    answers = []
    for item in items:
        inputs = select_inputs(
            model,
            item.prompt_ids,
            {"image_grid_thw": item.grid_thw},
            build_strategy("norm"),
            1.0,
            image_embeds=item.feats,
        )
        tokens = greedy_decode(model, inputs, 5, eos_token_id=model.generation_config.eos_token_id)
        answers.append(processor.tokenizer.decode(tokens, skip_special_tokens=True))
    _write_data(tmp_path, answers)

    argv += ["--scorer", str(scorer_path), "--ratios", "0.3,1.0", "--answer-positions", "2"]
    assert quality.main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    rows = _rows(tmp_path / "out")
    at = _check_metrics(rows, ("learned", *STRATEGIES), (0.3, 1.0))
    assert float(at["full", 1.0]["accuracy"]) == 1.0
    for label in ("learned", *STRATEGIES):
        assert float(at[label, 1.0]["accuracy"]) == 1.0
        assert 0.0 <= float(at[label, 0.3]["accuracy"]) <= 1.0
    for r in rows:
        assert r["samples"] == "2" and r["scorer"] == str(scorer_path)
        assert r["model"] == str(tiny_model_dir) and r["data"] == str(data)


def test_kl_matches_torch():
    from benchmarks.quality import kl_and_agreement

    gen = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(3, 50, generator=gen, dtype=torch.float64), -1)
    got = torch.log_softmax(torch.randn(3, 50, generator=gen, dtype=torch.float64), -1)
    kl, agree = kl_and_agreement(ref, got)
    expected = torch.nn.functional.kl_div(got, ref, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected)
    assert agree.tolist() == (ref.argmax(-1) == got.argmax(-1)).double().tolist()
    kl_same, agree_same = kl_and_agreement(ref, ref)
    assert kl_same.tolist() == [0.0] * 3 and agree_same.tolist() == [1.0] * 3


def test_refuses_a_bad_name(capsys):
    """``--name`` is a plain file stem (``benchmarks/results_name.py``), checked before any work."""
    from benchmarks import quality

    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--name", "../escape"])
    assert exit_info.value.code == 2
    assert "plain file stem" in capsys.readouterr().err
