"""The tiny offline Qwen2.5-VL builder: transformers loads and runs it, stock vLLM serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tiny_models.tiny_qwen import (
    SPECIAL_TOKENS,
    TinyQwenSpec,
    add_merged_scorer,
    build_tiny_qwen25_vl,
    num_image_tokens,
    tiny_image,
)

PREFIX = "model.visual.importance_scorer."
SCORER_KEYS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
PROMPT = "Describe this image."


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = handle.get_tensor(key)
    return tensors


def image_message(*parts: dict, text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def random_scorer_state(dim: int, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    half = dim // 2
    return {
        "q_proj.weight": torch.randn(half, dim, generator=gen),
        "q_proj.bias": torch.randn(half, generator=gen),
        "k_proj.weight": torch.randn(half, dim, generator=gen),
        "k_proj.bias": torch.randn(half, generator=gen),
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen25_vl(tmp_path_factory.mktemp("tiny_qwen") / "model")


@pytest.fixture(scope="module")
def processor(model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()


def test_directory_layout_and_config(model_dir: Path, processor) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = processor.tokenizer
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["image_token_id"] == ids["<|image_pad|>"]
    assert config["video_token_id"] == ids["<|video_pad|>"]
    assert config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert config["vision_end_token_id"] == ids["<|vision_end|>"]
    text = config["text_config"]
    assert text["eos_token_id"] == ids["<|im_end|>"] == tokenizer.eos_token_id
    assert text["pad_token_id"] == ids["<|endoftext|>"] == tokenizer.pad_token_id
    assert text["vocab_size"] >= len(tokenizer)
    spec = TinyQwenSpec()
    assert text["rope_parameters"]["mrope_section"] == list(spec.mrope_section)
    assert sum(spec.mrope_section) * 2 == text["hidden_size"] // text["num_attention_heads"]
    assert config["vision_config"]["out_hidden_size"] == text["hidden_size"]
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ids["<|im_end|>"]
    assert generation["do_sample"] is False
    # Every special token is one id and is not split by the byte-level pre-tokenizer.
    for tok, tok_id in ids.items():
        assert tokenizer.encode(tok, add_special_tokens=False) == [tok_id]
    assert 500 <= len(tokenizer) <= 1000
    assert tokenizer.decode(tokenizer.encode("Hello, wörld 123!")) == "Hello, wörld 123!"


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="mrope_section"):
        TinyQwenSpec(mrope_section=(4, 4, 4)).validate()
    with pytest.raises(ValueError, match="kv_heads"):
        TinyQwenSpec(heads=2, kv_heads=3).validate()
    TinyQwenSpec().validate()


@pytest.mark.parametrize("part_type", ["image", "image_url"])
def test_chat_template_writes_one_image_pad_per_image(processor, part_type: str) -> None:
    part = {"type": "image", "image": tiny_image(32, 32)}
    if part_type == "image_url":
        part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    text = processor.apply_chat_template(
        image_message(part), add_generation_prompt=True, tokenize=False
    )
    assert text.count("<|image_pad|>") == 1
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert text.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n" in (
        text
    )
    assert text.endswith("<|im_start|>assistant\n")
    without = processor.apply_chat_template(image_message(part), tokenize=False)
    assert not without.endswith("<|im_start|>assistant\n")
    two = image_message(part, part)
    assert processor.apply_chat_template(two, tokenize=False).count("<|image_pad|>") == 2
    plain = [{"role": "user", "content": "hi"}]
    assert processor.tokenizer.apply_chat_template(plain, tokenize=False).endswith(
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_num_image_tokens_bounds() -> None:
    assert num_image_tokens(300, 200) == 54
    assert num_image_tokens(28 * 8, 28 * 8) == 64
    assert num_image_tokens(4000, 3000) <= 64
    assert num_image_tokens(10, 10) >= 4
    small = TinyQwenSpec(max_pixels=28 * 28 * 16)
    assert num_image_tokens(1000, 1000, small) == 16


@pytest.mark.parametrize("size", [(300, 200), (56, 56), (640, 480), (100, 500)])
def test_processor_expands_image_pads(processor, size: tuple[int, int]) -> None:
    image = tiny_image(*size)
    text = processor.apply_chat_template(
        image_message({"type": "image", "image": image}), add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n = num_image_tokens(*size)
    assert int((inputs["input_ids"][0] == image_id).sum()) == n
    assert int(inputs["image_grid_thw"].prod()) == n * 4


def test_hf_forward_and_generate(processor, hf_model) -> None:
    image = tiny_image(300, 200)
    text = processor.apply_chat_template(
        image_message({"type": "image", "image": image}), add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = hf_model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], hf_model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    out = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) >= 1
    assert len(set(new)) > 1  # the random init is scaled so greedy decoding does not repeat


def test_same_seed_same_weights(model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_qwen25_vl(tmp_path / "again", seed=0)
    other = build_tiny_qwen25_vl(tmp_path / "other", seed=1)
    ref, same, diff = read_weights(model_dir), read_weights(again), read_weights(other)
    assert ref.keys() == same.keys() == diff.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert any(not torch.equal(ref[k], diff[k]) for k in ref)
    for name in ("tokenizer.json", "config.json", "chat_template.jinja"):
        assert (model_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_tiny_image_is_deterministic() -> None:
    a, b, c = tiny_image(300, 200), tiny_image(300, 200), tiny_image(300, 200, seed=1)
    assert a.size == (300, 200) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    with pytest.raises(ValueError):
        tiny_image(0, 10)


def nested(key: str) -> str:
    """transformers' module name of a legacy Qwen2.5-VL checkpoint key."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    return key


@pytest.mark.parametrize(
    ("prefix", "num_shards", "rename"),
    [(PREFIX, 3, nested), ("visual.importance_scorer.", 2, lambda key: key)],
)
def test_add_merged_scorer(
    model_dir: Path, tmp_path: Path, prefix: str, num_shards: int, rename
) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vs_vllm.checkpoint import load_scorer_state

    dim = TinyQwenSpec().text_hidden
    state = random_scorer_state(dim)
    merged = add_merged_scorer(model_dir, state, tmp_path / "merged", prefix, num_shards)
    assert merged == tmp_path / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    for key in SCORER_KEYS:
        assert prefix + key in weight_map
    shards = sorted(set(weight_map.values()))
    n = num_shards
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (merged / "model.safetensors").exists()
    backbone = read_weights(model_dir)
    stored = read_weights(merged)
    scorer_keys = {prefix + k for k in SCORER_KEYS}
    assert set(stored) == set(weight_map) == {rename(k) for k in backbone} | scorer_keys
    total = sum(t.numel() * t.element_size() for t in stored.values())
    assert index["metadata"]["total_size"] == total
    assert all(torch.equal(stored[rename(k)], backbone[k]) for k in backbone)
    assert all(torch.equal(stored[prefix + k], state[k]) for k in SCORER_KEYS)
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (merged / name).read_bytes() == (model_dir / name).read_bytes()

    # The repo's own checkpoint reader finds the scorer in this layout.
    loaded, source = load_scorer_state(merged, hidden_size=dim)
    assert source.kind == "merged" and source.prefix == prefix
    assert all(torch.equal(loaded[k], state[k]) for k in SCORER_KEYS)

    # transformers still loads the backbone (the scorer keys are unexpected, and ignored).
    model_state = Qwen2_5_VLForConditionalGeneration.from_pretrained(merged).state_dict()
    assert all(torch.equal(model_state[nested(k)], backbone[k]) for k in backbone)


def test_add_merged_scorer_rejects_bad_input(model_dir: Path, tmp_path: Path) -> None:
    state = random_scorer_state(TinyQwenSpec().text_hidden)
    with pytest.raises(ValueError, match="missing"):
        add_merged_scorer(model_dir, {"q_proj.weight": state["q_proj.weight"]}, tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        add_merged_scorer(model_dir, state, tmp_path / "full")
    with pytest.raises(ValueError, match="num_shards"):
        add_merged_scorer(model_dir, state, tmp_path / "b", num_shards=0)
    with pytest.raises(ValueError, match="layout"):
        add_merged_scorer(model_dir, state, tmp_path / "c", layout="flat")  # type: ignore[arg-type]
    single = add_merged_scorer(model_dir, state, tmp_path / "one", num_shards=1)
    index = json.loads((single / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}


# Run in a child process: the CPU engine spawns processes of its own, which must not outlive
# the test, and vLLM must not be imported into the pytest process.
_VLLM_SCRIPT = textwrap.dedent(
    """
    import base64, io, json, sys

    def main():
        from vllm import LLM, SamplingParams
        from tiny_models.tiny_qwen import tiny_image

        model_dir, out_path = sys.argv[1], sys.argv[2]
        llm = LLM(model=model_dir, dtype="float32", max_model_len=2048, max_num_seqs=4,
                  limit_mm_per_prompt={"image": 2}, enforce_eager=True)
        buf = io.BytesIO()
        tiny_image(100, 500, seed=2).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        text = {"type": "text", "text": "Describe this image."}
        one = [{"role": "user", "content": [
            {"type": "image_pil", "image_pil": tiny_image(300, 200)}, text]}]
        two = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "image_pil", "image_pil": tiny_image(640, 480, seed=3)}, text]}]
        outs = llm.chat([one, two], SamplingParams(max_tokens=8, temperature=0.0))
        result = [{"prompt_token_ids": list(o.prompt_token_ids),
                   "token_ids": list(o.outputs[0].token_ids)} for o in outs]
        with open(out_path, "w") as f:
            json.dump(result, f)

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
def test_stock_vllm_serves_tiny_model(model_dir: Path, processor, hf_model, tmp_path: Path) -> None:
    out_path = tmp_path / "vllm_result.json"
    env = dict(os.environ)
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_PLUGINS": ""})
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_SCRIPT, str(model_dir), str(out_path)],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    one, two = json.loads(out_path.read_text())
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    assert one["prompt_token_ids"].count(image_id) == num_image_tokens(300, 200)
    expected_two = num_image_tokens(100, 500) + num_image_tokens(640, 480)
    assert two["prompt_token_ids"].count(image_id) == expected_two
    assert len(one["token_ids"]) >= 1 and len(two["token_ids"]) >= 1

    # Same prompt as transformers' processor, and (float32) the same greedy tokens.
    image = tiny_image(300, 200)
    text = processor.apply_chat_template(
        image_message({"type": "image", "image": image}), add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert one["prompt_token_ids"] == inputs["input_ids"][0].tolist()
    hf_out = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    hf_new = hf_out[0, inputs["input_ids"].shape[1] :].tolist()
    n = len(one["token_ids"])
    assert one["token_ids"] == hf_new[:n]
