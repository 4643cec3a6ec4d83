"""The scorer learns: ``benchmarks/selection_learning.py --quick`` end to end on the CPU, the
scorer it writes serves through ``vs-vllm serve --vision-selector``, and the full command
rebuilds the bundled demo.

Builds the synthetic ring dataset, fits a small Qwen2.5-VL on it, trains the scorer on the
frozen backbone and evaluates the strategies on held-out images (``--quick``: about 3 minutes
on 2 cores); then serves that backbone with that scorer on the real vLLM CPU engine and checks
that vLLM's greedy answers at keep 0.1 are the HF selection path's. The ``--quick`` run on a
tiny Qwen3-VL (``--family qwen3_vl``, deepstack levels) must learn too; it takes about 5 minutes
and runs with ``VS_VLLM_FULL_RUNS=1`` (CI's 45 minutes go to the families' serving checks; that
the scorer trains on Qwen3-VL stays in CI: ``test_qwen3_vl_hf.test_vs_vllm_train_on_qwen3_vl``).

The bundled demo (``demo/ring``) is built by ``scripts/build_demo.py`` from the *full* command
(about 11 minutes here in CI). Its data are checked in every run: the full command's held-out
images are the demo's, byte for byte. Its weights are checked by the full rebuild, which runs
when ``VS_VLLM_FULL_RUNS=1`` (it would take CI past its time budget): the rebuilt backbone and
scorer answer the demo's images as the bundled ones do.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.device_name import device_slug

pytestmark = pytest.mark.slow

SERVE_RATIO = 0.1
FULL_RUNS = os.environ.get("VS_VLLM_FULL_RUNS") == "1"


def _run(tmp_path_factory, *flags: str) -> tuple[Path, dict]:
    """One run of the benchmark: its work folder (data, backbone, scorer) and its CSV rows."""
    import torch

    from benchmarks.selection_learning import main

    root = tmp_path_factory.mktemp("selection-learning")
    work = root / "work"
    assert main([*flags, "--out", str(root / "results"), "--work", str(work)]) == 0
    out_dir = root / "results" / device_slug(torch.device("cpu"))
    assert (out_dir / "selection_learning.png").stat().st_size > 0
    rows = list(csv.DictReader((out_dir / "selection_learning.csv").open()))
    return work, {(r["strategy"], float(r["keep_ratio"])): r for r in rows}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    """One ``--quick`` run."""
    return _run(tmp_path_factory, "--quick")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, dict]:
    """One full run: the command ``scripts/build_demo.py`` runs."""
    return _run(tmp_path_factory)


def test_quick_run_learned_beats_random(quick_run):
    _, at = quick_run
    assert {s for s, _ in at} == {"full", "learned", "uniform", "random", "norm", "diversity"}
    assert {r for _, r in at} == {1.0, 0.1, 0.2, 0.3}
    assert all("--quick" in r["command"] for r in at.values())
    learned, random = at["learned", 0.1], at["random", 0.1]
    # The learned scorer keeps the ring's token far more often than chance, and that shows in
    # the answers: higher colour accuracy and lower answer loss than random selection.
    assert float(learned["ring_kept"]) > float(random["ring_kept"]) + 0.15
    assert float(learned["accuracy"]) > float(random["accuracy"]) + 0.05
    assert float(learned["answer_loss"]) < float(random["answer_loss"])


@pytest.fixture(scope="module")
def quick_run_qwen3_vl(tmp_path_factory) -> dict:
    """One ``--quick --family qwen3_vl`` run (tiny Qwen3-VL, 2 deepstack levels): its CSV rows.

    One torch thread: the run is then the one the thresholds below were read from (float
    reductions, hence the seeded results, depend on the thread count), and it does not slow
    to a crawl when another process shares the 2 cores (about 5 minutes either way)."""
    import torch

    from benchmarks.selection_learning import main

    root = tmp_path_factory.mktemp("selection-learning-qwen3-vl")
    argv = ["--quick", "--family", "qwen3_vl", "--threads", "1", "--out", str(root / "results")]
    threads = torch.get_num_threads()
    try:
        assert main([*argv, "--work", str(root / "work")]) == 0
    finally:
        torch.set_num_threads(threads)
    out_dir = root / "results" / device_slug(torch.device("cpu"))
    assert (out_dir / "selection_learning_qwen3_vl.png").stat().st_size > 0
    assert not (out_dir / "selection_learning.csv").exists()  # the Qwen2.5-VL name is not reused
    rows = list(csv.DictReader((out_dir / "selection_learning_qwen3_vl.csv").open()))
    return {(r["strategy"], float(r["keep_ratio"])): r for r in rows}


@pytest.mark.skipif(
    not FULL_RUNS, reason="the Qwen3-VL quick run takes ~5 min: VS_VLLM_FULL_RUNS=1"
)
def test_quick_run_qwen3_vl_learned_beats_random(quick_run_qwen3_vl):
    at = quick_run_qwen3_vl
    assert {s for s, _ in at} == {"full", "learned", "uniform", "random", "norm", "diversity"}
    assert {r for _, r in at} == {1.0, 0.1, 0.2, 0.3}
    assert all(r["family"] == "qwen3_vl" for r in at.values())
    assert all("--family qwen3_vl" in r["command"] for r in at.values())
    # The scorer selects on the main features and keeps whole rows (the deepstack levels follow
    # the kept tokens). It learns the ring's token as on Qwen2.5-VL: at keep 0.1 it keeps it far
    # more often than chance (measured 0.393 vs random 0.120).
    learned, random = at["learned", 0.1], at["random", 0.1]
    assert float(learned["ring_kept"]) > float(random["ring_kept"]) + 0.15
    # The answers show it less clearly than on Qwen2.5-VL: the quick tiny Qwen3-VL backbone
    # answers the ring's colour only 0.307 of the time with every token (chance 0.125), so
    # keeping the ring buys little. Measured at keep 0.1: accuracy 0.280 vs random 0.247 (not
    # the Qwen2.5 test's +0.05), answer loss 0.795 vs 0.805 (too close to assert). At the
    # training keep 0.2 the loss gap is clear (measured 0.535 vs 0.805).
    assert float(learned["accuracy"]) > float(random["accuracy"])
    assert float(at["learned", 0.2]["answer_loss"]) < float(at["random", 0.2]["answer_loss"]) - 0.1


def _hf_answers(work: Path) -> list[dict]:
    """Per held-out sample: the HF path's verdict at keep 0.1 with the learned scorer."""
    import json

    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from benchmarks.selection_learning import (
        COLOURS,
        QUICK,
        _encode_all,
        prepare_eval,
        score_item,
        tiny_spec,
    )
    from vs_vllm.checkpoint import load_scorer
    from vs_vllm.strategies import build_strategy

    backbone = work / "backbone"
    processor = AutoProcessor.from_pretrained(backbone)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(backbone, dtype=torch.float32)
    model.eval()
    tok = processor.tokenizer
    colour_ids = torch.tensor([tok(c, add_special_tokens=False)["input_ids"][0] for c in COLOURS])
    meta = json.loads((work / "data" / "heldout.meta.json").read_text())
    pixels = tiny_spec(QUICK).max_pixels
    encoded = _encode_all(work / "data" / "heldout.jsonl", processor, pixels)
    items = prepare_eval(model, encoded, meta)
    learned = build_strategy("learned", load_scorer(work / "scorer"))
    return [
        {
            "prompt_tokens": int(item.prompt_ids.shape[1]),
            "image_tokens": int(item.feats.shape[0]),
            "answer": item.answer,
            "exact": bool(score_item(model, item, learned, SERVE_RATIO, colour_ids)["exact"]),
        }
        for item in items
    ]


def test_trained_scorer_serves_through_vllm(quick_run, tmp_path):
    import json

    import openai
    from PIL import Image

    from vs_vllm.local_server import data_url, served
    from vs_vllm.selection import num_kept_tokens

    work, at = quick_run
    hf = _hf_answers(work)
    samples = [json.loads(line) for line in (work / "data" / "heldout.jsonl").open()]
    assert len(samples) == len(hf)

    def messages(sample: dict) -> list[dict]:
        image = Image.open(work / "data" / sample["image"]).convert("RGB")
        question = sample["conversations"][0]["value"].removeprefix("<image>\n")
        content = [
            {"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": question},
        ]
        return [{"role": "user", "content": content}]

    args = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
    args += ["--vision-selector", str(work / "scorer"), "--vision-keep-ratio", str(SERVE_RATIO)]
    args += ["--max-num-seqs", "16"]
    log = tmp_path / "server.log"
    with served(work / "backbone", *args, log=log) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        name = client.models.list().data[0].id

        def ask(sample: dict):
            return client.chat.completions.create(
                model=name, messages=messages(sample), max_tokens=8, temperature=0
            )

        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(ask, samples))
        text = log.read_text()  # while serving: vLLM logs a traceback on shutdown
    assert "Traceback" not in text
    assert "scorer loaded from standalone checkpoint" in text

    agree = 0
    for ref, reply in zip(hf, replies, strict=True):
        k = num_kept_tokens(ref["image_tokens"], SERVE_RATIO)
        # the server reserved k image positions, not N: the same prompt as the HF path's
        assert reply.usage.prompt_tokens == ref["prompt_tokens"] - ref["image_tokens"] + k
        choice = reply.choices[0]
        exact = choice.finish_reason == "stop" and choice.message.content.strip() == ref["answer"]
        agree += exact == ref["exact"]
    # vLLM and HF select the same tokens and answer the same; allow a sample or two of float
    # noise (a near-tie in the scores, or between two colours' logits).
    assert agree >= 0.95 * len(hf), f"vLLM and HF agree on {agree} of {len(hf)} held-out answers"
    served_accuracy = sum(
        r.choices[0].message.content.strip() == ref["answer"]
        for r, ref in zip(replies, hf, strict=True)
    ) / len(hf)
    assert served_accuracy > float(at["random", SERVE_RATIO]["exact_match"]) + 0.05


def _demo_verdicts(model_dir: Path, scorer_dir: Path) -> list[tuple]:
    """The HF selection path's verdicts on the bundled demo's images, in each of the demo's
    modes: (mode, image, colour right, exact answer, ring kept, answer loss)."""
    import json

    import torch

    from benchmarks.selection_learning import COLOURS, prepare_eval, score_item
    from vs_vllm.bundled_demo import DEMO_DIR, MODES
    from vs_vllm.checkpoint import load_scorer
    from vs_vllm.hf import load_hf_model
    from vs_vllm.strategies import build_strategy
    from vs_vllm.train.data import Sample, SampleEncoder

    model, processor = load_hf_model(model_dir, torch.float32)
    tok = processor.tokenizer
    colour_ids = torch.tensor([tok(c, add_special_tokens=False)["input_ids"][0] for c in COLOURS])
    items = [json.loads(x) for x in (DEMO_DIR / "questions.jsonl").read_text().splitlines()]
    encoder = SampleEncoder(processor, max_pixels=168 * 168)
    samples = [
        Sample(
            i,
            (DEMO_DIR / q["image"],),
            (("human", "<image>\n" + q["question"]), ("gpt", q["answer"])),
        )
        for i, q in enumerate(items)
    ]
    meta = [{"answer": q["answer"], "target_token": q["ring_token"]} for q in items]
    prepared = prepare_eval(model, [encoder(s) for s in samples], meta)
    scorer = load_scorer(scorer_dir)
    out = []
    for mode in MODES:
        strategy = build_strategy(mode.strategy, scorer if mode.strategy == "learned" else None)
        for q, item in zip(items, prepared, strict=True):
            r = score_item(model, item, strategy, mode.ratio, colour_ids)
            out.append((mode.name, q["image"], r["correct"], r["exact"], r["hit"], r["loss"]))
    return out


def test_demo_images_are_the_full_runs_heldout_images(tmp_path):
    """``scripts/build_demo.py`` takes the demo's images and answers from the full command's
    held-out split: drawing that split again (seeded, as the full run does) gives the bundled
    images byte for byte, with the bundled answers and ring positions."""
    import json

    from benchmarks.selection_learning import (
        DEFAULT_FAMILY,
        FAMILIES,
        RunConfig,
        split_plan,
        write_split,
    )
    from vs_vllm.bundled_demo import DEMO_DIR

    questions = [json.loads(x) for x in (DEMO_DIR / "questions.jsonl").read_text().splitlines()]
    cfg = RunConfig()
    count, turns, seed = split_plan(cfg)["heldout"]
    assert count >= len(questions)
    write_split(tmp_path, "heldout", count, cfg, seed, turns, FAMILIES[DEFAULT_FAMILY].cell)
    meta = json.loads((tmp_path / "heldout.meta.json").read_text())
    for i, q in enumerate(questions):
        bundled = DEMO_DIR / q["image"]
        assert (tmp_path / "heldout" / bundled.name).read_bytes() == bundled.read_bytes(), i
        assert (q["answer"], q["ring_token"]) == (meta[i]["answer"], meta[i]["target_token"])


@pytest.mark.skipif(not FULL_RUNS, reason="the full run takes ~11 min: VS_VLLM_FULL_RUNS=1")
def test_rebuild_answers_the_demo_like_the_bundled_model(full_run):
    """``scripts/build_demo.py`` runs this command: its held-out images are the bundled ones,
    byte for byte, and the rebuilt backbone and scorer answer them in every demo mode as the
    bundled ones do (same colour verdicts, same ring kept, answer losses within float noise)."""
    from vs_vllm.bundled_demo import DEMO_DIR

    work, at = full_run
    assert all("--quick" not in r["command"] for r in at.values())
    for image in sorted((DEMO_DIR / "images").iterdir()):
        rebuilt = work / "data" / "heldout" / image.name
        assert rebuilt.read_bytes() == image.read_bytes(), image.name
    bundled = _demo_verdicts(DEMO_DIR / "backbone", DEMO_DIR / "scorer")
    rebuilt = _demo_verdicts(work / "backbone", work / "scorer")
    assert [v[:5] for v in rebuilt] == [v[:5] for v in bundled]
    for a, b in zip(rebuilt, bundled, strict=True):
        assert a[5] == pytest.approx(b[5], rel=1e-3, abs=1e-4), a[:2]
    # the point of the demo: at keep 0.1 the trained scorer answers more of them right
    right = {m: sum(v[2] for v in bundled if v[0] == m) for m in ("learned", "random")}
    assert right["learned"] > right["random"], right
