"""A small version of the prefill-latency sweep (benchmarks/prefill_latency.py) on the real
server with the tiny model: two ratios, one image size, concurrency 1 and 2, two requests per
point. The rows, the prompt-token difference between the ratios (exactly N - k visual tokens),
a positive time to first token and the plots."""

from __future__ import annotations

import csv

import pytest

from benchmarks.prefill_latency import main
from tiny_models.tiny_qwen import num_image_tokens
from vs_vllm.selection import num_kept_tokens

pytestmark = pytest.mark.slow

SIDE = 112
COLUMNS = {
    "image_size",
    "keep_ratio",
    "concurrency",
    "image_tokens",
    "kept_tokens",
    "requests",
    "errors",
    "prompt_tokens",
    "output_tokens",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "throughput_rps",
    "kv_usage_max",
    "kv_blocks_per_request",
    "block_size",
    "device",
    "model",
    "vllm_version",
    "max_tokens",
    "command",
}


def test_small_prefill_sweep(tmp_path):
    argv = ["--ratios", "1.0,0.2", "--image-sizes", str(SIDE), "--concurrency", "1,2"]
    argv += ["--requests-per-point", "2", "--max-tokens", "2", "--out", str(tmp_path)]
    assert main([*argv, "--name", "sweep"]) == 0
    (path,) = tmp_path.glob("*/sweep.csv")
    rows = list(csv.DictReader(path.open()))
    assert not COLUMNS - set(rows[0])
    points = {(float(r["keep_ratio"]), int(r["concurrency"])): r for r in rows}
    assert sorted(points) == [(0.2, 1), (0.2, 2), (1.0, 1), (1.0, 2)] and len(rows) == 4

    n = num_image_tokens(SIDE, SIDE)
    k = num_kept_tokens(n, 0.2)
    assert k < n
    for c in (1, 2):
        full, kept = points[(1.0, c)], points[(0.2, c)]
        assert int(full["prompt_tokens"]) - int(kept["prompt_tokens"]) == n - k
        assert (int(full["image_tokens"]), int(full["kept_tokens"])) == (n, n)
        assert (int(kept["image_tokens"]), int(kept["kept_tokens"])) == (n, k)
    for r in rows:
        assert int(r["requests"]) == 2 and int(r["errors"]) == 0
        assert int(r["image_size"]) == SIDE and r["max_tokens"] == "2"
        assert float(r["output_tokens"]) == 2
        assert 0 < float(r["ttft_p50_s"]) <= float(r["ttft_p90_s"]) <= float(r["ttft_p99_s"])
        assert float(r["throughput_rps"]) > 0
        assert int(r["kv_blocks_per_request"]) >= 1 and float(r["kv_usage_max"]) >= 0
        assert r["vllm_version"] and "--ratios 1.0,0.2" in r["command"]
    for name in ("ttft", "kv", "throughput"):
        png = path.parent / f"sweep_{name}.png"
        assert png.stat().st_size > 1000, png


def test_small_video_sweep(tmp_path):
    """``--video-frames``: one server, videos as MP4 data URLs, per-request video ratios; the
    prompt-token difference between the ratios is exactly N - k video tokens."""
    from vs_vllm.keep_ratio import video_kept_tokens

    argv = ["--video-frames", "4", "--video-size", "168x112", "--ratios", "1.0,0.25"]
    argv += ["--concurrency", "1", "--requests-per-point", "2", "--warmup-burst", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/prefill_latency_video.csv")
    rows = {float(r["keep_ratio"]): r for r in csv.DictReader(path.open())}
    n = 2 * num_image_tokens(168, 112)  # 4 frames: 2 temporal patches
    k = video_kept_tokens(2, n // 2, 0.25, per_frame=False)
    assert int(rows[1.0]["image_tokens"]) == n and int(rows[0.25]["kept_tokens"]) == k
    assert int(rows[1.0]["prompt_tokens"]) - int(rows[0.25]["prompt_tokens"]) == n - k
    assert all(r["media"] == "video" and int(r["errors"]) == 0 for r in rows.values())


def test_refuses_a_bad_name(capsys):
    """``--name`` is a plain file stem (``benchmarks/results_name.py``), checked before any work."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--name", "../escape"])
    assert exit_info.value.code == 2
    assert "plain file stem" in capsys.readouterr().err
