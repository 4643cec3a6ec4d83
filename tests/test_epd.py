"""Selection under vLLM's encoder disaggregation (EPD) on the real CPU engine, float32.

An encoder-only instance (``--mm-encoder-only``, ``ec_producer``) and a prefill/decode
instance (``ec_consumer``) share vLLM's disk connector (``ECExampleConnector``), both started
here with the same selection flags (learned, keep 0.3, per-request ratios). Each request goes
to the encoder first (it stores the item's kept rows under the item's key), then to the
consumer, which loads them instead of running its vision tower. Checked:

* the consumer's prompt token ids, greedy tokens and logprobs equal one instance's (the
  offline engine on the same chat prompt) at the server's ratio and per-request 1.0 / 0.1, and
  the consumer really loaded each stored entry (vLLM's debug log names the key);
* the bytes stored per image: k rows x (D + 8 position channels) x 4 (float32) plus the
  safetensors header, at keep 1.0 / 0.3 / 0.1;
* mismatched settings leave the consumer serving: the encoder at one ratio and the consumer at
  another never share a key (the consumer encodes the image itself and answers as one instance
  at its ratio); an entry whose rows do not fit the consumer's placeholders (rewritten here with
  a row too few) is refused with one warning naming both settings and the item is encoded
  locally (``vs_vllm/vllm_plugin/patches/ec_guard.py``), where stock vLLM's engine dies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.engine.harness import chat_image, run_engine, selector_overrides
from tests.engine.runner import IMAGE

pytestmark = pytest.mark.slow

SERVER_RATIO = 0.3
MAX_TOKENS = 6
ONE = [300, 200, 0]
TWO = [120, 250, 1]
# (image, ratio asked of the encoder, ratio asked of the consumer); None: the server's.
CASES = {
    "server": (ONE, None, None),
    "full": (ONE, 1.0, 1.0),
    "tenth": (ONE, 0.1, 0.1),
    "mismatched-ratio": (TWO, 0.1, 0.5),
    "bad-entry": (TWO, SERVER_RATIO, SERVER_RATIO),
}
HEADER_MAX = 1024  # bytes of an entry's safetensors header (tensor name, shape, settings)


def _request(image: list[int], ratio: float | None) -> dict:
    return {"images": [image], "content": [IMAGE, "describe the picture"], "ratio": ratio}


def _entries(store: Path) -> set[Path]:
    return set(store.glob("*/encoder_cache.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, scorer_path, tmp_path_factory):
    """One instance (the offline engine) on each consumer request."""
    spec = {
        "model": str(tiny_model_dir),
        "hf_overrides": selector_overrides(scorer_path, keep_ratio=SERVER_RATIO),
        "requests": [_request(image, ratio) for image, _, ratio in CASES.values()],
        "max_tokens": MAX_TOKENS,
    }
    results = run_engine(tmp_path_factory.mktemp("epd-one-instance"), spec)["results"]
    return dict(zip(CASES, results, strict=True))


@pytest.fixture(scope="module")
def epd(tiny_model_dir, scorer_path, tmp_path_factory, reference):
    """Encoder and consumer up; every case sent to both; per case the new stored entries (and
    their sizes) and the consumer's answer; then a text request to the consumer."""
    import openai
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vs_vllm.local_server import TINY_MODEL_SERVE_ARGS, served

    root = tmp_path_factory.mktemp("epd")
    store = root / "store"
    store.mkdir()
    selection = [
        "--vision-keep-ratio",
        str(SERVER_RATIO),
        "--vision-selector",
        str(scorer_path),
        "--trust-request-mm-kwargs",
    ]

    def transfer(role: str) -> list[str]:
        config = {
            "ec_connector": "ECExampleConnector",
            "ec_role": role,
            "ec_connector_extra_config": {"shared_storage_path": str(store)},
        }
        return ["--ec-transfer-config", json.dumps(config)]

    encoder_args = [
        *TINY_MODEL_SERVE_ARGS,
        *selection,
        "--mm-encoder-only",
        *transfer("ec_producer"),
    ]
    consumer_args = [*TINY_MODEL_SERVE_ARGS, *selection, *transfer("ec_consumer")]
    logs = {"encoder": root / "encoder.log", "consumer": root / "consumer.log"}
    out: dict = {"cases": {}, "logs": logs}
    with (
        served(tiny_model_dir, *encoder_args, log=logs["encoder"]) as encoder_url,
        served(
            tiny_model_dir,
            *consumer_args,
            log=logs["consumer"],
            extra_env={"VLLM_LOGGING_LEVEL": "DEBUG"},  # vLLM logs each entry it loads
        ) as consumer_url,
    ):
        encoder = openai.OpenAI(base_url=encoder_url + "/v1", api_key="none")
        consumer = openai.OpenAI(base_url=consumer_url + "/v1", api_key="none")
        name = consumer.models.list().data[0].id

        def chat(client, image, ratio, max_tokens):
            return chat_image(client, name, image, ratio, max_tokens=max_tokens, logprobs=True)

        for case, (image, encoder_ratio, consumer_ratio) in CASES.items():
            before = _entries(store)
            chat(encoder, image, encoder_ratio, 1)
            new = sorted(_entries(store) - before)
            sizes = [p.stat().st_size for p in new]
            shapes = []
            for path in new:
                with safe_open(str(path), "pt") as f:
                    shapes.append(tuple(f.get_slice("ec_cache").get_shape()))
                    meta = f.metadata()
                if case == "bad-entry":  # a row too few, under the right key
                    with safe_open(str(path), "pt") as f:
                        rows = f.get_tensor("ec_cache")
                    save_file({"ec_cache": rows[:-1].contiguous()}, str(path), metadata=meta)
            answer = chat(consumer, image, consumer_ratio, MAX_TOKENS)
            out["cases"][case] = {
                "entries": [p.parent.name for p in new],
                "sizes": sizes,
                "shapes": shapes,
                "metadata": meta if new else None,
                "prompt_token_ids": list(answer.prompt_token_ids),
                "token_ids": list(answer.choices[0].token_ids),
                "logprobs": [c.logprob for c in answer.choices[0].logprobs.content],
            }
        text = consumer.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=2,
            temperature=0,
        )
        out["text_after"] = text.choices[0].message.content
    return out


def _same_answer(got: dict, want: dict) -> None:
    assert got["prompt_token_ids"] == want["prompt_token_ids"]
    assert got["token_ids"] == want["token_ids"]
    torch.testing.assert_close(got["logprobs"], want["logprobs"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["server", "full", "tenth"])
def test_the_consumer_answers_as_one_instance_from_the_stored_rows(epd, reference, case):
    got = epd["cases"][case]
    _same_answer(got, reference[case])
    [entry] = got["entries"]
    log = epd["logs"]["consumer"].read_text()
    assert f"Success load encoder cache for hash {entry}" in log


def test_the_stored_bytes_follow_k(epd, tiny_model_dir):
    """k rows of D + 8 float32 columns per image (D = 64 here): what the README states."""
    from vs_vllm.keep_ratio import num_kept_tokens
    from vs_vllm.position_channels import NUM_CHANNELS

    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    width = config["vision_config"]["out_hidden_size"] + NUM_CHANNELS
    n = epd["cases"]["full"]["shapes"][0][0]  # every token at 1.0
    headers = set()
    for case, ratio in (("full", 1.0), ("server", SERVER_RATIO), ("tenth", 0.1)):
        [shape], [size] = epd["cases"][case]["shapes"], epd["cases"][case]["sizes"]
        k = num_kept_tokens(n, ratio)
        assert shape == (k, width)
        headers.add(size - k * width * 4)
    [header] = headers  # the same settings metadata in every entry
    assert 0 < header <= HEADER_MAX
    print({case: epd["cases"][case]["sizes"][0] for case in ("full", "server", "tenth")}, header)


def test_entries_carry_the_producers_settings(epd, scorer_path):
    meta = json.loads(epd["cases"]["server"]["metadata"]["vs_vllm"])
    assert meta["selection"]["keep_ratio"] == SERVER_RATIO
    assert meta["selection"]["checkpoint"] == str(scorer_path)
    assert meta["format"].startswith("vs-vllm-rows-")


def test_a_ratio_mismatch_never_shares_a_key_and_the_consumer_serves(epd, reference):
    """The encoder stored the image at 0.1; the consumer asked 0.5: another key, so the
    consumer encodes the image itself and answers as one instance at 0.5."""
    got = epd["cases"]["mismatched-ratio"]
    assert len(got["entries"]) == 1
    assert got["entries"][0] not in epd["logs"]["consumer"].read_text()
    _same_answer(got, reference["mismatched-ratio"])


def test_an_entry_that_does_not_fit_is_encoded_locally_and_the_engine_lives(epd, reference):
    got = epd["cases"]["bad-entry"]
    [entry] = got["entries"]
    log = epd["logs"]["consumer"].read_text()
    warning = [line for line in log.splitlines() if f"EC entry {entry} holds rows" in line]
    assert len(warning) == 1, log[-3000:]
    assert "producer settings" in warning[0] and "its settings" in warning[0]
    assert "encoding the item here instead" in warning[0]
    assert "Attempted to assign" not in log
    _same_answer(got, reference["bad-entry"])
    assert epd["text_after"]  # and the engine keeps serving (stock vLLM's dies here)
