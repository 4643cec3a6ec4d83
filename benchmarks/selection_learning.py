"""Does the scorer learn? A synthetic task where one visual token matters, runnable on a CPU.

Each image is a textured grey background of 6x6 = 36 merged visual tokens (``--family
qwen2_5_vl``, the default: 168x168 px at patch 14, merge 2; ``--family qwen3_vl``: 192x192 px
at patch 16, merge 2) holding one shape of each of 8 kinds (ring, disk, frame, square,
triangle, diamond, cross, bar), each inside its own cell of one merged token (28x28 or 32x32
px), each in a random colour of the same 8-colour palette. The backbone is fitted to answer
"What colour is the <kind>?" for every kind, so all 8 shapes are equally important to it,
equally far from the background and about equally large; the scorer is then trained, and
everything evaluated, on "What colour is the ring?" only. The one token that matters is the
ring's, and only its shape tells it apart: ``norm`` and ``diversity`` have no reason to prefer
it over the other 7 shapes (at keep 0.1 = 3 of 36 tokens they keep the ring about 3/8 of the
time at best), and ``uniform`` / ``random`` keep it 3/36 of the time. The scorer never sees the
question; it has to learn from the answers' loss that rings matter.

Steps (seeded; the long phases print progress):

1. write the images and LLaVA-format JSONL files (:mod:`vs_vllm.train.data`): a backbone split
   (several questions per image, one per kind, as a multi-turn conversation), a scorer split
   and a held-out split (one question, about the ring);
2. build a small random-init Qwen2.5-VL (:func:`tiny_models.tiny_qwen.build_tiny_qwen25_vl`)
   or Qwen3-VL with 2 deepstack levels
   (:func:`tiny_models.tiny_qwen3_vl.build_tiny_qwen3_vl`), load it with
   :func:`vs_vllm.hf.load_hf_model` and fit every weight of it on the full-token task (plain
   LM loss on the answers, all visual tokens kept), then freeze it;
3. train the VisionSelector scorer on the frozen backbone with
   :func:`vs_vllm.train.trainer.train` (soft top-k at keep 0.2 as in the reference, BCE
   curriculum 0.1 -> 2.0, cosine lr);
4. on the held-out split, at keep 0.1 / 0.2 / 0.3, compare ``learned`` with ``uniform``,
   ``random``, ``norm``, ``diversity`` and the full-token model through the HF selection path
   (:func:`vs_vllm.hf.select_inputs`: hard top-k, the kept tokens at their unpruned positions):
   ``answer_loss`` (teacher-forced LM loss over the answer tokens and ``<|im_end|>``),
   ``accuracy`` (argmax of the first answer token over the 8 colours, whose first tokens all
   differ), ``exact_match`` (every answer token is the argmax: greedy decoding gives exactly
   the answer) and ``ring_kept`` (how often the ring's token survives the selection).

    python benchmarks/selection_learning.py            # full run (about 10 minutes on 2 cores)
    python benchmarks/selection_learning.py --quick    # CI size (2-3 minutes)
    python benchmarks/selection_learning.py --family qwen3_vl   # the same on tiny Qwen3-VL

Writes ``<out>/<device>/selection_learning.csv`` and ``.png`` (``--family qwen3_vl``:
``selection_learning_qwen3_vl.csv`` and ``.png``; ``--out`` defaults to
``benchmarks/results``), one CSV row per (strategy, keep ratio) with the command line and the
run's facts (family included) in every row, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.device_name import device_label, device_slug
from vs_vllm.keep_ratio import num_kept_tokens

# Name -> RGB. The first BPE token of every name differs (red, g, b, y, w, or, p, cy) in the
# tiny tokenizer, so the first answer token alone says which colour the model picked.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 185, 40),
    "blue": (40, 70, 235),
    "yellow": (235, 220, 40),
    "white": (245, 245, 245),
    "orange": (245, 140, 25),
    "purple": (150, 45, 205),
    "cyan": (35, 210, 220),
}
# Every image holds one shape of each kind; the backbone learns to answer about any of them,
# the scorer is trained and evaluated on questions about the ring only.
KINDS = ("ring", "disk", "frame", "square", "triangle", "diamond", "cross", "bar")
TARGET = "ring"
KEEP_RATIOS = (0.1, 0.2, 0.3)
STRATEGIES = ("learned", "uniform", "random", "norm", "diversity")


@dataclass(frozen=True)
class RunConfig:
    """Sizes of one run; ``--quick`` and the full run differ only here."""

    grid: int = 6  # cells per side: grid**2 merged tokens per image
    backbone_images: int = 4000
    backbone_turns: int = 8  # questions per backbone image (different kinds)
    backbone_steps: int = 3000
    backbone_batch: int = 16
    backbone_lr: float = 3e-3
    scorer_images: int = 1500
    scorer_steps: int = 300
    scorer_batch: int = 16
    scorer_micro_batch: int = 8
    scorer_lr: float = 3e-3
    train_keep: float = 0.2  # the reference trains at 0.2 and evaluates at 0.1 / 0.2 / 0.3
    eval_images: int = 300
    text_hidden: int = 64
    text_layers: int = 2
    vision_hidden: int = 64
    vision_depth: int = 2
    seed: int = 0


QUICK = RunConfig(
    backbone_images=1200,
    backbone_steps=800,
    scorer_images=600,
    scorer_steps=150,
    eval_images=150,
)


# ----------------------------------------------------------------------------- data


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey texture: random low-contrast stripes and blobs plus pixel noise."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    level = rng.uniform(75, 125)
    img = np.full((size, size), level, dtype=np.float32)
    for _ in range(3):
        angle = rng.uniform(0, math.pi)
        freq = rng.uniform(0.08, 0.5)
        phase = rng.uniform(0, 2 * math.pi)
        img += rng.uniform(4, 12) * np.sin(
            freq * (xs * math.cos(angle) + ys * math.sin(angle)) + phase
        )
    rgb = img[..., None] + rng.uniform(-6, 6, size=3)  # a slight tint per image
    rgb += rng.normal(0.0, 7.0, size=rgb.shape)
    return np.clip(rgb, 0, 255)


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in colour)


def _draw_shape(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, kind: str, x0, y0, colour, cell: int
):
    """One ``kind`` shape (about 170-300 px of ink), entirely inside the ``cell`` x ``cell``
    square at (x0, y0)."""
    size = int(rng.integers(18, 23))  # bounding box
    ox, oy = (int(v) for v in rng.integers(1, cell - size, size=2))
    left, top = x0 + ox, y0 + oy
    right, bottom = left + size - 1, top + size - 1
    mid_x, mid_y = (left + right) / 2, (top + bottom) / 2
    thick = int(rng.integers(4, 6))
    if kind == "ring":
        draw.ellipse((left, top, right, bottom), outline=colour, width=thick)
    elif kind == "disk":
        inset = 2
        draw.ellipse((left + inset, top + inset, right - inset, bottom - inset), fill=colour)
    elif kind == "frame":
        draw.rectangle((left, top, right, bottom), outline=colour, width=thick)
    elif kind == "square":
        inset = 3
        draw.rectangle((left + inset, top + inset, right - inset, bottom - inset), fill=colour)
    elif kind == "triangle":
        draw.polygon([(mid_x, top), (right, bottom), (left, bottom)], fill=colour)
    elif kind == "diamond":
        draw.polygon([(mid_x, top), (right, mid_y), (mid_x, bottom), (left, mid_y)], fill=colour)
    elif kind == "cross":
        h = thick / 2 + 0.5
        draw.rectangle((left, mid_y - h, right, mid_y + h), fill=colour)
        draw.rectangle((mid_x - h, top, mid_x + h, bottom), fill=colour)
    elif kind == "bar":
        h = int(rng.integers(4, 6))
        draw.rectangle((left, mid_y - h, right, mid_y + h), fill=colour)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def draw_sample(
    rng: np.random.Generator, grid: int, cell: int, kinds: tuple[str, ...] = KINDS
) -> tuple[Image.Image, dict]:
    """One image of ``grid`` x ``grid`` cells of ``cell`` px (one merged token each) holding one
    shape of every kind, each in its own cell, colours at random.

    Returns the image and ``{"colours": {kind: colour name}, "cells": {kind: token index}}``
    (token index = the merged visual token, raster order, that holds the shape)."""
    size = grid * cell
    img = Image.fromarray(_background(rng, size).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    names = list(COLOURS)
    cells = rng.choice(grid * grid, size=len(kinds), replace=False)
    info: dict = {"colours": {}, "cells": {}}
    for kind, token in zip(kinds, cells, strict=True):
        cy, cx = divmod(int(token), grid)
        name = names[int(rng.integers(len(names)))]
        _draw_shape(draw, rng, kind, cx * cell, cy * cell, _jitter(rng, COLOURS[name]), cell)
        info["colours"][kind] = name
        info["cells"][kind] = int(token)
    return img, info


def question(kind: str) -> str:
    return f"What colour is the {kind}?"


def write_split(
    root: Path, name: str, count: int, cfg: RunConfig, seed: int, turns: int, cell: int
) -> Path:
    """``count`` images of ``cell``-px cells as ``<root>/<name>.jsonl`` + PNGs, and
    ``<name>.meta.json``.

    ``turns`` > 0: that many questions about different shape kinds, in a random order, as a
    multi-turn conversation (backbone training); 0: one question, about the ring."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    lines, meta = [], []
    for i in range(count):
        img, info = draw_sample(rng, cfg.grid, cell)
        rel = f"{name}/{i:05d}.png"
        img.save(root / rel)
        asked = [KINDS[j] for j in rng.permutation(len(KINDS))[:turns]] if turns else [TARGET]
        dialogue = []
        for j, kind in enumerate(asked):
            marker = "<image>\n" if j == 0 else ""
            dialogue.append({"from": "human", "value": marker + question(kind)})
            dialogue.append({"from": "gpt", "value": info["colours"][kind]})
        lines.append(json.dumps({"image": rel, "conversations": dialogue}))
        meta.append({"answer": info["colours"][TARGET], "target_token": info["cells"][TARGET]})
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (root / f"{name}.meta.json").write_text(json.dumps(meta))
    return path


def split_plan(cfg: RunConfig) -> dict[str, tuple[int, int, int]]:
    """The run's data splits: name -> (images, questions per image, seed of ``write_split``)."""
    return {
        "backbone": (cfg.backbone_images, cfg.backbone_turns, cfg.seed * 1000),
        "scorer": (cfg.scorer_images, 0, cfg.seed * 1000 + 1),
        "heldout": (cfg.eval_images, 0, cfg.seed * 1000 + 2),
    }


# ----------------------------------------------------------------------------- backbone


def _encode_all(
    path: Path, processor, max_pixels: int, half_pixels: bool = False, **video_options
) -> list[dict[str, torch.Tensor]]:
    """Every sample of a JSONL split, encoded once (``half_pixels``: pixel values kept in
    float16, half the memory, for the backbone's many training images; ``video_options``: the
    encoder's ``max_frames`` / ``video_fps``)."""
    from vs_vllm.train.data import SampleEncoder, read_samples

    encoder = SampleEncoder(processor, max_pixels=max_pixels, **video_options)
    out = []
    for sample in read_samples(path, path.parent):
        item = encoder(sample)
        if half_pixels:
            for key in ("pixel_values", "pixel_values_videos"):
                if key in item:
                    item[key] = item[key].half()
        out.append(item)
    return out


def _qwen2_5_vl_spec(cfg: RunConfig, cell: int):
    """A :class:`TinyQwenSpec` with head_dim 32 in both towers."""
    from tiny_models.tiny_qwen import TinyQwenSpec

    return TinyQwenSpec(
        text_hidden=cfg.text_hidden,
        text_layers=cfg.text_layers,
        heads=cfg.text_hidden // 32,
        kv_heads=max(1, cfg.text_hidden // 64),
        intermediate=2 * cfg.text_hidden,
        vision_depth=cfg.vision_depth,
        vision_hidden=cfg.vision_hidden,
        vision_heads=cfg.vision_hidden // 32,
        vision_intermediate=2 * cfg.vision_hidden,
        min_pixels=cell * cell * 4,
        max_pixels=cfg.grid**2 * cell**2,
    )


def _qwen3_vl_spec(cfg: RunConfig, cell: int):
    """A dense :class:`TinyQwen3VLSpec` of the same sizes (head_dim 32 in both towers), with
    deepstack taps after the first two vision blocks (into text layers 0 and 1) and a learned
    position grid of one entry per patch of the image (2 * grid patches per side)."""
    from tiny_models.tiny_qwen3_vl import TinyQwen3VLSpec

    return TinyQwen3VLSpec(
        text_hidden=cfg.text_hidden,
        text_layers=cfg.text_layers,
        heads=cfg.text_hidden // 32,
        kv_heads=max(1, cfg.text_hidden // 64),
        head_dim=32,
        intermediate=2 * cfg.text_hidden,
        mrope_section=(6, 5, 5),  # sums to head_dim / 2
        vision_depth=cfg.vision_depth,
        vision_hidden=cfg.vision_hidden,
        vision_heads=cfg.vision_hidden // 32,
        vision_intermediate=2 * cfg.vision_hidden,
        deepstack_visual_indexes=(0, 1),
        num_position_embeddings=(2 * cfg.grid) ** 2,
        min_pixels=cell * cell * 4,
        max_pixels=cfg.grid**2 * cell**2,
    )


def _build_qwen2_5_vl(out: Path, spec, seed: int) -> Path:
    from tiny_models.tiny_qwen import build_tiny_qwen25_vl

    return build_tiny_qwen25_vl(out, spec, seed=seed)


def _build_qwen3_vl(out: Path, spec, seed: int) -> Path:
    from tiny_models.tiny_qwen3_vl import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(out, spec, seed=seed, variant="dense")


@dataclass(frozen=True)
class Family:
    """A model family the benchmark can build: its merged-token size and tiny-model builder."""

    name: str
    label: str  # for titles
    cell: int  # pixels per side of one merged visual token: patch * merge
    make_spec: Callable[[RunConfig, int], Any]  # (cfg, cell) -> the builder's spec
    build: Callable[[Path, Any, int], Path]  # (out dir, spec, seed) -> model dir
    results_name: str  # CSV / PNG file stem

    def spec(self, cfg: RunConfig):
        return self.make_spec(cfg, self.cell)


FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": Family(
        "qwen2_5_vl", "Qwen2.5-VL", 28, _qwen2_5_vl_spec, _build_qwen2_5_vl, "selection_learning"
    ),
    "qwen3_vl": Family(
        "qwen3_vl",
        "Qwen3-VL",
        32,
        _qwen3_vl_spec,
        _build_qwen3_vl,
        "selection_learning_qwen3_vl",
    ),
}
DEFAULT_FAMILY = "qwen2_5_vl"


def tiny_spec(cfg: RunConfig, family: Family | str = DEFAULT_FAMILY):
    """The backbone's sizes for ``family``: head_dim 32 in both towers, max_pixels = the
    ``grid`` x ``grid`` image."""
    family = FAMILIES[family] if isinstance(family, str) else family
    return family.spec(cfg)


def fit_backbone(model, items: list[dict[str, torch.Tensor]], pad_id: int, cfg: RunConfig, log):
    """Train every weight of ``model`` on the full-token task: AdamW, cosine lr, LM loss on
    the answers (``labels``), batches drawn from seeded epoch permutations of ``items``."""
    from vs_vllm.hf import model_adapter
    from vs_vllm.train.data import collate
    from vs_vllm.train.objective import answer_cross_entropy
    from vs_vllm.train.schedule import cosine_with_warmup

    model.train()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.backbone_lr, weight_decay=0.01)
    sched = cosine_with_warmup(opt, cfg.backbone_steps, warmup_ratio=0.05)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    order: list[int] = []
    t0 = time.perf_counter()
    loss_avg = acc_avg = None
    for step in range(1, cfg.backbone_steps + 1):
        if len(order) < cfg.backbone_batch:
            order += torch.randperm(len(items), generator=gen).tolist()
        idx, order = order[: cfg.backbone_batch], order[cfg.backbone_batch :]
        adapter = model_adapter(model)
        batch = collate([items[i] for i in idx], pad_token_id=pad_id, adapter=adapter)
        media = {k: batch[k] for k in adapter.field_names() if k in batch}
        for modality in ("image", "video"):
            fields = adapter.fields(modality)
            if fields is not None and fields.pixels in media:
                media[fields.pixels] = media[fields.pixels].float()
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=batch.get("mm_token_type_ids"),
            **media,
        )
        loss = answer_cross_entropy(out.logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # first token of every answer: the colour choice
            labels = batch["labels"]
            starts = (labels[:, 1:] != -100) & (labels[:, :-1] == -100)
            rows, cols = starts.nonzero(as_tuple=True)
            pred = out.logits[rows, cols].argmax(-1)
            acc = float((pred == labels[rows, cols + 1]).float().mean())
        value = loss.item()
        loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
        acc_avg = acc if acc_avg is None else 0.95 * acc_avg + 0.05 * acc
        if step % 100 == 0 or step == cfg.backbone_steps:
            log(
                f"  backbone step {step}/{cfg.backbone_steps}: answer loss {loss_avg:.3f}, "
                f"colour accuracy {acc_avg:.3f} (training batches, moving average), "
                f"{time.perf_counter() - t0:.0f} s"
            )
    model.eval()
    model.requires_grad_(False)
    return {
        "backbone_seconds": time.perf_counter() - t0,
        "backbone_train_loss": loss_avg,
        "backbone_train_accuracy": acc_avg,
    }


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalItem:
    prompt_ids: torch.Tensor  # (1, L)
    answer_ids: torch.Tensor  # (m,) answer tokens + <|im_end|>
    grid_thw: torch.Tensor
    feats: torch.Tensor  # (N, D) visual tokens
    answer: str
    target_token: int


def prepare_eval(model, items, meta) -> list[EvalItem]:
    from vs_vllm.hf import image_features

    out = []
    with torch.no_grad():
        for enc, info in zip(items, meta, strict=True):
            labelled = (enc["labels"] != -100).nonzero().flatten()
            a, b = int(labelled[0]), int(labelled[-1]) + 1
            out.append(
                EvalItem(
                    prompt_ids=enc["input_ids"][:a].unsqueeze(0),
                    answer_ids=enc["input_ids"][a:b],
                    grid_thw=enc["image_grid_thw"],
                    feats=image_features(model, enc),
                    answer=info["answer"],
                    target_token=info["target_token"],
                )
            )
    return out


@torch.no_grad()
def score_item(model, item: EvalItem, strategy, ratio: float, colour_ids: torch.Tensor) -> dict:
    """Hard selection, then one teacher-forced forward over the answer.

    The pruned prompt and the answer tokens go through the language model in one pass: the
    kept visual rows (whole: Qwen3-VL's deepstack levels too) are placed again by
    :func:`~vs_vllm.hf.visual_inputs` over the prompt + answer ids, so the extra text-model
    arguments (deepstack levels and where they sit) span the whole sequence."""
    from vs_vllm.hf import language_model_logits, select_inputs, visual_inputs

    inputs = select_inputs(
        model,
        item.prompt_ids,
        {"image_grid_thw": item.grid_thw},
        strategy,
        ratio,
        image_embeds=item.feats,
    )
    feed = item.answer_ids[:-1].unsqueeze(0)
    ids = torch.cat([inputs.input_ids, feed], dim=1)
    rows = item.feats.index_select(0, inputs.kept_indices[0])  # one image per prompt
    embeds, text_kwargs = visual_inputs(model, ids, rows)
    tail = inputs.next_position + torch.arange(feed.shape[1], dtype=torch.int64)
    positions = torch.cat([inputs.position_ids, tail.view(1, 1, -1).expand(3, 1, -1)], dim=2)
    logits = language_model_logits(model, embeds, positions, text_kwargs=text_kwargs)
    logits = logits[0, inputs.seq_len - 1 :].float()
    loss = torch.nn.functional.cross_entropy(logits, item.answer_ids)
    choice = int(logits[0, colour_ids].argmax())
    return {
        "loss": float(loss),
        "correct": float(int(colour_ids[choice]) == int(item.answer_ids[0])),
        "exact": float(bool((logits.argmax(-1) == item.answer_ids).all())),
        "hit": float(item.target_token in inputs.kept_indices[0].tolist()),
    }


def evaluate(
    model, items: list[EvalItem], strategies: dict, colour_ids, log, ratios=KEEP_RATIOS
) -> list[dict]:
    """One row per (strategy, keep ratio), after a ``full`` row (every token kept)."""
    from vs_vllm.strategies import build_strategy

    rows = []
    settings = [("full", 1.0)] + [(s, r) for r in ratios for s in strategies]
    n_tokens = int(items[0].feats.shape[0])
    for name, ratio in settings:
        t0 = time.perf_counter()
        # at ratio 1.0 nothing is removed, whatever the strategy
        strategy = strategies[name] if name in strategies else build_strategy("uniform")
        acc = {"loss": 0.0, "correct": 0.0, "exact": 0.0, "hit": 0.0}
        for item in items:
            for key, value in score_item(model, item, strategy, ratio, colour_ids).items():
                acc[key] += value / len(items)
        rows.append(
            {
                "keep_ratio": ratio,
                "kept_tokens": num_kept_tokens(n_tokens, ratio),
                "strategy": name,
                "answer_loss": round(acc["loss"], 4),
                "accuracy": round(acc["correct"], 4),
                "exact_match": round(acc["exact"], 4),
                "ring_kept": round(acc["hit"], 4),
            }
        )
        log(
            f"  eval {name:>9} @ {ratio:.1f}: acc {acc['correct']:.3f}  loss {acc['loss']:.3f}  "
            f"ring kept {acc['hit']:.3f}  ({time.perf_counter() - t0:.1f} s)"
        )
    return rows


# ----------------------------------------------------------------------------- output


def print_table(rows: list[dict]) -> None:
    print(
        f"{'keep':>5} {'k':>3} {'strategy':>10} {'accuracy':>9} {'exact':>7} "
        f"{'ans loss':>9} {'ring kept':>10}"
    )
    for r in rows:
        print(
            f"{r['keep_ratio']:>5.1f} {r['kept_tokens']:>3} {r['strategy']:>10} "
            f"{r['accuracy']:>9.3f} {r['exact_match']:>7.3f} {r['answer_loss']:>9.3f} "
            f"{r['ring_kept']:>10.3f}"
        )


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r for r in rows if r["strategy"] == "full")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in zip(
        axes,
        ("accuracy", "answer_loss", "ring_kept"),
        ("colour accuracy (held-out)", "answer LM loss (held-out)", "ring token kept"),
        strict=True,
    ):
        for name in STRATEGIES:
            pts = [(r["keep_ratio"], r[key]) for r in rows if r["strategy"] == name]
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.axhline(full[key], color="k", linestyle="--", label="full (all tokens)")
        if key == "accuracy":
            ax.axhline(1 / len(COLOURS), color="grey", linestyle=":", label="chance")
        ax.set(xlabel="keep ratio", title=label, xticks=KEEP_RATIOS)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def run_benchmark(
    argv: list[str],
    *,
    script: str,
    description: str,
    configs: tuple[Any, Any],
    run_fn: Callable[[Any, Path, Callable[[str], None], Family], tuple[list[dict], dict]],
    stem: Callable[[Family], str],
    subtitle: Callable[[Any, Family, dict], str],
) -> int:
    """The command line both learning benchmarks share: parse ``--quick --family --out --work
    --seed --threads``, run ``run_fn(cfg, work, log, family)`` (``configs``: the full and the
    quick config), write ``<out>/<device>/<stem>.csv`` (the command and the run's facts in
    every row) and its plot, and print the table."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small CI-sized run (a few minutes)")
    p.add_argument(
        "--family",
        choices=tuple(FAMILIES),
        default=DEFAULT_FAMILY,
        help="backbone family of the tiny model (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--work", type=Path, default=None, help="keep data and models here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)

    cfg = replace(configs[1] if args.quick else configs[0], seed=args.seed)
    family = FAMILIES[args.family]
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", script, *argv])
    device = torch.device("cpu")  # sized for a CPU on purpose; the HF path is device-agnostic
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {msg}", flush=True)

    work = args.work or Path(tempfile.mkdtemp(prefix=f"vs-{Path(script).stem}-"))
    try:
        rows, info = run_fn(cfg, work, log, family)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = {
        "command": command,
        "family": family.name,
        "device": device_label(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()},
    }
    csv_path = out_dir / f"{stem(family)}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *facts])
        writer.writeheader()
        writer.writerows({**r, **facts} for r in rows)
    title = f"{command}   ({device_label(device)}, {facts['seconds']:.0f} s)\n"
    plot(rows, csv_path.with_suffix(".png"), title + subtitle(cfg, family, info))
    print()
    print(f"command: {command}")
    print_table(rows)
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')} in {facts['seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(
        list(sys.argv[1:] if argv is None else argv),
        script="benchmarks/selection_learning.py",
        description=__doc__.split("\n\n")[0],
        configs=(RunConfig(), QUICK),
        run_fn=run,
        stem=lambda family: family.results_name,
        subtitle=lambda cfg, family, info: (
            f"{cfg.grid**2} tokens/image, 8 shapes, question about the ring; {family.label} "
            f"backbone {info['backbone_params'] / 1e6:.2f}M params; scorer trained at keep "
            f"{cfg.train_keep}"
        ),
    )


def run(
    cfg: RunConfig, work: Path, log, family: Family = FAMILIES[DEFAULT_FAMILY]
) -> tuple[list[dict], dict]:
    """Data, backbone fit, scorer training, evaluation; the table rows and facts of the run."""
    from vs_vllm.checkpoint import load_scorer
    from vs_vllm.hf import load_hf_model
    from vs_vllm.strategies import build_strategy
    from vs_vllm.train.trainer import TrainConfig, train

    torch.manual_seed(cfg.seed)
    log(f"run config: {asdict(cfg)}, family {family.name} ({family.cell} px per merged token)")
    data = work / "data"
    splits = split_plan(cfg)
    paths = {
        name: write_split(data, name, count, cfg, seed, turns, family.cell)
        for name, (count, turns, seed) in splits.items()
    }
    log(f"wrote {sum(c for c, _, _ in splits.values())} images and their JSONL files under {data}")

    spec = family.spec(cfg)
    init_dir = family.build(work / "init", spec, cfg.seed)
    model, processor = load_hf_model(init_dir, torch.float32)
    info: dict = {"backbone_params": sum(p.numel() for p in model.parameters())}
    tokenizer = processor.tokenizer
    colour_ids = torch.tensor(
        [tokenizer(name, add_special_tokens=False)["input_ids"][0] for name in COLOURS]
    )
    if len(set(colour_ids.tolist())) != len(COLOURS):
        raise RuntimeError("the colour names must start with different tokens")

    items = _encode_all(paths["backbone"], processor, spec.max_pixels, half_pixels=True)
    log(
        f"phase 1: fitting the backbone ({info['backbone_params'] / 1e6:.2f}M parameters, "
        f"{len(items)} images x {cfg.backbone_turns} questions, {cfg.backbone_steps} steps "
        f"of {cfg.backbone_batch})"
    )
    info.update(fit_backbone(model, items, tokenizer.pad_token_id, cfg, log))
    del items
    backbone_dir = work / "backbone"
    model.save_pretrained(backbone_dir)
    processor.save_pretrained(backbone_dir)

    heldout_meta = json.loads((data / "heldout.meta.json").read_text())
    heldout = prepare_eval(
        model, _encode_all(paths["heldout"], processor, spec.max_pixels), heldout_meta
    )
    full = evaluate(model, heldout, {}, colour_ids, log, ratios=())[0]
    info["full_accuracy"] = full["accuracy"]
    log(
        f"backbone on held-out ring questions, all tokens: accuracy {full['accuracy']:.3f}, "
        f"answer loss {full['answer_loss']:.3f}"
    )

    log(
        f"phase 2: training the scorer on the frozen backbone ({cfg.scorer_steps} steps of "
        f"{cfg.scorer_batch}, keep {cfg.train_keep}, lr {cfg.scorer_lr})"
    )
    t0 = time.perf_counter()
    result = train(
        TrainConfig(
            model=str(backbone_dir),
            data=str(paths["scorer"]),
            image_root=str(data),
            out=str(work / "scorer"),
            keep_ratio=cfg.train_keep,
            max_steps=cfg.scorer_steps,
            global_batch=cfg.scorer_batch,
            micro_batch=cfg.scorer_micro_batch,
            lr=cfg.scorer_lr,
            max_pixels=spec.max_pixels,
            save_every=cfg.scorer_steps,
            seed=cfg.seed,
            dtype="fp32",
            device="cpu",
        )
    )
    info["scorer_seconds"] = time.perf_counter() - t0
    first, last = result.curves[0], result.curves[-1]
    log(
        f"scorer trained in {info['scorer_seconds']:.0f} s: soft-mask answer loss "
        f"{first['ce']:.3f} -> {last['ce']:.3f}, BCE {first['bce']:.3f} -> {last['bce']:.3f}"
    )

    scorer = load_scorer(result.scorer_path)
    strategies = {
        name: build_strategy(name, scorer if name == "learned" else None) for name in STRATEGIES
    }
    log(f"phase 3: held-out evaluation ({len(heldout)} images, hard top-k)")
    rows = evaluate(model, heldout, strategies, colour_ids, log)
    return rows, info


if __name__ == "__main__":
    sys.exit(main())
