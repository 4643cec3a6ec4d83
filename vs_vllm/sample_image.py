"""A deterministic sample picture (no file, no download): what ``vs-vllm quickstart`` sends when
no image is given, and the images of the tiny test models (``tiny_models.tiny_qwen``)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def sample_image(width: int = 448, height: int = 336, seed: int = 0) -> Image.Image:
    """A deterministic RGB image: a colour gradient with a few rectangles, plus seeded noise."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            255.0 * xs / max(width - 1, 1),
            255.0 * ys / max(height - 1, 1),
            127.5 * (1.0 + np.sin((xs + ys) / 9.0 + seed)),
        ],
        axis=-1,
    )
    for _ in range(4):
        x0, x1 = np.sort(rng.integers(0, width + 1, size=2))
        y0, y1 = np.sort(rng.integers(0, height + 1, size=2))
        base[y0:y1, x0:x1] = rng.integers(0, 256, size=3)
    noise = rng.normal(0.0, 12.0, size=base.shape)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")
