"""Training on video samples: frames read from folders and files, the JSONL ``"video"`` field
encoded exactly as the processor does, collated, and the training objective's video path
equal to transformers' own forward for both families; ``train`` runs on a video set."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models.tiny_qwen import tiny_image, tiny_video
from vs_vllm.local_server import mp4_data_url
from vs_vllm.train.data import SampleEncoder, read_samples
from vs_vllm.train.video_frames import read_frames, video_problem

FOLDER_FRAMES = 11  # odd, more than max_frames, names that sort differently as text


def _save_gif(path: Path, frames: np.ndarray, duration_ms: int) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """A folder of frames (``frame_0.png`` .. ``frame_10.png``), an animated GIF at 4 fps, an
    MP4 at 3 fps (OpenCV), a still PNG and an image, all made here."""
    root = tmp_path_factory.mktemp("videos")
    (root / "clip").mkdir()
    for i, frame in enumerate(tiny_video(FOLDER_FRAMES, 112, 84, seed=1)):
        Image.fromarray(frame).save(root / "clip" / f"frame_{i}.png")
    (root / "clip" / "notes.txt").write_text("not a frame")
    _save_gif(root / "b.gif", tiny_video(4, 84, 112, seed=2), duration_ms=250)
    url = mp4_data_url(tiny_video(5, 112, 112, seed=3), fps=3.0)
    (root / "c.mp4").write_bytes(base64.b64decode(url.split(",", 1)[1]))
    tiny_image(112, 112, seed=4).save(root / "still.png")
    tiny_image(168, 112, seed=5).save(root / "i.png")
    (root / "empty").mkdir()
    return root


# ----------------------------------------------------------------------------- frames


def test_folder_frames_natural_order_spread_and_fps(video_root):
    source = tiny_video(FOLDER_FRAMES, 112, 84, seed=1)
    whole = read_frames(video_root / "clip", max_frames=100, fps=5.0)
    assert whole.frames.shape == (FOLDER_FRAMES, 84, 112, 3) and whole.frames.dtype == np.uint8
    assert np.array_equal(whole.frames, source)  # frame_10 after frame_9, notes.txt ignored
    assert (whole.fps, whole.total_frames) == (5.0, FOLDER_FRAMES)
    four = read_frames(video_root / "clip", max_frames=4)
    assert four.indices == (0, 3, 7, 10)  # spread evenly, both ends kept
    assert np.array_equal(four.frames, source[list(four.indices)])
    assert read_frames(video_root / "clip", max_frames=1).indices == (0,)


def test_gif_frames_and_fps_from_durations(video_root):
    video = read_frames(video_root / "b.gif", max_frames=16)
    assert video.frames.shape == (4, 112, 84, 3)
    assert video.fps == pytest.approx(4.0) and video.indices == (0, 1, 2, 3)
    # GIF stores a palette: colours are close, not exact
    diff = np.abs(video.frames.astype(int) - tiny_video(4, 84, 112, seed=2).astype(int))
    assert diff.mean() < 12


def test_mp4_frames_through_opencv(video_root):
    video = read_frames(video_root / "c.mp4", max_frames=4)
    assert video.frames.shape == (4, 112, 112, 3)
    assert video.total_frames == 5 and video.fps == pytest.approx(3.0)
    assert video.indices == (0, 1, 3, 4)
    reference = tiny_video(5, 112, 112, seed=3)[list(video.indices)]
    assert np.abs(video.frames.astype(int) - reference.astype(int)).mean() < 25  # lossy codec


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("still.png", "a still image (one frame), not a video"),
        ("missing.mp4", "video not found"),
        ("empty", "no frame images"),
        ("garbage.mp4", "not a video OpenCV can decode"),
    ],
)
def test_bad_videos_are_named(video_root, tmp_path, name, problem):
    (tmp_path / "garbage.mp4").write_bytes(b"\x00not a video" * 64)
    path = (tmp_path if name == "garbage.mp4" else video_root) / name
    assert problem in (video_problem(path) or "")
    with pytest.raises(ValueError, match=re.escape(problem)):
        read_frames(path)
    assert video_problem(video_root / "clip") is None
    assert video_problem(video_root / "c.mp4") is None


def test_frames_of_different_sizes_are_refused(tmp_path):
    (tmp_path / "mixed").mkdir()
    tiny_image(56, 56).save(tmp_path / "mixed" / "0.png")
    tiny_image(84, 56).save(tmp_path / "mixed" / "1.png")
    with pytest.raises(ValueError, match="frames of different sizes"):
        read_frames(tmp_path / "mixed")


# ----------------------------------------------------------------------------- samples


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


LINES = [
    {"video": "clip", "conversations": _turns("<video>\nWhat happens?", "A red car.")},
    {"video": "b.gif", "image": "i.png", "conversations": _turns("Same place?", "yes")},
    {"video": ["c.mp4", "clip"], "conversations": _turns("<video><video>Compare.", "no")},
    {"image": "i.png", "conversations": _turns("<image>\nWhat is it?", "green")},
]


@pytest.fixture(scope="module")
def video_samples(video_root):
    path = video_root / "train.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in LINES) + "\n")
    return read_samples(path, video_root)


def test_video_samples_are_read(video_samples, video_root):
    assert [s.videos for s in video_samples] == [
        (video_root / "clip",),
        (video_root / "b.gif",),
        (video_root / "c.mp4", video_root / "clip"),
        (),
    ]
    # no markers: videos first, then images, at the start of the first human turn
    assert video_samples[1].conversations[0] == ("human", "<video>\n<image>\nSame place?")


MODEL_FIXTURES = ["tiny_model_dir", "tiny_qwen3_dir"]


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory):
    from tiny_models.tiny_qwen3_vl import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl-train-video"))


@pytest.fixture(scope="module", params=MODEL_FIXTURES)
def hf_model(request):
    from vs_vllm.hf.load import load_hf_model

    return load_hf_model(request.getfixturevalue(request.param), torch.float32)


def test_encoder_matches_the_processor(hf_model, video_samples):
    """Token ids, video inputs and grids are the processor's on the whole rendered chat with
    the same frames and metadata; answers are the only labelled tokens."""
    from transformers.video_utils import VideoMetadata

    _, processor = hf_model
    encoder = SampleEncoder(processor, max_frames=4)
    video_id = encoder.video_token_id
    for sample in video_samples:
        item = encoder(sample)
        videos = [read_frames(p, max_frames=4) for p in sample.videos]
        text = processor.apply_chat_template(encoder.messages(sample), tokenize=False)
        kwargs = {}
        if videos:
            kwargs = {
                "videos": [v.frames for v in videos],
                "videos_kwargs": {
                    "video_metadata": [
                        VideoMetadata(
                            total_num_frames=v.total_frames,
                            fps=v.fps,
                            frames_indices=list(v.indices),
                        )
                        for v in videos
                    ],
                    "do_sample_frames": False,
                },
            }
        images = [Image.open(p).convert("RGB") for p in sample.images]
        size = {"shortest_edge": encoder.min_pixels, "longest_edge": encoder.max_pixels}
        reference = processor(
            text=[text],
            images=images or None,
            return_tensors="pt",
            images_kwargs={"size": size},
            **kwargs,
        )
        assert torch.equal(item["input_ids"], reference["input_ids"][0])
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            assert (key in item) == (key in reference), key
            if key in item:
                assert torch.allclose(item[key].to(reference[key].dtype), reference[key]), key
        if videos:
            grid = item["video_grid_thw"]
            assert grid.shape == (len(videos), 3)
            assert grid[:, 0].tolist() == [(len(v.indices) + 1) // 2 for v in videos]
            assert int((item["input_ids"] == video_id).sum()) == int(grid.prod(-1).sum()) // 4
        answer = item["labels"][item["labels"] != -100]
        assert processor.tokenizer.decode(answer).startswith(sample.conversations[-1][1])


def test_collate_concatenates_video_inputs(hf_model, video_samples):
    _, processor = hf_model
    encoder = SampleEncoder(processor, max_frames=4)
    items = [encoder(s) for s in video_samples]
    batch = encoder.collate(items)
    assert batch["num_videos"].tolist() == [1, 1, 2, 0]
    assert batch["num_images"].tolist() == [0, 1, 0, 1]
    assert torch.equal(batch["video_grid_thw"], torch.cat([i["video_grid_thw"] for i in items[:3]]))
    assert torch.equal(
        batch["pixel_values_videos"], torch.cat([i["pixel_values_videos"] for i in items[:3]])
    )
    if "second_per_grid_ts" in items[0]:
        assert batch["second_per_grid_ts"].shape == (4,)


def test_objective_video_forward_is_transformers_forward(hf_model, video_samples):
    """With every row unmasked, the objective's LM forward (tower rows placed at the image and
    video placeholders, unpruned positions, deepstack levels for Qwen3-VL) gives transformers'
    own logits on a padded batch of videos and images."""
    from vs_vllm.train.objective import batch_visuals, visual_lm_logits

    model, processor = hf_model
    encoder = SampleEncoder(processor, max_frames=4)
    batch = encoder.collate([encoder(s) for s in video_samples])
    visuals = batch_visuals(model, batch, keep_ratio=0.25)
    assert visuals.rows is not None
    with torch.no_grad():
        ours = visual_lm_logits(model, batch, visuals, visuals.rows)
        theirs = model(
            **{k: v for k, v in batch.items() if k not in ("labels", "num_images", "num_videos")}
        ).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)
    # one segment per image, and per video (Qwen2.5-VL) or per frame (Qwen3-VL)
    merge = 4
    grids = batch["video_grid_thw"].tolist()
    video_tokens = [t * h * w // merge for t, h, w in grids]
    n_images = int(batch["num_images"].sum())
    segments = visuals.items.num_tokens[n_images:]
    if len(segments) == len(grids):
        assert list(segments) == video_tokens
    else:
        assert list(segments) == [h * w // merge for t, h, w in grids for _ in range(t)]
    assert sum(visuals.items.num_tokens[:n_images]) == visuals.num_image_tokens


def test_soft_selection_trains_the_scorer_on_videos(hf_model, video_samples):
    from vs_vllm.models import adapter_for
    from vs_vllm.scorer import VisionSelectorScorer
    from vs_vllm.train.objective import soft_selection_losses

    model, processor = hf_model
    model.requires_grad_(False)  # frozen, as the trainer freezes it
    encoder = SampleEncoder(processor, max_frames=4)
    batch = encoder.collate([encoder(s) for s in video_samples[:3]])
    torch.manual_seed(0)
    scorer = VisionSelectorScorer(adapter_for(model.config).score_width(model.config))
    losses = soft_selection_losses(model, scorer, batch, 0.25, 1.0)
    assert torch.isfinite(losses.total) and losses.bce > 0
    losses.total.backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in scorer.parameters())


def test_train_on_a_video_set(tiny_model_dir, video_samples, video_root, tmp_path):
    """``vs-vllm train`` end to end on the video JSONL: it runs, the scorer moves, and the
    provenance counts the video samples."""
    from vs_vllm.checkpoint import read_scorer_metadata
    from vs_vllm.train.trainer import TrainConfig, train

    result = train(
        TrainConfig(
            model=str(tiny_model_dir),
            data=str(video_root / "train.jsonl"),
            image_root=str(video_root),
            out=str(tmp_path / "out"),
            keep_ratio=0.25,
            max_steps=2,
            global_batch=2,
            micro_batch=1,
            lr=1e-2,
            max_frames=4,
            progress=False,
            dtype="fp32",
            device="cpu",
        )
    )
    assert result.steps == 2 and all(np.isfinite(r["loss"]) for r in result.curves)
    meta = read_scorer_metadata(result.scorer_path)
    assert meta["provenance"]["video_samples"] == 3
