"""Training data: JSONL validation, chat encoding with answer-only labels, collation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tiny_models.tiny_qwen import TinyQwenSpec, num_image_tokens, tiny_image
from vs_vllm.train.data import (
    DataError,
    JsonlDataset,
    Sample,
    SampleEncoder,
    collate,
    data_hash,
    read_samples,
)

END = "<|im_end|>"
SIZES = {"a.png": (300, 200), "b.jpg": (64, 64), "c.png": (100, 180), "big.png": (448, 448)}


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        tiny_image(width, height, seed=seed).save(root / name)
    (root / "garbage.png").write_bytes(b"this is not a PNG file at all\x00\x01\x02" * 8)
    return root


def turns(*texts: str) -> list[dict[str, str]]:
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


ONE = {"image": "a.png", "conversations": turns("<image>\nWhat is in the picture?", "A red car.")}
TWO = {
    "image": ["a.png", "b.jpg"],
    "conversations": turns("<image>\n<image>\nAre they the same?", "No, they are not."),
}
MULTI = {
    "image": "c.png",
    "conversations": turns(
        "Describe this image in one sentence.\n<image>",
        "There is a red car.",
        "How many apples?",
        "3",
        "And bananas?",
        "There are two bananas.",
    ),
}
TEXT_ONLY = {"conversations": turns("Hello there", "Hi.")}
GOOD = [ONE, TWO, MULTI]


def write_jsonl(path: Path, lines: list[dict | str]) -> Path:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(text)
    return path


def answers(sample: Sample) -> list[str]:
    return [text for role, text in sample.conversations if role == "gpt"]


def labelled_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of labelled positions."""
    runs: list[tuple[int, int]] = []
    for pos in (labels != -100).nonzero().flatten().tolist():
        if runs and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], pos + 1)
        else:
            runs.append((pos, pos + 1))
    return runs


# ---------------------------------------------------------------------------- reading


def test_reads_valid_file(tmp_path, image_root):
    path = write_jsonl(tmp_path / "train.jsonl", [ONE, "", TWO, MULTI, TEXT_ONLY])
    samples = read_samples(path, image_root)
    assert [s.line for s in samples] == [1, 3, 4, 5]
    assert samples[0].images == (image_root / "a.png",)
    assert samples[1].images == (image_root / "a.png", image_root / "b.jpg")
    assert samples[2].conversations[0] == ("human", MULTI["conversations"][0]["value"])
    assert len(samples[2].conversations) == 6
    assert samples[3].images == ()
    assert answers(samples[2]) == ["There is a red car.", "3", "There are two bananas."]


def test_images_without_marker_go_to_the_first_human_turn(tmp_path, image_root):
    record = {"image": ["a.png", "b.jpg"], "conversations": turns("Compare them.", "Same.")}
    (sample,) = read_samples(write_jsonl(tmp_path / "t.jsonl", [record]), image_root)
    assert sample.conversations[0] == ("human", "<image><image>\nCompare them.")


def test_data_hash(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [ONE, TWO])
    assert data_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    before = data_hash(path)
    write_jsonl(path, [ONE])
    assert data_hash(path) != before


# ---------------------------------------------------------------------------- errors

BAD_LINES = {
    "bad_json": ('{"image": "a.png", "conversations": [', "invalid JSON"),
    "not_object": ("[1, 2]", "expected a JSON object"),
    "missing_image": (
        {"image": "nope.png", "conversations": turns("<image>\nQ?", "A.")},
        "image not found",
    ),
    "unreadable_image": (
        {"image": "garbage.png", "conversations": turns("<image>\nQ?", "A.")},
        "unreadable image",
    ),
    "too_many_markers": (
        {"image": "a.png", "conversations": turns("<image>\n<image>\nQ?", "A.")},
        "2 <image> markers but 1 images",
    ),
    "too_few_markers": (
        {"image": ["a.png", "b.jpg"], "conversations": turns("<image>\nQ?", "A.")},
        "1 <image> markers but 2 images",
    ),
    "markers_without_image": ({"conversations": turns("<image>\nQ?", "A.")}, "but 0 images"),
    "marker_in_answer": (
        {"image": "a.png", "conversations": turns("Q?", "<image> A.")},
        "marker in a gpt turn",
    ),
    "starts_with_gpt": (
        {"conversations": [{"from": "gpt", "value": "A."}, {"from": "human", "value": "Q?"}]},
        "the first turn is 'gpt'",
    ),
    "not_alternating": (
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "human", "value": "Q?"}]},
        "must alternate",
    ),
    "unknown_role": (
        {"conversations": [{"from": "user", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
        "role 'user'",
    ),
    "ends_with_human": ({"conversations": turns("Q?", "A.", "Q2?")}, "last turn must be"),
    "empty_conversations": ({"image": [], "conversations": []}, 'empty "conversations"'),
    "missing_conversations": ({"image": "a.png"}, 'missing "conversations"'),
    "value_not_string": ({"conversations": turns("Q?", 3)}, "must be a string"),
    "missing_video": (
        {"video": "clip.mp4", "conversations": turns("<video>\nQ?", "A.")},
        "video not found",
    ),
    "still_image_as_video": (
        {"video": "a.png", "conversations": turns("<video>\nQ?", "A.")},
        "a still image (one frame), not a video",
    ),
    "video_folder_without_frames": (
        {"video": ".", "conversations": turns("<video>\nQ?", "A.")},
        "unreadable frame",  # the image root holds garbage.png
    ),
    "videos_key": (
        {"videos": ["clip.mp4"], "conversations": turns("<video>\nQ?", "A.")},
        'unknown key "videos": use "video"',
    ),
    "video_markers_without_video": (
        {"conversations": turns("<video>\nQ?", "A.")},
        "1 <video> markers but 0 videos",
    ),
    "video_marker_in_answer": (
        {"conversations": turns("Q?", "<video> A.")},
        "<video> marker in a gpt turn",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_raises_with_file_and_line(tmp_path, image_root, kind):
    bad, what = BAD_LINES[kind]
    path = write_jsonl(tmp_path / f"{kind}.jsonl", [ONE, "", TWO, bad, MULTI])
    with pytest.raises(DataError) as info:
        read_samples(path, image_root)
    message = str(info.value)
    assert message.startswith(f"{path}:4: "), message
    assert what in message
    assert info.value.line == 4
    assert info.value.file == str(path)
    assert "\n" not in message  # a single bad line: one line of message


def test_skip_bad_logs_and_keeps_the_good_ones(tmp_path, image_root):
    bad = [b for b, _ in BAD_LINES.values()]
    path = write_jsonl(tmp_path / "mixed.jsonl", [ONE, *bad, TWO, MULTI])
    logged: list[str] = []
    samples = read_samples(path, image_root, skip_bad=True, log=logged.append)
    assert [s.line for s in samples] == [1, len(bad) + 2, len(bad) + 3]
    assert len(logged) == len(bad)
    for number, (line, (_, what)) in enumerate(zip(logged, BAD_LINES.values(), strict=True)):
        assert line.startswith(f"skipping {path}:{number + 2}: ")
        assert what in line


def test_every_bad_line_is_reported(tmp_path, image_root):
    bad = [BAD_LINES["bad_json"][0], BAD_LINES["missing_image"][0]]
    path = write_jsonl(tmp_path / "two_bad.jsonl", [ONE, bad[0], TWO, bad[1]])
    with pytest.raises(DataError) as info:
        read_samples(path, image_root)
    first_line, *rest = str(info.value).splitlines()
    assert first_line.startswith(f"{path}:2: invalid JSON")
    assert any(line.startswith(f"{path}:4: image not found") for line in rest)
    assert [n for n, _ in info.value.errors] == [2, 4]


@pytest.mark.parametrize("skip_bad", [False, True])
def test_all_bad_or_empty_file_is_an_error(tmp_path, image_root, skip_bad):
    all_bad = write_jsonl(
        tmp_path / "bad.jsonl", [BAD_LINES["bad_json"][0], BAD_LINES["missing_image"][0]]
    )
    with pytest.raises(DataError, match=r"bad\.jsonl"):
        read_samples(all_bad, image_root, skip_bad=skip_bad, log=lambda _: None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no samples"):
        read_samples(empty, image_root, skip_bad=skip_bad)


# ---------------------------------------------------------------------------- encoding


@pytest.fixture
def samples(tmp_path, image_root) -> list[Sample]:
    return read_samples(write_jsonl(tmp_path / "train.jsonl", [*GOOD, TEXT_ONLY]), image_root)


def test_labels_cover_exactly_the_answers(processor, samples):
    encoder = SampleEncoder(processor)
    tokenizer = processor.tokenizer
    for sample in samples:
        item = encoder(sample)
        ids, labels = item["input_ids"], item["labels"]
        assert ids.dtype == labels.dtype == torch.long
        assert ids.shape == labels.shape == item["attention_mask"].shape
        assert item["attention_mask"].all()
        mask = labels != -100
        assert torch.equal(labels[mask], ids[mask])
        runs = labelled_runs(labels)
        assert [tokenizer.decode(ids[a:b]) for a, b in runs] == [a + END for a in answers(sample)]
        # The prompt part (everything before the first answer) ends with the generation prompt.
        prompt = tokenizer.decode(ids[: runs[0][0]])
        assert prompt.endswith("<|im_start|>assistant\n")
        assert "<|im_start|>system\n" in prompt


def test_tokens_match_the_processor(processor, samples):
    encoder = SampleEncoder(processor)
    spec = TinyQwenSpec()
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for sample in samples:
        item = encoder(sample)
        images = [Image.open(p).convert("RGB") for p in sample.images]
        text = processor.apply_chat_template(encoder.messages(sample), tokenize=False)
        reference = processor(
            text=[text],
            images=images or None,
            return_tensors="pt",
            images_kwargs={"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}},
        )
        assert torch.equal(item["input_ids"], reference["input_ids"][0])
        if "mm_token_type_ids" in reference:
            assert torch.equal(item["mm_token_type_ids"], reference["mm_token_type_ids"][0])
        expected = [num_image_tokens(*SIZES[p.name], spec) for p in sample.images]
        assert int((item["input_ids"] == image_id).sum()) == sum(expected)
        if not images:
            assert "pixel_values" not in item and "image_grid_thw" not in item
            continue
        grid = item["image_grid_thw"]
        assert grid.shape == (len(images), 3)
        assert (grid.prod(-1) // 4).tolist() == expected
        assert torch.equal(grid, reference["image_grid_thw"])
        assert torch.allclose(item["pixel_values"], reference["pixel_values"])
        assert item["pixel_values"].shape[0] == int(grid.prod(-1).sum())


def test_max_pixels_limits_visual_tokens(tmp_path, processor, image_root):
    record = {"image": "big.png", "conversations": turns("<image>\nQ?", "A.")}
    (sample,) = read_samples(write_jsonl(tmp_path / "big.jsonl", [record]), image_root)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = {}
    for max_pixels in (28 * 28 * 64, 28 * 28 * 16, 28 * 28 * 4):
        item = SampleEncoder(processor, max_pixels=max_pixels)(sample)
        counts[max_pixels] = int((item["input_ids"] == image_id).sum())
        assert counts[max_pixels] == int(item["image_grid_thw"].prod()) // 4
        assert counts[max_pixels] <= max_pixels // (28 * 28)
    assert counts == {28 * 28 * 64: 64, 28 * 28 * 16: 16, 28 * 28 * 4: 4}
    # The default is the reference's 50176 pixels: 64 merged tokens for a 448 x 448 image.
    assert SampleEncoder(processor).max_pixels == 50176
    # min_pixels scales a small image up.
    small = SampleEncoder(processor, min_pixels=28 * 28 * 16)(
        Sample(1, (image_root / "b.jpg",), (("human", "<image>Q?"), ("gpt", "A.")))
    )
    assert int(small["image_grid_thw"].prod()) // 4 >= 16
    with pytest.raises(ValueError, match="min_pixels"):
        SampleEncoder(processor, max_pixels=28 * 28 * 4, min_pixels=28 * 28 * 8)


def test_max_length_truncates_text_but_never_visual_tokens(processor, samples):
    text_only = samples[-1]
    full = SampleEncoder(processor)(text_only)
    cut = SampleEncoder(processor, max_length=full["input_ids"].numel() - 3)(text_only)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(cut[key], full[key][:-3])
    with pytest.raises(ValueError, match=r"line 1\b.*max_length"):
        SampleEncoder(processor, max_length=40)(samples[0])


# ---------------------------------------------------------------------------- collate


def test_collate_pads_and_concatenates(tmp_path, processor, image_root):
    third = {"image": "c.png", "conversations": turns("<image>\nQ?", "A.")}
    path = write_jsonl(tmp_path / "train.jsonl", [ONE, TWO, third])
    dataset = JsonlDataset.from_jsonl(path, image_root, processor)
    items = [dataset[i] for i in range(3)]
    batch = dataset.collate(items)
    lengths = [item["input_ids"].numel() for item in items]
    width = max(lengths)
    assert len(set(lengths)) > 1  # padding is exercised
    pad = processor.tokenizer.pad_token_id
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        assert batch[key].shape == (3, width)
    assert batch["num_images"].tolist() == [1, 2, 1]
    assert batch["image_grid_thw"].shape == (4, 3)
    assert torch.equal(batch["image_grid_thw"], torch.cat([i["image_grid_thw"] for i in items]))
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    assert torch.equal(batch["pixel_values"], torch.cat([i["pixel_values"] for i in items]))
    for row, (item, length) in enumerate(zip(items, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][row, :length], item["input_ids"])
        assert torch.equal(batch["labels"][row, :length], item["labels"])
        assert (batch["input_ids"][row, length:] == pad).all()
        assert (batch["labels"][row, length:] == -100).all()
        assert (batch["mm_token_type_ids"][row, length:] == 0).all()
        assert batch["attention_mask"][row].sum() == length
        assert batch["attention_mask"][row, :length].all()


def test_collate_with_text_only_samples(processor, samples):
    encoder = SampleEncoder(processor)
    text_only = encoder(samples[-1])
    batch = collate(
        [text_only, encoder(samples[1]), text_only], pad_token_id=7, adapter=encoder.adapter
    )
    assert batch["num_images"].tolist() == [0, 2, 0]
    assert batch["image_grid_thw"].shape == (2, 3)
    assert (batch["input_ids"][0, text_only["input_ids"].numel() :] == 7).all()
    only_text = collate([text_only], adapter=encoder.adapter)
    assert "pixel_values" not in only_text and "image_grid_thw" not in only_text
    assert only_text["num_images"].tolist() == [0]
    assert only_text["input_ids"].shape == (1, text_only["input_ids"].numel())


def test_dataset_is_deterministic_and_feeds_the_model(tiny_model_dir, processor, samples):
    from transformers import Qwen2_5_VLForConditionalGeneration

    dataset = JsonlDataset(samples, SampleEncoder(processor))
    assert len(dataset) == len(samples)
    first, again = dataset[1], dataset[1]
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)

    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=dataset.collate)
    batch = next(iter(loader))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    inputs = {k: v for k, v in batch.items() if k != "num_images"}
    with torch.no_grad():
        loss = model(**inputs).loss
    assert torch.isfinite(loss)
