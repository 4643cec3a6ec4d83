"""The README's main job: `vs-vllm quickstart` on the bundled demo model (two real vLLM
servers at keep 0.1, learned vs random), and on any model given with ``--model``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

VS_VLLM = str(Path(sys.executable).with_name("vs-vllm"))


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_bundled_demo_shows_learned_beating_random(tmp_path):
    """The main job: every held-out question in three modes, with the per-image lines, the
    prompt tokens of 36 and 3 visual tokens, and the pictures; the trained scorer answers
    more of them right than random selection at keep 0.1."""
    from PIL import Image

    from vs_vllm.bundled_demo import DEMO_DIR, MODES

    items = [json.loads(x) for x in (DEMO_DIR / "questions.jsonl").read_text().splitlines()]
    proc = subprocess.run(
        [VS_VLLM, "quickstart", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    summary = {}
    for mode in MODES:
        m = re.search(
            rf"^{re.escape(mode.label)}\s+(\d+)/(\d+)\s+(\d+)\s+(\d+)$", out, flags=re.MULTILINE
        )
        assert m, out[-3000:]
        right, total, tokens, ttft = (int(v) for v in m.groups())
        assert total == len(items) and ttft > 0
        summary[mode.name] = (right, tokens)
        picture = Image.open(tmp_path / f"{mode.name.replace(' ', '_')}.png")
        assert picture.size[0] == 8 * (168 + 4) - 4  # 8 images a row
    for item in items:  # one line per image: its truth, then every mode's answer
        (line,) = [x for x in out.splitlines() if x.startswith(item["image"] + " ")]
        assert line.split()[1] == item["answer"]
        assert line.count(" ok") + line.count(" WRONG") == len(MODES)
    # 36 visual tokens per image in full, max(1, int(36 * 0.1)) = 3 at keep 0.1
    assert summary["all tokens"][1] - summary["learned"][1] == 36 - 3
    assert summary["learned"][1] == summary["random"][1]
    # the point: at 10% of the visual tokens the trained scorer answers right far more often
    assert summary["learned"][0] >= summary["random"][0] + len(items) // 6


def test_quickstart_with_a_model(tiny_model_dir):
    """``--model``: one image at ratio 1.0 and at the server's ratio; the model's own settings
    unless ``--serve-arg`` changes them (here the tiny model's float32 / short context)."""
    serve = [f"--serve-arg={a}" for a in ("--dtype=float32", "--max-model-len=2048")]
    proc = subprocess.run(
        [
            VS_VLLM,
            "quickstart",
            "--model",
            str(tiny_model_dir),
            "--strategy",
            "norm",
            "--max-tokens",
            "3",
            *serve,
            "--serve-arg=--enforce-eager",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    full = int(re.search(r"all visual tokens \(ratio 1\.0\): (\d+) prompt tokens", out)[1])
    kept = int(re.search(r"VisionSelector \(ratio 0\.3, norm\): (\d+) prompt tokens", out)[1])
    # The generated 448x336 image has 54 visual tokens at the tiny model's max_pixels; 16 kept.
    assert full - kept == 54 - 16
    assert "server stopped" in out


class _Stop(Exception):
    pass


def test_real_models_are_served_with_their_own_settings(monkeypatch, tmp_path):
    """``--model`` (a real model): no float32, 2048-token context or eager mode forced on it."""
    import argparse
    import contextlib

    from vs_vllm import quickstart

    seen: list[tuple[str, tuple[str, ...]]] = []

    @contextlib.contextmanager
    def fake_served(model, *args, **kwargs):
        seen.append((str(model), args))
        raise _Stop
        yield  # pragma: no cover

    monkeypatch.setattr(quickstart, "served", fake_served)
    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    args = ["--model", str(tmp_path / "my-model"), "--serve-arg=--max-num-seqs=4"]
    with pytest.raises(_Stop):
        quickstart.run(parser.parse_args(args))
    ((model, served_args),) = seen
    assert model == str(tmp_path / "my-model")
    assert "--vision-keep-ratio" in served_args and "--max-num-seqs=4" in served_args
    assert not {"--dtype", "--max-model-len", "--enforce-eager"} & set(served_args)


def test_sample_image_is_the_tiny_models_image():
    """quickstart's default picture is the product's ``sample_image``, which the test models'
    ``tiny_image`` also returns, so the token counts above hold; sizes are checked."""
    import numpy as np
    import pytest

    from tiny_models.tiny_qwen import tiny_image
    from vs_vllm.sample_image import sample_image

    for size, seed in (((448, 336), 0), ((57, 31), 5), ((1, 1), 2)):
        mine = sample_image(*size, seed=seed)
        assert mine.mode == "RGB" and mine.size == size
        assert np.array_equal(np.asarray(mine), np.asarray(tiny_image(*size, seed=seed)))
    assert sample_image().size == (448, 336)
    with pytest.raises(ValueError, match="image size must be positive"):
        sample_image(0, 5)
