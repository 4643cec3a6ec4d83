"""``vs-vllm show``: the kept tokens of one image, drawn; the same selection as the HF path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models.tiny_qwen import num_image_tokens, tiny_image

VS_VLLM = str(Path(sys.executable).with_name("vs-vllm"))


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from vs_vllm.hf import load_hf_model

    return load_hf_model(tiny_model_dir, torch.float32)


@pytest.mark.parametrize("strategy", ["norm", "random", "learned"])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_kept_tokens_are_the_hf_paths(hf, scorer_path, strategy, ratio):
    from vs_vllm.checkpoint import load_scorer
    from vs_vllm.hf import select_inputs
    from vs_vllm.selection import num_kept_tokens
    from vs_vllm.show import kept_tokens
    from vs_vllm.strategies import build_strategy

    model, processor = hf
    built = build_strategy(strategy, load_scorer(scorer_path) if strategy == "learned" else None)
    image = tiny_image(300, 200, seed=3)
    selection = kept_tokens(model, processor, image, built, ratio)
    n = num_image_tokens(300, 200)
    assert selection.num_tokens == n and len(selection.kept) == num_kept_tokens(n, ratio)
    assert selection.image.size == (selection.grid[1] * 28, selection.grid[0] * 28)
    out = processor.image_processor(images=[image], return_tensors="pt")
    text = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    ref = select_inputs(model, ids, out, built, ratio)
    assert list(selection.kept) == ref.kept_indices[0].tolist()


def test_draw_dims_dropped_squares_and_keeps_kept_ones(hf):
    from vs_vllm.show import DIM, KeptTokens, draw_kept

    image = tiny_image(84, 56, seed=1)  # 3 x 2 squares of 28 px
    selection = KeptTokens(image, (2, 3), 28, (1, 5))
    picture = np.asarray(draw_kept(selection, outline=2), dtype=np.float32)
    source = np.asarray(image, dtype=np.float32)
    inner = (slice(4, 24), slice(28 + 4, 56 - 4))  # inside kept square 1, off the outline
    assert np.array_equal(picture[inner], source[inner])
    dropped = (slice(0, 28), slice(0, 28))  # square 0
    assert np.allclose(picture[dropped], np.floor(source[dropped] * DIM), atol=1)
    assert tuple(picture[0, 28]) == (255, 215, 0)  # the outline of square 1


def test_cli_writes_the_picture(tiny_model_dir, tmp_path):
    image = tmp_path / "in.png"
    tiny_image(300, 200, seed=0).save(image)
    out = tmp_path / "kept.png"
    cmd = [VS_VLLM, "show", str(image), "--model", str(tiny_model_dir), "--strategy", "norm"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"norm kept 5 of {num_image_tokens(300, 200)} visual tokens" in proc.stdout
    from PIL import Image

    assert Image.open(out).size == (9 * 28, 6 * 28)  # 54 tokens: 6 x 9 squares


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--keep-ratio", "0"], "--keep-ratio must be in (0, 1]"),
        ([], "scorer"),  # learned, and the model holds no scorer
    ],
)
def test_cli_errors_are_one_line(tiny_model_dir, tmp_path, extra, message):
    image = tmp_path / "in.png"
    tiny_image(56, 56).save(image)
    cmd = [VS_VLLM, "show", str(image), "--model", str(tiny_model_dir), *extra]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vs-vllm: error: ") and message in last
