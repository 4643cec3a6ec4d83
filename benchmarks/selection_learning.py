"""Does the scorer learn? A synthetic task where only one visual token matters, on the CPU.

Each image is a 168x168 textured grey background (6x6 = 36 merged visual tokens at patch 14,
merge 2) holding one **ring** and several **filled squares**, each object inside its own
28x28 cell (one merged token). Objects take their colours from the same 8-colour palette.
The question is always "What colour is the ring?" and the answer is the ring's colour, so the
one token that matters is the ring's, and nothing but its shape tells it apart: the squares
are as far from the background (same palette, about the same area) as the ring, so ``norm``
and ``diversity`` have no reason to prefer it, and ``uniform`` / ``random`` hit it only by
chance. The scorer never sees the question; it has to recognise rings from the visual tokens.

Steps (seeded; every phase prints its progress):

1. write the images and LLaVA-format JSONL files (backbone-train, scorer-train, held-out);
2. build a small random-init Qwen2.5-VL (:func:`vs_vllm.testing.tiny_qwen.build_tiny_qwen25_vl`)
   and fit all of it on the full-token task (plain LM loss on the answers), then freeze it;
3. train the VisionSelector scorer on the frozen backbone with
   :func:`vs_vllm.train.trainer.train` (soft top-k at ``--train-keep``, BCE curriculum);
4. on the held-out split, at keep 0.1 / 0.2 / 0.3, compare ``learned`` with ``uniform``,
   ``random``, ``norm``, ``diversity`` and the full-token model through the HF selection path
   (:func:`vs_vllm.hf.select_inputs`, hard top-k): answer LM loss (teacher-forced, answer
   tokens and ``<|im_end|>``), colour accuracy (argmax of the first answer token over the 8
   colours, whose first tokens are all different) and greedy exact match (every answer token
   is the argmax), plus how often the ring's token is kept.

    python benchmarks/selection_learning.py            # full run (about 10 minutes on 2 cores)
    python benchmarks/selection_learning.py --quick    # CI size (a few minutes)

Writes ``benchmarks/results/<device>/selection_learning.csv`` and ``.png`` (``--out`` changes
the results folder) and prints the table.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.device_name import device_label, device_slug

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
QUESTION = "What colour is the ring?"
CELL = 28  # one merged visual token (patch 14, merge 2)
KEEP_RATIOS = (0.1, 0.2, 0.3)
STRATEGIES = ("learned", "uniform", "random", "norm", "diversity")


@dataclass(frozen=True)
class RunConfig:
    """Sizes of one run; ``--quick`` and the full run differ only here."""

    grid: int = 6  # cells per side: grid**2 merged tokens per image
    distractors: int = 10  # squares per image
    kinds: tuple[str, ...] = ("filled", "hollow")  # kinds of squares
    backbone_samples: int = 3000
    scorer_samples: int = 1500
    eval_samples: int = 300
    backbone_steps: int = 900
    backbone_batch: int = 16
    backbone_lr: float = 2e-3
    scorer_steps: int = 120
    scorer_batch: int = 16
    scorer_micro_batch: int = 8
    scorer_lr: float = 3e-3
    train_keep: float = 0.2
    text_hidden: int = 128
    text_layers: int = 4
    vision_hidden: int = 64
    vision_depth: int = 2
    seed: int = 0


QUICK = RunConfig(
    backbone_samples=1200,
    scorer_samples=600,
    eval_samples=120,
    backbone_steps=350,
    scorer_steps=60,
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


def draw_sample(
    rng: np.random.Generator, grid: int, distractors: int, kinds: tuple[str, ...] = ("filled",)
) -> tuple[Image.Image, dict]:
    """One image: a ring and ``distractors`` squares (of ``kinds``), each in its own cell."""
    size = grid * CELL
    img = Image.fromarray(_background(rng, size).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    names = list(COLOURS)
    cells = rng.choice(grid * grid, size=distractors + 1, replace=False)
    answer = names[int(rng.integers(len(names)))]
    for n, cell in enumerate(cells):
        cy, cx = divmod(int(cell), grid)
        x0, y0 = cx * CELL, cy * CELL
        width = int(rng.integers(4, 6))
        if n == 0:  # the ring: outer radius 9-11, 4-5 px thick
            r = int(rng.integers(9, 12))
            ox, oy = rng.integers(r + 1, CELL - r, size=2)  # whole ring inside the cell
            box = (x0 + ox - r, y0 + oy - r, x0 + ox + r, y0 + oy + r)
            draw.ellipse(box, outline=_jitter(rng, COLOURS[answer]), width=width)
            continue
        kind = kinds[int(rng.integers(len(kinds)))]
        colour = _jitter(rng, COLOURS[names[int(rng.integers(len(names)))]])
        if kind == "filled":  # side 14-17
            side = int(rng.integers(14, 18))
        else:  # "hollow": a square outline as large and as thick as a ring
            side = int(rng.integers(17, 22))
        ox, oy = rng.integers(1, CELL - side, size=2)
        box = (x0 + ox, y0 + oy, x0 + ox + side - 1, y0 + oy + side - 1)
        if kind == "filled":
            draw.rectangle(box, fill=colour)
        else:
            draw.rectangle(box, outline=colour, width=width)
    return img, {"answer": answer, "target_token": int(cells[0])}


def write_split(root: Path, name: str, count: int, cfg: RunConfig, seed: int) -> Path:
    """``count`` samples as ``<root>/<name>.jsonl`` + PNGs (and a ``.meta.json`` per split)."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    lines, meta = [], []
    for i in range(count):
        img, info = draw_sample(rng, cfg.grid, cfg.distractors, cfg.kinds)
        rel = f"{name}/{i:05d}.png"
        img.save(root / rel)
        lines.append(
            json.dumps(
                {
                    "image": rel,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{QUESTION}"},
                        {"from": "gpt", "value": info["answer"]},
                    ],
                }
            )
        )
        meta.append(info)
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (root / f"{name}.meta.json").write_text(json.dumps(meta))
    return path


# ----------------------------------------------------------------------------- backbone


def _encode_all(path: Path, processor, max_pixels: int) -> list[dict[str, torch.Tensor]]:
    from vs_vllm.train.data import SampleEncoder, read_samples

    encoder = SampleEncoder(processor, max_pixels=max_pixels)
    return [encoder(s) for s in read_samples(path, path.parent)]


def fit_backbone(model, processor, data_path: Path, eval_items, cfg: RunConfig, log) -> dict:
    """Train every weight of ``model`` on the full-token task (LM loss on the answers)."""
    from vs_vllm.train.data import collate
    from vs_vllm.train.objective import answer_cross_entropy
    from vs_vllm.train.schedule import cosine_with_warmup

    items = _encode_all(data_path, processor, cfg.grid**2 * CELL**2)
    pad = processor.tokenizer.pad_token_id
    model.train()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.backbone_lr, weight_decay=0.01)
    sched = cosine_with_warmup(opt, cfg.backbone_steps, warmup_ratio=0.05)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    order: list[int] = []
    t0 = time.perf_counter()
    running = None
    for step in range(1, cfg.backbone_steps + 1):
        if len(order) < cfg.backbone_batch:
            order += torch.randperm(len(items), generator=gen).tolist()
        idx, order = order[: cfg.backbone_batch], order[cfg.backbone_batch :]
        batch = collate([items[i] for i in idx], pad_token_id=pad)
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch.get("mm_token_type_ids"),
        )
        loss = answer_cross_entropy(out.logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % 50 == 0 or step == cfg.backbone_steps:
            log(
                f"  backbone step {step}/{cfg.backbone_steps}  loss {running:.3f}  "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    model.eval()
    model.requires_grad_(False)
    return {"backbone_seconds": time.perf_counter() - t0, "backbone_final_loss": running}


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
                    feats=image_features(model, enc["pixel_values"], enc["image_grid_thw"]),
                    answer=info["answer"],
                    target_token=info["target_token"],
                )
            )
    return out


@torch.no_grad()
def score_item(model, item: EvalItem, strategy, ratio: float, colour_ids: torch.Tensor) -> dict:
    """Hard selection, then one teacher-forced forward over the answer."""
    from vs_vllm.hf import language_model_logits, select_inputs

    inputs = select_inputs(
        model, item.prompt_ids, None, item.grid_thw, strategy, ratio, image_embeds=item.feats
    )
    feed = item.answer_ids[:-1].unsqueeze(0)
    embeds = torch.cat([inputs.inputs_embeds, model.get_input_embeddings()(feed)], dim=1)
    tail = inputs.next_position + torch.arange(feed.shape[1], dtype=torch.int64)
    positions = torch.cat([inputs.position_ids, tail.view(1, 1, -1).expand(3, 1, -1)], dim=2)
    logits = language_model_logits(model, embeds, positions)[0, inputs.seq_len - 1 :].float()
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
                "kept_tokens": max(1, int(n_tokens * ratio)),
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small CI-sized run")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--work", type=Path, default=None, help="keep data and models here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)

    cfg = replace(QUICK if args.quick else RunConfig(), seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    command = shlex.join(["python", "benchmarks/selection_learning.py", *argv])
    device = torch.device("cpu")  # CPU-sized on purpose; the HF path runs anywhere
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    work = args.work or Path(tempfile.mkdtemp(prefix="vs-selection-learning-"))
    try:
        rows, info = _run(cfg, work, log)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {
        "command": command,
        "device": device_label(device),
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()},
    }
    csv_path = out_dir / "selection_learning.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *extra])
        writer.writeheader()
        writer.writerows({**r, **extra} for r in rows)
    title = (
        f"{command}\n{device_label(device)}; backbone full-token accuracy "
        f"{info['full_accuracy']:.2f}; {cfg.grid**2} tokens/image, 1 ring + "
        f"{cfg.distractors} squares"
    )
    plot(rows, out_dir / "selection_learning.png", title)
    print()
    print(f"command: {command}")
    print_table(rows)
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')} ({extra['seconds']:.0f} s)")
    return 0


def _run(cfg: RunConfig, work: Path, log) -> tuple[list[dict], dict]:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vs_vllm.checkpoint import load_scorer
    from vs_vllm.strategies import build_strategy
    from vs_vllm.testing.tiny_qwen import TinyQwenSpec, build_tiny_qwen25_vl
    from vs_vllm.train.trainer import TrainConfig, train

    log(f"run config: {asdict(cfg)}")
    data = work / "data"
    log("writing the synthetic dataset")
    paths = {
        name: write_split(data, name, count, cfg, seed=cfg.seed * 1000 + k)
        for k, (name, count) in enumerate(
            (
                ("backbone", cfg.backbone_samples),
                ("scorer", cfg.scorer_samples),
                ("heldout", cfg.eval_samples),
            )
        )
    }
    max_pixels = cfg.grid**2 * CELL**2
    spec = TinyQwenSpec(
        text_hidden=cfg.text_hidden,
        text_layers=cfg.text_layers,
        heads=cfg.text_hidden // 32,
        kv_heads=max(1, cfg.text_hidden // 64),
        intermediate=2 * cfg.text_hidden,
        vision_depth=cfg.vision_depth,
        vision_hidden=cfg.vision_hidden,
        vision_heads=cfg.vision_hidden // 32,
        vision_intermediate=2 * cfg.vision_hidden,
        min_pixels=CELL * CELL * 4,
        max_pixels=max_pixels,
    )
    init_dir = build_tiny_qwen25_vl(work / "init", spec, seed=cfg.seed)
    processor = AutoProcessor.from_pretrained(init_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"backbone: {n_params / 1e6:.2f} M parameters, spec {spec}")

    heldout_meta = json.loads((data / "heldout.meta.json").read_text())
    heldout_enc = _encode_all(paths["heldout"], processor, max_pixels)
    tok = processor.tokenizer
    colour_ids = torch.tensor([tok(name, add_special_tokens=False)["input_ids"][0] for name in COLOURS])
    assert len(set(colour_ids.tolist())) == len(COLOURS), "colour first tokens must differ"

    log(f"phase 1: fitting the backbone on full tokens ({cfg.backbone_steps} steps)")
    info = fit_backbone(model, processor, paths["backbone"], heldout_enc, cfg, log)
    backbone_dir = work / "backbone"
    model.save_pretrained(backbone_dir, safe_serialization=True)
    processor.save_pretrained(backbone_dir)
    items = prepare_eval(model, heldout_enc, heldout_meta)
    full = evaluate(model, items, {}, colour_ids, lambda m: None)
    info["full_accuracy"] = full[0]["accuracy"]
    log(f"backbone held-out (all tokens): accuracy {full[0]['accuracy']:.3f}, loss {full[0]['answer_loss']:.3f}")

    log(f"phase 2: training the scorer ({cfg.scorer_steps} steps, keep {cfg.train_keep})")
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
            max_pixels=max_pixels,
            save_every=10**9,
            seed=cfg.seed,
            dtype="fp32",
            device="cpu",
        )
    )
    info["scorer_seconds"] = time.perf_counter() - t0
    curves = result.curves
    log(f"scorer trained: ce {curves[0]['ce']:.3f} -> {curves[-1]['ce']:.3f}")

    scorer = load_scorer(result.scorer_path)
    strategies = {name: build_strategy(name, scorer if name == "learned" else None) for name in STRATEGIES}
    log("phase 3: held-out evaluation")
    rows = evaluate(model, items, strategies, colour_ids, log)
    return rows, info


if __name__ == "__main__":
    sys.exit(main())
