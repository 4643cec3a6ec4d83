"""``vs-vllm show``: which visual tokens of an image a strategy keeps, as a picture.

Runs the model's vision tower and the selection the server runs (the same strategies and the
same :func:`~vs_vllm.selection.select_visual_tokens`) on one image, with transformers, no
server, and draws the image as the model sees it (resized by its processor) with each kept
merged token's square outlined and every other square dimmed::

    vs-vllm show photo.jpg --model DIR --keep-ratio 0.1 --vision-selector scorer/ --out kept.png
    vs-vllm show photo.jpg --model DIR --keep-ratio 0.1 --strategy random --out random.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["KeptTokens", "add_arguments", "draw_kept", "kept_tokens", "run"]

OUTLINE = (255, 215, 0)  # kept squares
DIM = 0.3  # brightness of the dropped squares


@dataclass(frozen=True)
class KeptTokens:
    """One image's selection: the image as the model sees it, its merged-token grid
    (rows, columns), the side of one merged token in pixels and the kept token indices
    (raster order, ascending)."""

    image: Image.Image
    grid: tuple[int, int]
    cell: int
    kept: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def kept_tokens(
    model: torch.nn.Module,
    processor: Any,
    image: Image.Image,
    strategy: Any,
    keep_ratio: float,
) -> KeptTokens:
    """Tower + selection of one image (a transformers model of a supported family)."""
    from vs_vllm.batch import PackedImages
    from vs_vllm.hf import image_features, model_adapter
    from vs_vllm.selection import select_visual_tokens

    adapter = model_adapter(model)
    image = image.convert("RGB")
    out = processor.image_processor(images=[image], return_tensors="pt")
    ((_, height, width),) = adapter.item_grids(model.config, out, "image")
    merge = adapter.merge_size(model.config)
    patch = adapter.patch_size(model.config)
    with torch.no_grad():
        feats = image_features(model, out)
        images = PackedImages.from_ratio([feats.shape[0]], keep_ratio, feats.device)
        selected = select_visual_tokens(
            feats, images, strategy, score_dim=adapter.score_width(model.config)
        )
    resized = image.resize((width * patch, height * patch), Image.Resampling.BICUBIC)
    kept = tuple(sorted(int(i) for i in selected.indices.tolist()))  # ok-sync: CLI output
    return KeptTokens(resized, (height // merge, width // merge), patch * merge, kept)


def draw_kept(selection: KeptTokens, outline: int = 2) -> Image.Image:
    """The image with the dropped squares dimmed and the kept ones outlined."""
    rows, cols = selection.grid
    cell = selection.cell
    pixels = np.asarray(selection.image, dtype=np.float32)
    keep = np.zeros((rows, cols), dtype=bool)
    for index in selection.kept:
        keep[divmod(index, cols)] = True
    mask = np.kron(keep, np.ones((cell, cell), dtype=bool))[: pixels.shape[0], : pixels.shape[1]]
    shaded = np.where(mask[..., None], pixels, pixels * DIM)
    picture = Image.fromarray(shaded.clip(0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(picture)
    for index in selection.kept:
        r, c = divmod(index, cols)
        box = (c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1)
        draw.rectangle(box, outline=OUTLINE, width=outline)
    return picture


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vs_vllm.strategies import available_strategies

    p.add_argument("image", type=Path, help="an image file")
    p.add_argument("--model", required=True, help="model folder of a supported family")
    p.add_argument("--keep-ratio", type=float, default=0.1, help="in (0, 1] (default 0.1)")
    p.add_argument("--strategy", choices=available_strategies(), default="learned")
    p.add_argument(
        "--vision-selector",
        help="scorer checkpoint for the learned strategy (default: the one in --model)",
    )
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")


def run(args: argparse.Namespace) -> int:
    from vs_vllm.checkpoint import CheckpointError, load_scorer
    from vs_vllm.hf import load_hf_model, model_adapter
    from vs_vllm.selection import validate_keep_ratio
    from vs_vllm.strategies import build_strategy, strategy_class

    try:
        ratio = validate_keep_ratio(args.keep_ratio, name="--keep-ratio")
        with Image.open(args.image) as img:
            image = img.convert("RGB")
        model, processor = load_hf_model(args.model, torch.float32)
        scorer = None
        if strategy_class(args.strategy).needs_checkpoint:
            hidden = model_adapter(model).score_width(model.config)
            scorer = load_scorer(args.vision_selector or args.model, hidden)
        selection = kept_tokens(
            model, processor, image, build_strategy(args.strategy, scorer), ratio
        )
    except (ValueError, OSError, CheckpointError) as err:
        raise SystemExit(f"vs-vllm: error: {err}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw_kept(selection).save(args.out)
    print(
        f"{args.strategy} kept {len(selection.kept)} of {selection.num_tokens} visual tokens "
        f"({selection.grid[0]} x {selection.grid[1]} squares of {selection.cell} px): "
        f"{list(selection.kept)}"
    )
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - CLI convenience
    p = argparse.ArgumentParser(prog="vs-vllm show")
    add_arguments(p)
    return run(p.parse_args(argv))
