"""The scorer learns on video: ``benchmarks/video_selection_learning.py --quick`` end to end on
the CPU (synthetic videos written as folders of frames, a small Qwen2.5-VL fitted on them,
``vs-vllm train`` on the JSONL ``"video"`` samples, held-out evaluation through the HF
selection path with ``video_keep_ratio``): at keep 0.1 the learned scorer beats ``uniform`` on
a task whose answer lies in one frame (about 3 minutes on 2 cores).

It runs with ``VS_VLLM_FULL_RUNS=1``: CI's 45 minutes go to the families' serving checks. What
stays in CI for videos: the training objective on videos (``test_train_video``), video selection
on the engine equal to the HF path (``test_video_selection``)."""

from __future__ import annotations

import csv
import os

import pytest

from benchmarks.device_name import device_slug

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("VS_VLLM_FULL_RUNS") != "1",
        reason="the video learning run takes ~3 min: VS_VLLM_FULL_RUNS=1",
    ),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> dict:
    import torch

    from benchmarks.video_selection_learning import main

    root = tmp_path_factory.mktemp("video-selection-learning")
    assert main(["--quick", "--out", str(root / "results"), "--work", str(root / "work")]) == 0
    out_dir = root / "results" / device_slug(torch.device("cpu"))
    assert (out_dir / "video_selection_learning.png").stat().st_size > 0
    rows = list(csv.DictReader((out_dir / "video_selection_learning.csv").open()))
    return {(r["strategy"], float(r["keep_ratio"])): r for r in rows}


def test_learned_beats_uniform_at_keep_0_1(quick_run):
    at = quick_run
    assert {s for s, _ in at} == {"full", "learned", "uniform", "random", "norm", "diversity"}
    assert {r for _, r in at} == {1.0, 0.1, 0.2, 0.3}
    row = at["learned", 0.1]
    assert row["video_selection"] == "per-video" and int(row["kept_tokens"]) == 6  # 64 tokens
    learned, uniform = at["learned", 0.1], at["uniform", 0.1]
    # The ring is in one of the 4 scenes: uniform keeps its token about 6/64 of the time; the
    # learned scorer far more often, and the answers show it.
    assert float(uniform["ring_kept"]) < 0.2
    assert float(learned["ring_kept"]) > float(uniform["ring_kept"]) + 0.3
    assert float(learned["accuracy"]) > float(uniform["accuracy"]) + 0.1
    assert float(learned["answer_loss"]) < float(uniform["answer_loss"])
    # the full-token backbone answers above chance (1/8), so the task carries signal
    assert float(at["full", 1.0]["accuracy"]) > 0.2
