"""Families beyond Qwen, served with selection on the real vLLM CPU engine (float32).

One module for every non-Qwen family (they share this harness): per family, one engine with
selection (the learned strategy, per-request ratios, chunked prefill at 16 tokens) and one
stock engine (``VLLM_PLUGINS=""``). Checked on each:

* the prompt holds k placeholders per image (k = max(1, int(N * r)), one top-k over all of
  an image's tokens), the wrapper tokens around them unchanged;
* greedy tokens and logprobs equal the HF reference path (``vs_vllm.hf``: the family's
  transformers class, the same selection) for one image, two sizes and image-text-image, at
  ratios 1.0 / 0.5 / 0.1 and the server's default;
* at ratio 1.0 the outputs equal stock vLLM's.

GLM-4.1V / 4.5V also serve videos with per-frame selection (``--video-keep-ratio`` with
``--video-selection per-frame``: each frame is a placeholder run of the *image* token after
its timestamp text): k per frame, equal to the HF path at video ratios 1.0 / 0.5 / 0.1, after
an image and at the server's default; the video at 1.0 equals stock vLLM.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.harness import chat_image, hf_inputs, run_engine, selector_overrides
from tests.engine.runner import IMAGE, VIDEO

pytestmark = pytest.mark.slow

ONE = [[300, 200, 0]]
TWO = [[300, 200, 0], [120, 250, 1]]
AROUND = [[200, 300, 2], [64, 64, 3]]
RATIOS = (1.0, 0.5, 0.1)
REQUESTS = [
    *({"images": ONE, "content": [IMAGE, "describe the picture"], "ratio": r} for r in RATIOS),
    *({"images": TWO, "content": [IMAGE, IMAGE, "compare them"], "ratio": r} for r in RATIOS),
    *({"images": AROUND, "content": [IMAGE, "left or", IMAGE], "ratio": r} for r in RATIOS),
    {"images": ONE, "content": [IMAGE, "describe the picture"], "ratio": None},
]
SERVER_RATIO = 0.3
MAX_TOKENS = 6
# [frames, width, height, seed]: 4 frames of 168x112 -> grid (2, 8, 12): 2 frame runs of 24.
SHORT = [4, 168, 112, 0]
LONG = [6, 224, 112, 1]  # grid (3, 8, 16): 3 frame runs of 32
VIDEO_REQUESTS = [
    *(
        {"images": [], "videos": [SHORT], "content": [VIDEO, "what happens?"], "video_ratio": r}
        # "ratio" 1.0 with the video at 1.0: a request of the stock comparison
        | {"ratio": 1.0 if r == 1.0 else None}
        for r in RATIOS
    ),
    {
        "images": ONE,
        "videos": [SHORT],
        "content": [IMAGE, VIDEO, "and now?"],
        "ratio": 0.3,
        "video_ratio": 0.2,
    },
    {"images": [], "videos": [LONG], "content": [VIDEO, "what then?"], "ratio": None},
]
SERVER_VIDEO_RATIO = 0.25


def _build_internvl(path):
    from tiny_models.tiny_internvl import build_tiny_internvl

    return build_tiny_internvl(path)


def _build_glm4v(path):
    from tiny_models.tiny_glm4v import build_tiny_glm4v

    return build_tiny_glm4v(path)


def _build_glm4v_moe(path):
    from tiny_models.tiny_glm4v import build_tiny_glm4v

    return build_tiny_glm4v(path, moe=True)


FAMILIES = {"internvl": _build_internvl, "glm4v": _build_glm4v, "glm4v_moe": _build_glm4v_moe}
# Families whose videos are selected (per frame), with their requests and server settings.
VIDEO_SELECTED = ("glm4v", "glm4v_moe")
VIDEO_SETTINGS = {"video_keep_ratio": SERVER_VIDEO_RATIO, "video_selection": "per-frame"}
# vLLM's GLM-4.1V processing takes at most one video per prompt.
VIDEO_LIMITS = {"limit_mm_per_prompt": {"image": 3, "video": 1}}


def requests_of(name: str) -> list[dict]:
    return REQUESTS + (VIDEO_REQUESTS if name in VIDEO_SELECTED else [])


# The MoE variant shares the dense one's adapter, processor and vision side: its stock-vLLM
# comparison is the dense one's (CI time); its selecting engine still equals the HF path.
STOCK_COMPARED = ("internvl", "glm4v")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    """A family's name and tiny model (random weights, local tokenizer, built here)."""
    return request.param, FAMILIES[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def family(family_dir, tmp_path_factory, scorer_path):
    """A family's tiny model, its selecting engine's results and its stock engine's."""
    name, model_dir = family_dir
    videos = name in VIDEO_SELECTED
    limits = VIDEO_LIMITS if videos else {}
    chunked = {"enable_chunked_prefill": True, "max_num_batched_tokens": 16, **limits}
    settings = {"keep_ratio": SERVER_RATIO, **(VIDEO_SETTINGS if videos else {})}
    selecting = run_engine(
        tmp_path_factory.mktemp(f"{name}-selecting"),
        {
            "model": str(model_dir),
            "hf_overrides": selector_overrides(scorer_path, **settings),
            "requests": requests_of(name),
            "max_tokens": MAX_TOKENS,
            "llm_kwargs": chunked,
        },
    )
    full = [r for r in requests_of(name) if r["ratio"] == 1.0]
    stock = None
    if name in STOCK_COMPARED:
        # Stock vLLM, and vs-vllm installed but started without its flags (the same requests
        # without any ratio): both must give the same outputs.
        plain = [{k: v for k, v in r.items() if "ratio" not in k} for r in full]
        stock = {
            kind: run_engine(
                tmp_path_factory.mktemp(f"{name}-{kind}"),
                {
                    "model": str(model_dir),
                    "requests": requests,
                    "max_tokens": MAX_TOKENS,
                    "llm_kwargs": limits,
                },
                plugins=kind == "without-flags",
            )
            for kind, requests in (("stock", full), ("without-flags", plain))
        }
    return name, model_dir, selecting, stock


@pytest.fixture(scope="module")
def hf_model(family):
    from vs_vllm.hf import load_hf_model

    _, model_dir, _, _ = family
    return load_hf_model(model_dir)


def test_prompts_reserve_k_per_image_and_keep_the_wrappers(family, hf_model):
    from vs_vllm.keep_ratio import num_kept_tokens, video_kept_tokens
    from vs_vllm.models import adapter_for

    name, _, selecting, _ = family
    model, processor = hf_model
    adapter = adapter_for(model.config)
    ids = adapter.token_ids(model.config)
    media = {ids.image, ids.video}
    merge = adapter.merge_size(model.config)
    for request, result in zip(requests_of(name), selecting["results"], strict=True):
        hf = hf_inputs(processor, request)
        full = hf["input_ids"][0].tolist()
        got = result["prompt_token_ids"]
        ratio = SERVER_RATIO if request["ratio"] is None else request["ratio"]
        grids = adapter.item_grids(model.config, hf, "image")
        n = sum(adapter.tokens_per_item(g, merge) for g in grids)
        k = sum(num_kept_tokens(adapter.tokens_per_item(g, merge), ratio) for g in grids)
        video_ratio = request.get("video_ratio") or SERVER_VIDEO_RATIO
        for t, h, w in adapter.item_grids(model.config, hf, "video"):
            per_frame = h * w // merge**2
            n += t * per_frame
            k += video_kept_tokens(t, per_frame, video_ratio, per_frame=True)
        assert len(got) == len(full) - n + k, request
        # The same text, wrapper and timestamp tokens, in the same order.
        assert [t for t in got if t not in media] == [t for t in full if t not in media]


def test_greedy_tokens_and_logprobs_equal_the_hf_path(family, hf_model, scorer_path):
    from vs_vllm.checkpoint import load_scorer
    from vs_vllm.hf import greedy_decode_logprobs, select_inputs
    from vs_vllm.strategies import build_strategy

    name, _, selecting, _ = family
    model, processor = hf_model
    strategy = build_strategy("learned", load_scorer(scorer_path, 64))
    for request, result in zip(requests_of(name), selecting["results"], strict=True):
        hf = hf_inputs(processor, request)
        ratio = SERVER_RATIO if request["ratio"] is None else request["ratio"]
        inputs = select_inputs(
            model,
            hf["input_ids"],
            hf,
            strategy,
            ratio,
            video_keep_ratio=request.get("video_ratio") or SERVER_VIDEO_RATIO,
            video_selection="per-frame",
        )
        assert inputs.input_ids[0].tolist() == result["prompt_token_ids"], request
        tokens, logprobs = greedy_decode_logprobs(model, inputs, len(result["token_ids"]))
        assert tokens == result["token_ids"], request
        torch.testing.assert_close(logprobs, result["logprobs"], rtol=0, atol=2e-4)


def _assert_same_outputs(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a["prompt_token_ids"] == b["prompt_token_ids"]
        assert a["token_ids"] == b["token_ids"]
        torch.testing.assert_close(a["logprobs"], b["logprobs"], rtol=0, atol=1e-4)


def test_ratio_one_equals_stock_vllm(family):
    name, _, selecting, stock = family
    if stock is None:
        pytest.skip(f"{name}: compared with stock vLLM through its dense variant (CI time)")
    at_one = [
        res
        for req, res in zip(requests_of(name), selecting["results"], strict=True)
        if req["ratio"] == 1.0
    ]
    assert len(at_one) == 3 + (name in VIDEO_SELECTED)
    _assert_same_outputs(at_one, stock["stock"]["results"])


def test_without_the_flags_equals_stock_vllm(family):
    """vs-vllm installed (its selecting class registered under vLLM's name) but started
    without ``--vision-keep-ratio``: the outputs are stock vLLM's."""
    name, _, _, stock = family
    if stock is None:
        pytest.skip(f"{name}: compared with stock vLLM through its dense variant (CI time)")
    assert stock["without-flags"]["results"] == stock["stock"]["results"]  # logprobs included


def test_vs_vllm_train_two_steps(family_dir, tiny_training_set, tmp_path):
    """``vs-vllm train`` on the family: the training data is rendered with its chat template
    and end-of-turn, the frozen backbone sees the soft-masked rows, only the scorer moves,
    and it is saved with the model's hidden size."""
    from vs_vllm.checkpoint import load_scorer, read_scorer_metadata
    from vs_vllm.cli import main
    from vs_vllm.scorer import VisionSelectorScorer

    _, model_dir = family_dir
    out = tmp_path / "run"
    flags = {
        "--model": model_dir,
        "--data": tiny_training_set,
        "--image-root": tiny_training_set.parent,
        "--out": out,
        "--keep-ratio": 0.3,
        "--max-steps": 2,
        "--global-batch": 2,
        "--micro-batch": 2,
        "--lr": 1e-2,
    }
    assert main(["train", *(str(x) for kv in flags.items() for x in kv), "--no-progress"]) == 0
    path = out / "vision_selector.safetensors"
    assert read_scorer_metadata(path)["hidden_size"] == 64
    trained = load_scorer(path, 64).state_dict()
    torch.manual_seed(0)  # the trainer's initial scorer (--seed 0)
    initial = VisionSelectorScorer(64).state_dict()
    assert trained.keys() == initial.keys()
    assert all(not torch.equal(trained[k], initial[k].to(trained[k].dtype)) for k in trained)


def test_a_video_of_a_family_without_video_fields_is_refused_with_one_line(tmp_path, monkeypatch):
    """An M-RoPE family whose adapter declares no video fields cannot place a video's kept
    tokens: the selecting processor refuses the request with one clear error (a 400 from the
    server, not a dead engine). Shown on GLM-4.1V's processor with its adapter's video fields
    taken away; with them the same video is processed, with k placeholders per frame."""
    import dataclasses

    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.plugins import load_general_plugins

    from tiny_models.tiny_glm4v import build_tiny_glm4v, tiny_video, vllm_video_metadata

    model_dir = build_tiny_glm4v(tmp_path / "glm4v")
    load_general_plugins()
    settings = {"keep_ratio": 0.3, "strategy": "norm", **VIDEO_SETTINGS}

    def process(overrides, drop_video_fields=False):
        config = ModelConfig(
            model=str(model_dir), dtype="float32", max_model_len=2048, hf_overrides=overrides
        )
        proc = MULTIMODAL_REGISTRY.create_processor(config)
        if drop_video_fields:
            adapter = dataclasses.replace(proc.vs_adapter, video_fields=None)
            monkeypatch.setattr(proc, "vs_adapter", adapter)
        tok = proc.info.get_tokenizer()
        ids = tok.encode("<|user|>\n<|begin_of_video|><|video|><|end_of_video|>hi<|assistant|>\n")
        video = (tiny_video(4, 168, 112), vllm_video_metadata(4))
        items = proc.info.parse_mm_data({"video": [video]})
        out = proc.apply(ProcessorInputs(prompt=ids, mm_data_items=items), TimingContext())
        image_id = proc.vs_adapter.token_ids(proc.info.get_hf_config()).image
        return out["prompt_token_ids"].count(image_id)

    # grid (2, 8, 12): 2 frames of 24 tokens; per frame k = int(24 * 0.25) = 6
    assert process({}) == 48
    assert process({"vision_selector": settings}) == 12
    with pytest.raises(ValueError, match="glm4v videos are not served with vision token"):
        process({"vision_selector": settings}, drop_video_fields=True)


# -- the OpenAI server, tensor parallel 2 -------------------------------------------------

SERVED = ("internvl", "glm4v")  # the MoE variant shares the dense one's serving path


@pytest.fixture(scope="module")
def tp2_server(family, scorer_path, tmp_path_factory):
    """``vs-vllm serve`` with TP=2 (one core per rank) and per-request ratios: per request of
    the selecting engine with one image, the server's prompt tokens and greedy answer; then a
    bad ratio (its status and message) and one more good request."""
    import openai

    from tests.engine.harness import TP2_ENV
    from vs_vllm.local_server import TINY_MODEL_SERVE_ARGS, served

    name, model_dir, selecting, _ = family
    if name not in SERVED:
        pytest.skip(f"{name}: served through its dense variant's server (CI time)")
    args = [
        *TINY_MODEL_SERVE_ARGS,
        "--vision-keep-ratio",
        str(SERVER_RATIO),
        "--vision-selector",
        str(scorer_path),
        "--trust-request-mm-kwargs",
        "--tensor-parallel-size",
        "2",
    ]
    log = tmp_path_factory.mktemp(f"{name}-server") / "server.log"
    cases = [(r, res) for r, res in zip(REQUESTS, selecting["results"], strict=False)]
    cases = [(r, res) for r, res in cases if r["images"] == ONE]
    answers, bad = [], []
    with served(model_dir, *args, log=log, extra_env=TP2_ENV) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        model = client.models.list().data[0].id

        def chat(ratio):
            return chat_image(client, model, ONE[0], ratio, max_tokens=MAX_TOKENS)

        for request, _ in cases:
            resp = chat(request["ratio"])
            answers.append((resp.prompt_token_ids, resp.choices[0].token_ids))
        for ratio in (0, 1.5):
            try:
                chat(ratio)
                bad.append((200, ""))
            except openai.BadRequestError as err:
                bad.append((err.status_code, str(err)))
        after = chat(0.1)
        after = (after.prompt_token_ids, after.choices[0].token_ids)
    return cases, answers, bad, after


def test_tp2_server_answers_as_the_offline_engine(tp2_server):
    """Per-request ratios through the OpenAI server on two ranks (its own chat rendering of
    an image_url part): the same prompt tokens and the same greedy tokens as the
    single-process engine (and so as the HF path)."""
    cases, answers, _, _ = tp2_server
    for (request, result), (prompt_ids, token_ids) in zip(cases, answers, strict=True):
        assert list(prompt_ids) == result["prompt_token_ids"], request
        assert list(token_ids) == result["token_ids"], request


def test_tp2_server_bad_ratio_400_and_keeps_serving(tp2_server):
    cases, answers, bad, after = tp2_server
    for status, message in bad:
        assert status == 400 and "vision_keep_ratio" in message
    at = [r["ratio"] for r, _ in cases].index(0.1)
    assert after == answers[at]


def test_budgets_follow_k_through_vllms_dummy_inputs(family_dir):
    """InternVL and GLM give vLLM no per-item maximum (``get_mm_max_tokens_per_item`` is
    None): vLLM sizes the encoder budget from its dummy inputs, which the selecting processor
    writes at the budget ratio: the server's ratio, or every token when requests may ask for
    more."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import get_mm_max_toks_per_item
    from vllm.plugins import load_general_plugins

    from vs_vllm.keep_ratio import num_kept_tokens

    _, model_dir = family_dir
    load_general_plugins()

    def max_tokens(settings):
        overrides = {} if settings is None else {"vision_selector": settings}
        config = ModelConfig(
            model=str(model_dir), dtype="float32", max_model_len=2048, hf_overrides=overrides
        )
        proc = MULTIMODAL_REGISTRY.create_processor(config)
        assert proc.info.get_mm_max_tokens_per_item(2048, {"image": 1}) is None
        return get_mm_max_toks_per_item(proc, {"image": 1}, None)["image"]

    n = max_tokens(None)
    assert n > 1
    assert max_tokens({"keep_ratio": 0.3, "strategy": "norm"}) == num_kept_tokens(n, 0.3)
    assert max_tokens({"keep_ratio": 0.3, "strategy": "norm", "request_ratios": True}) == n


def test_importing_the_engine_runner_leaves_this_process_environment(monkeypatch):
    """tests.engine.runner is imported by tests (its prompt builder): only its ``main`` (the
    runner process) may drop TRITON_INTERPRET, which the kernel tests of this process need
    (importing it at collection once broke the first interpreted kernel of the session)."""
    import importlib
    import os

    import tests.engine.runner as runner

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    before = dict(os.environ)
    importlib.reload(runner)
    assert dict(os.environ) == before
