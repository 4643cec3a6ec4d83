"""Scorer checkpoints: standalone round trip, merged (single file and sharded) loading, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vs_vllm.checkpoint import (
    SCORER_KEYS,
    CheckpointError,
    ScorerSource,
    is_merged_scorer_key,
    load_scorer,
    load_scorer_state,
    merged_state_from_tensors,
    read_scorer_metadata,
    save_scorer,
)
from vs_vllm.scorer import VisionSelectorScorer

D = 32
PREFIX = "model.visual.importance_scorer."


def random_scorer(hidden_size: int = D, seed: int = 0) -> VisionSelectorScorer:
    """A scorer whose weights are far from the default init (zero biases, std 1e-4)."""
    scorer = VisionSelectorScorer(hidden_size)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in scorer.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return scorer


def scorer_tensors(scorer: VisionSelectorScorer, prefix: str = "") -> dict[str, torch.Tensor]:
    state = scorer.state_dict()
    return {prefix + key: state[key].clone() for key in SCORER_KEYS}


def backbone_tensors() -> dict[str, torch.Tensor]:
    return {
        "model.language_model.embed_tokens.weight": torch.randn(10, 8),
        "model.visual.blocks.0.attn.qkv.weight": torch.randn(24, 8),
        "lm_head.weight": torch.randn(10, 8),
    }


def assert_same_weights(state: dict[str, torch.Tensor], scorer: VisionSelectorScorer) -> None:
    reference = scorer.state_dict()
    assert list(state) == list(SCORER_KEYS)
    for key in SCORER_KEYS:
        assert state[key].dtype == reference[key].dtype
        assert torch.equal(state[key], reference[key]), key


# --- standalone ------------------------------------------------------------------------------


def test_round_trip_via_file_and_directory(tmp_path: Path) -> None:
    scorer = random_scorer()
    provenance = {"trained_on": "unit-test", "steps": 3, "keep_ratio": [0.1, 0.3]}

    file = save_scorer(scorer, tmp_path / "scorer.safetensors", provenance)
    assert file == tmp_path / "scorer.safetensors"
    assert (tmp_path / "scorer.json").is_file()
    directory = tmp_path / "out" / "nested"
    dir_file = save_scorer(scorer, directory, provenance)
    assert dir_file == directory / "vision_selector.safetensors"
    assert (directory / "vision_selector.json").is_file()

    for path in (file, directory, str(directory)):
        state, source = load_scorer_state(path)
        assert_same_weights(state, scorer)
        assert source.kind == "standalone"
        assert source.prefix == ""
        assert source.path == str(path)
        assert len(source.files) == 1 and Path(source.files[0]).is_file()

        loaded = load_scorer(path, hidden_size=D)
        assert loaded.hidden_size == D
        assert_same_weights(loaded.state_dict(), scorer)

    for path in (file, directory):
        meta = read_scorer_metadata(path)
        assert meta is not None
        assert meta["format"] == "vs-vllm-scorer"
        assert meta["format_version"] == 1
        assert meta["hidden_size"] == D
        assert meta["num_parameters"] == VisionSelectorScorer.num_parameters_for(D)
        assert meta["provenance"] == provenance
    assert json.loads((tmp_path / "scorer.json").read_text())["hidden_size"] == D


def test_save_defaults_and_metadata_absent(tmp_path: Path) -> None:
    scorer = random_scorer(seed=1)
    file = save_scorer(scorer, tmp_path / "a.safetensors")
    meta = read_scorer_metadata(file)
    assert meta is not None and meta["provenance"] == {}

    (tmp_path / "a.json").unlink()
    assert read_scorer_metadata(file) is None
    state, _ = load_scorer_state(file)  # the sidecar is optional
    assert_same_weights(state, scorer)
    assert read_scorer_metadata(tmp_path) is None  # no vision_selector.json in tmp_path


def test_save_rejects_unserialisable_provenance_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_scorer(random_scorer(), tmp_path / "s.safetensors", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_load_scorer_device_and_dtype(tmp_path: Path) -> None:
    scorer = random_scorer().to(torch.bfloat16)
    file = save_scorer(scorer, tmp_path / "bf16.safetensors")
    state, _ = load_scorer_state(file)
    assert state["q_proj.weight"].dtype == torch.bfloat16

    loaded = load_scorer(file, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert_same_weights(loaded.state_dict(), scorer)
    as_float = load_scorer(file)
    assert all(p.dtype == torch.float32 for p in as_float.parameters())


# --- merged ----------------------------------------------------------------------------------


def test_merged_single_file(tmp_path: Path) -> None:
    scorer = random_scorer(seed=2)
    file = tmp_path / "model.safetensors"
    save_file({**backbone_tensors(), **scorer_tensors(scorer, PREFIX)}, str(file))

    for path in (tmp_path, file):
        state, source = load_scorer_state(path)
        assert_same_weights(state, scorer)
        assert source == ScorerSource(
            path=str(path), kind="merged", prefix=PREFIX, files=(str(file),)
        )
    assert_same_weights(load_scorer(tmp_path).state_dict(), scorer)


def test_merged_other_prefix_and_multiple_files(tmp_path: Path) -> None:
    scorer = random_scorer(seed=3)
    tensors = scorer_tensors(scorer, "visual.importance_scorer.")
    save_file(backbone_tensors(), str(tmp_path / "a.safetensors"))
    save_file({k: v for k, v in tensors.items() if "q_proj" in k}, str(tmp_path / "b.safetensors"))
    save_file({k: v for k, v in tensors.items() if "k_proj" in k}, str(tmp_path / "c.safetensors"))
    state, source = load_scorer_state(tmp_path, hidden_size=D)
    assert_same_weights(state, scorer)
    assert source.prefix == "visual.importance_scorer."
    assert source.files == (str(tmp_path / "b.safetensors"), str(tmp_path / "c.safetensors"))


def test_merged_sharded_opens_only_needed_shards(tmp_path: Path) -> None:
    scorer = random_scorer(seed=4)
    tensors = scorer_tensors(scorer, PREFIX)
    backbone = backbone_tensors()
    shards: dict[str, dict[str, torch.Tensor]] = {
        "model-00001-of-00003.safetensors": {
            "model.language_model.embed_tokens.weight": backbone[
                "model.language_model.embed_tokens.weight"
            ],
            PREFIX + "q_proj.weight": tensors[PREFIX + "q_proj.weight"],
            PREFIX + "q_proj.bias": tensors[PREFIX + "q_proj.bias"],
        },
        "model-00002-of-00003.safetensors": {
            "model.visual.blocks.0.attn.qkv.weight": backbone[
                "model.visual.blocks.0.attn.qkv.weight"
            ],
        },
        "model-00003-of-00003.safetensors": {
            "lm_head.weight": backbone["lm_head.weight"],
            PREFIX + "k_proj.weight": tensors[PREFIX + "k_proj.weight"],
            PREFIX + "k_proj.bias": tensors[PREFIX + "k_proj.bias"],
        },
    }
    weight_map = {}
    for name, shard in shards.items():
        save_file(shard, str(tmp_path / name))
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    # The middle shard holds no scorer key: it must never be opened.
    (tmp_path / "model-00002-of-00003.safetensors").write_bytes(b"not a safetensors file")

    state, source = load_scorer_state(tmp_path)
    assert_same_weights(state, scorer)
    assert source.kind == "merged"
    assert source.prefix == PREFIX
    assert source.files == (
        str(tmp_path / "model-00001-of-00003.safetensors"),
        str(tmp_path / "model-00003-of-00003.safetensors"),
    )
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    assert_same_weights(load_scorer(tmp_path).state_dict(), scorer)
    # The index file itself is accepted as the path too.
    state, _ = load_scorer_state(tmp_path / "model.safetensors.index.json")
    assert_same_weights(state, scorer)


def test_standalone_file_wins_over_merged_files_in_directory(tmp_path: Path) -> None:
    standalone, merged = random_scorer(seed=5), random_scorer(seed=6)
    save_file(scorer_tensors(merged, PREFIX), str(tmp_path / "model.safetensors"))
    save_scorer(standalone, tmp_path)
    state, source = load_scorer_state(tmp_path)
    assert source.kind == "standalone"
    assert_same_weights(state, standalone)


# --- errors ----------------------------------------------------------------------------------


def error_message(path: object, hidden_size: int | None = None) -> str:
    with pytest.raises(CheckpointError) as excinfo:
        load_scorer_state(path, hidden_size)  # type: ignore[arg-type]
    return str(excinfo.value)


def test_error_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "scorer.safetensors"
    assert str(missing) in error_message(missing)
    with pytest.raises(CheckpointError, match="nope"):
        load_scorer(missing)
    with pytest.raises(CheckpointError, match="nope"):
        read_scorer_metadata(missing)


def test_error_missing_key_in_standalone_file(tmp_path: Path) -> None:
    file = tmp_path / "scorer.safetensors"
    tensors = scorer_tensors(random_scorer())
    del tensors["k_proj.bias"]
    save_file(tensors, str(file))
    message = error_message(file)
    assert str(file) in message
    assert "'k_proj.bias'" in message
    assert "q_proj.weight" not in message.split("missing")[1].split("(searched")[0]


def test_error_unexpected_key_in_standalone_file(tmp_path: Path) -> None:
    file = tmp_path / "scorer.safetensors"
    save_file({**scorer_tensors(random_scorer()), "extra.weight": torch.zeros(2)}, str(file))
    message = error_message(file)
    assert str(file) in message and "'extra.weight'" in message


def test_error_shape_mismatch_vs_hidden_size(tmp_path: Path) -> None:
    file = save_scorer(random_scorer(), tmp_path / "scorer.safetensors")
    message = error_message(file, hidden_size=16)
    assert str(file) in message
    assert "'q_proj.weight'" in message
    assert "(16, 32)" in message  # found
    assert "(8, 16)" in message  # expected
    assert "hidden_size=16" in message
    with pytest.raises(CheckpointError, match=r"expected \(8, 16\)"):
        load_scorer(file, hidden_size=16)


def test_error_inconsistent_shapes_inside_file(tmp_path: Path) -> None:
    file = tmp_path / "scorer.safetensors"
    tensors = scorer_tensors(random_scorer())
    tensors["k_proj.weight"] = torch.randn(16, 30)
    save_file(tensors, str(file))
    message = error_message(file)
    assert str(file) in message
    assert "'k_proj.weight'" in message
    assert "(16, 30)" in message and "(16, 32)" in message

    tensors = scorer_tensors(random_scorer())
    tensors["q_proj.bias"] = torch.randn(15)
    save_file(tensors, str(file))
    message = error_message(file)
    assert "'q_proj.bias'" in message and "(15,)" in message and "(16,)" in message


def test_error_odd_inferred_hidden_size(tmp_path: Path) -> None:
    file = tmp_path / "scorer.safetensors"
    tensors = scorer_tensors(random_scorer())
    tensors["q_proj.weight"] = torch.randn(16, 33)
    save_file(tensors, str(file))
    message = error_message(file)
    assert str(file) in message and "'q_proj.weight'" in message and "(16, 33)" in message


def test_error_merged_keys_under_two_prefixes(tmp_path: Path) -> None:
    scorer = random_scorer()
    tensors = {
        **scorer_tensors(scorer, PREFIX),
        **scorer_tensors(scorer, "visual.importance_scorer."),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    message = error_message(tmp_path)
    assert str(tmp_path) in message
    assert f"'{PREFIX}'" in message and "'visual.importance_scorer.'" in message


def test_error_merged_partial_keys(tmp_path: Path) -> None:
    tensors = scorer_tensors(random_scorer(), PREFIX)
    del tensors[PREFIX + "k_proj.weight"]
    file = tmp_path / "model.safetensors"
    save_file({**backbone_tensors(), **tensors}, str(file))
    message = error_message(tmp_path)
    assert f"'{PREFIX}k_proj.weight'" in message
    assert str(file) in message


def test_error_index_points_to_missing_shard(tmp_path: Path) -> None:
    scorer = random_scorer()
    tensors = scorer_tensors(scorer, PREFIX)
    save_file(tensors, str(tmp_path / "model-00001-of-00002.safetensors"))
    weight_map = dict.fromkeys(tensors, "model-00001-of-00002.safetensors")
    weight_map[PREFIX + "k_proj.bias"] = "model-00002-of-00002.safetensors"
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    message = error_message(tmp_path)
    assert str(tmp_path / "model-00002-of-00002.safetensors") in message
    assert f"'{PREFIX}k_proj.bias'" in message
    assert str(index) in message


def test_error_sidecar_hidden_size_disagrees(tmp_path: Path) -> None:
    file = save_scorer(random_scorer(), tmp_path / "scorer.safetensors")
    sidecar = tmp_path / "scorer.json"
    meta = json.loads(sidecar.read_text())
    meta["hidden_size"] = 64
    sidecar.write_text(json.dumps(meta))
    message = error_message(file)
    assert str(sidecar) in message and str(file) in message
    assert "hidden_size=64" in message and "hidden_size=32" in message
    with pytest.raises(CheckpointError, match="hidden_size=64"):
        load_scorer(tmp_path / "scorer.safetensors")


def test_error_sidecar_not_scorer_metadata(tmp_path: Path) -> None:
    file = save_scorer(random_scorer(), tmp_path)
    (tmp_path / "vision_selector.json").write_text("{not json")
    assert str(tmp_path / "vision_selector.json") in error_message(file)


def test_error_directory_without_scorer_keys(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    save_file(backbone_tensors(), str(file))
    message = error_message(tmp_path)
    assert message.startswith("no VisionSelector scorer weights")
    assert "importance_scorer.q_proj.weight" in message
    assert str(tmp_path) in message and str(file) in message

    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in error_message(empty)

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": dict.fromkeys(backbone_tensors(), file.name)}))
    assert str(index) in error_message(tmp_path)


def test_error_unreadable_safetensors_file(tmp_path: Path) -> None:
    file = tmp_path / "scorer.safetensors"
    file.write_bytes(b"garbage")
    assert str(file) in error_message(file)


# --- the engine's weight stream (merged keys as vLLM hands them to load_weights) ------------


def test_merged_state_from_tensors_matches_the_file_loader(tmp_path: Path) -> None:
    scorer = random_scorer(seed=7)
    streamed = scorer_tensors(scorer, PREFIX)
    assert all(is_merged_scorer_key(k) for k in streamed)
    assert not any(is_merged_scorer_key(k) for k in backbone_tensors())
    assert_same_weights(merged_state_from_tensors(streamed, "the model", D), scorer)
    save_file({**backbone_tensors(), **streamed}, str(tmp_path / "model.safetensors"))
    from_file, _ = load_scorer_state(tmp_path, D)
    for key in SCORER_KEYS:
        assert torch.equal(from_file[key], merged_state_from_tensors(streamed, "m", D)[key])


def test_merged_state_from_tensors_refuses_what_the_file_loader_refuses() -> None:
    scorer = random_scorer()
    two = {**scorer_tensors(scorer, PREFIX), **scorer_tensors(scorer, "visual.importance_scorer.")}
    with pytest.raises(CheckpointError, match="more than one prefix") as err:
        merged_state_from_tensors(two, "the model checkpoint")
    assert f"'{PREFIX}'" in str(err.value) and "'visual.importance_scorer.'" in str(err.value)
    partial = scorer_tensors(scorer, PREFIX)
    del partial[PREFIX + "q_proj.bias"]
    with pytest.raises(CheckpointError, match=f"'{PREFIX}q_proj.bias' not found"):
        merged_state_from_tensors(partial, "the model checkpoint")
    with pytest.raises(CheckpointError, match=r"expected \(32, 64\) for hidden_size=64"):
        merged_state_from_tensors(scorer_tensors(scorer, PREFIX), "the model checkpoint", 64)


def test_merged_keys_are_matched_only_in_checkpoint_py() -> None:
    """One parser of merged checkpoints: nothing else in the package matches their keys."""
    import re

    matching = re.compile(r"MERGED_SUFFIX|(endswith|rsplit|split|startswith)\([^)]*importance_")
    package = Path(__file__).resolve().parents[1] / "vs_vllm"
    offenders = [
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name != "checkpoint.py" and matching.search(p.read_text())
    ]
    assert matching.search('name.rsplit("importance_scorer.", 1)')
    assert not offenders, offenders
