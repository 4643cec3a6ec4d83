"""Does the scorer learn on video? A synthetic video task whose answer lies in one frame.

The video form of ``selection_learning.py`` (same shapes, colours, backbone recipe and
strategies; read its docstring first). Each video shows ``moments`` (4) scenes in turn, each
held for two frames (one temporal patch of the vision tower, so one scene is one group of
merged tokens, "one frame" of the video's tokens), each scene a textured grey background of
``grid`` x ``grid`` (4 x 4) merged tokens holding two of the 8 shapes in random colours: the 8
shapes are spread over the 4 scenes, so the ring is in exactly one of them, at a random place.
The backbone is fitted to answer "What colour is the <kind>?" for every kind (all visual
tokens kept), then frozen; the scorer is trained with ``vs-vllm train`` on video samples (the
JSONL ``"video"`` field, each video a folder of PNG frames) asking about the ring only, and
everything is evaluated on held-out videos, one question about the ring, through the HF
selection path (:func:`vs_vllm.hf.select_inputs` with ``video_keep_ratio``: hard top-k over the
whole video, kept tokens at their unpruned (t, h, w) positions; per frame for a family whose
frames are separate placeholder runs).

At keep 0.1 a video of 4 x 16 = 64 tokens keeps 6: ``uniform`` keeps the ring's token about
6/64 of the time, whatever the video; a scorer that learned which token answers the question
keeps it far more often, and the answers show it.

    python benchmarks/video_selection_learning.py            # full run
    python benchmarks/video_selection_learning.py --quick    # CI size (a few minutes)

Writes ``<out>/<device>/video_selection_learning.csv`` and ``.png`` (``--family qwen3_vl``:
``video_selection_learning_qwen3_vl``), one row per (strategy, keep ratio), the command line and
the run's facts in every row, and prints the table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.selection_learning import (
    COLOURS,
    DEFAULT_FAMILY,
    KEEP_RATIOS,
    KINDS,
    STRATEGIES,
    TARGET,
    Family,
    RunConfig,
    _background,
    _draw_shape,
    _encode_all,
    _jitter,
    fit_backbone,
    question,
    run_benchmark,
)

FRAMES_PER_MOMENT = 2  # the tower's temporal patch: one scene = one group of merged tokens
VIDEO_FPS = 2.0


@dataclass(frozen=True)
class VideoRunConfig:
    """Sizes of one run; ``--quick`` and the full run differ only here."""

    grid: int = 4  # cells per side of a frame: grid**2 merged tokens per scene
    moments: int = 4  # scenes per video; the 8 shapes are spread over them
    backbone_videos: int = 3000
    backbone_turns: int = 8
    backbone_steps: int = 2000
    backbone_batch: int = 16
    backbone_lr: float = 3e-3
    scorer_videos: int = 1200
    scorer_steps: int = 300
    scorer_batch: int = 16
    scorer_micro_batch: int = 8
    scorer_lr: float = 3e-3
    train_keep: float = 0.2
    eval_videos: int = 300
    text_hidden: int = 64
    text_layers: int = 2
    vision_hidden: int = 64
    vision_depth: int = 2
    seed: int = 0

    @property
    def frames(self) -> int:
        return self.moments * FRAMES_PER_MOMENT

    @property
    def tokens(self) -> int:
        return self.moments * self.grid**2

    def backbone_config(self) -> RunConfig:
        """The image benchmark's config with this run's backbone sizes and schedule."""
        return RunConfig(
            grid=self.grid,
            backbone_images=self.backbone_videos,
            backbone_turns=self.backbone_turns,
            backbone_steps=self.backbone_steps,
            backbone_batch=self.backbone_batch,
            backbone_lr=self.backbone_lr,
            text_hidden=self.text_hidden,
            text_layers=self.text_layers,
            vision_hidden=self.vision_hidden,
            vision_depth=self.vision_depth,
            seed=self.seed,
        )


QUICK = VideoRunConfig(
    backbone_videos=800,
    backbone_steps=600,
    scorer_videos=400,
    scorer_steps=100,
    eval_videos=120,
)


# ----------------------------------------------------------------------------- data


def draw_video(rng: np.random.Generator, cfg: VideoRunConfig, cell: int) -> tuple[list, dict]:
    """One video: ``cfg.moments`` scenes, the 8 shapes spread over them (each in its own cell,
    colours at random). Returns the scenes (one PIL image each) and ``{"colours": {kind:
    name}, "tokens": {kind: index of its merged token in the video}}``."""
    size = cfg.grid * cell
    per_scene = cfg.grid**2
    names = list(COLOURS)
    order = rng.permutation(len(KINDS))
    scenes, info = [], {"colours": {}, "tokens": {}}
    for m in range(cfg.moments):
        img = Image.fromarray(_background(rng, size).astype(np.uint8), mode="RGB")
        draw = ImageDraw.Draw(img)
        kinds = [KINDS[j] for j in order[m :: cfg.moments]]
        cells = rng.choice(per_scene, size=len(kinds), replace=False)
        for kind, token in zip(kinds, cells, strict=True):
            cy, cx = divmod(int(token), cfg.grid)
            name = names[int(rng.integers(len(names)))]
            _draw_shape(draw, rng, kind, cx * cell, cy * cell, _jitter(rng, COLOURS[name]), cell)
            info["colours"][kind] = name
            info["tokens"][kind] = m * per_scene + int(token)
        scenes.append(img)
    return scenes, info


def write_split(
    root: Path, name: str, count: int, cfg: VideoRunConfig, seed: int, turns: int, cell: int
) -> Path:
    """``count`` videos as folders of PNG frames (each scene held for two frames: the second
    is a hard link of the first), ``<root>/<name>.jsonl`` and ``<name>.meta.json``.

    ``turns`` > 0: that many questions about different kinds (backbone training); 0: one
    question, about the ring."""
    rng = np.random.default_rng(seed)
    lines, meta = [], []
    for i in range(count):
        scenes, info = draw_video(rng, cfg, cell)
        rel = f"{name}/{i:05d}"
        folder = root / rel
        folder.mkdir(parents=True, exist_ok=True)
        for m, scene in enumerate(scenes):
            first = folder / f"frame_{m * FRAMES_PER_MOMENT}.png"
            scene.save(first)
            for r in range(1, FRAMES_PER_MOMENT):
                os.link(first, folder / f"frame_{m * FRAMES_PER_MOMENT + r}.png")
        asked = [KINDS[j] for j in rng.permutation(len(KINDS))[:turns]] if turns else [TARGET]
        dialogue = []
        for j, kind in enumerate(asked):
            marker = "<video>\n" if j == 0 else ""
            dialogue.append({"from": "human", "value": marker + question(kind)})
            dialogue.append({"from": "gpt", "value": info["colours"][kind]})
        lines.append(json.dumps({"video": rel, "conversations": dialogue}))
        meta.append({"answer": info["colours"][TARGET], "target_token": info["tokens"][TARGET]})
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (root / f"{name}.meta.json").write_text(json.dumps(meta))
    return path


# ----------------------------------------------------------------------------- evaluation


@dataclass
class VideoEvalItem:
    prompt_ids: torch.Tensor  # (1, L)
    answer_ids: torch.Tensor  # (m,) answer tokens + <|im_end|>
    grid_thw: torch.Tensor  # (1, 3)
    second_per_grid_ts: torch.Tensor | None
    rows: torch.Tensor  # (N, W) the video's visual rows
    answer: str
    target_token: int


def prepare_eval(model, items, meta) -> list[VideoEvalItem]:
    from vs_vllm.hf import model_adapter

    adapter = model_adapter(model)
    out = []
    with torch.no_grad():
        for enc, info in zip(items, meta, strict=True):
            labelled = (enc["labels"] != -100).nonzero().flatten()
            a, b = int(labelled[0]), int(labelled[-1]) + 1
            grid = enc["video_grid_thw"]
            out.append(
                VideoEvalItem(
                    prompt_ids=enc["input_ids"][:a].unsqueeze(0),
                    answer_ids=enc["input_ids"][a:b],
                    grid_thw=grid,
                    second_per_grid_ts=enc.get("second_per_grid_ts"),
                    rows=adapter.hf_video_rows(model, enc),
                    answer=info["answer"],
                    target_token=info["target_token"],
                )
            )
    return out


@torch.no_grad()
def score_item(
    model, item: VideoEvalItem, strategy, ratio: float, colour_ids: torch.Tensor, per_frame: bool
) -> dict:
    """Hard selection over the video, then one teacher-forced forward over the answer (the
    kept rows placed again over prompt + answer, as in ``selection_learning.score_item``)."""
    from vs_vllm.hf import language_model_logits, select_inputs, visual_inputs

    inputs = select_inputs(
        model,
        item.prompt_ids,
        {"video_grid_thw": item.grid_thw, "second_per_grid_ts": item.second_per_grid_ts},
        strategy,
        video_keep_ratio=ratio,
        video_selection="per-frame" if per_frame else "per-video",
        video_embeds=item.rows,
    )
    kept = inputs.video_kept_indices[0]
    feed = item.answer_ids[:-1].unsqueeze(0)
    ids = torch.cat([inputs.input_ids, feed], dim=1)
    no_images = item.rows.new_empty(0, item.rows.shape[1])
    embeds, text_kwargs = visual_inputs(model, ids, no_images, item.rows.index_select(0, kept))
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
        "hit": float(item.target_token in kept.tolist()),
    }


def evaluate(
    model, items, strategies: dict, colour_ids, log, per_frame: bool, ratios=KEEP_RATIOS
) -> list[dict]:
    """One row per (strategy, keep ratio), after a ``full`` row (every token kept)."""
    from vs_vllm.keep_ratio import video_kept_tokens
    from vs_vllm.strategies import build_strategy

    rows = []
    settings = [("full", 1.0)] + [(s, r) for r in ratios for s in strategies]
    t_groups, h, w = (int(v) for v in items[0].grid_thw[0])
    per_group = h * w // 4
    for name, ratio in settings:
        t0 = time.perf_counter()
        strategy = strategies[name] if name in strategies else build_strategy("uniform")
        acc = {"loss": 0.0, "correct": 0.0, "exact": 0.0, "hit": 0.0}
        for item in items:
            result = score_item(model, item, strategy, ratio, colour_ids, per_frame)
            for key, value in result.items():
                acc[key] += value / len(items)
        rows.append(
            {
                "keep_ratio": ratio,
                "kept_tokens": video_kept_tokens(t_groups, per_group, ratio, per_frame=per_frame),
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


# ----------------------------------------------------------------------------- main


def run(cfg: VideoRunConfig, work: Path, log, family: Family) -> tuple[list[dict], dict]:
    """Data, backbone fit, scorer training on videos, evaluation; table rows and facts."""
    from vs_vllm.checkpoint import load_scorer
    from vs_vllm.hf import load_hf_model, model_adapter
    from vs_vllm.strategies import build_strategy
    from vs_vllm.train.trainer import TrainConfig, train

    torch.manual_seed(cfg.seed)
    log(f"run config: {asdict(cfg)}, family {family.name} ({family.cell} px per merged token)")
    data = work / "data"
    splits = (
        ("backbone", cfg.backbone_videos, cfg.backbone_turns),
        ("scorer", cfg.scorer_videos, 0),
        ("heldout", cfg.eval_videos, 0),
    )
    paths = {
        name: write_split(data, name, count, cfg, cfg.seed * 1000 + k, turns, family.cell)
        for k, (name, count, turns) in enumerate(splits)
    }
    log(
        f"wrote {sum(c for _, c, _ in splits)} videos of {cfg.frames} frames "
        f"({cfg.tokens} merged tokens each) and their JSONL files under {data}"
    )

    backbone_cfg = cfg.backbone_config()
    spec = family.spec(backbone_cfg)  # max_pixels: one grid x grid frame
    init_dir = family.build(work / "init", spec, cfg.seed)
    model, processor = load_hf_model(init_dir, torch.float32)
    per_frame = model_adapter(model).video_layout == "frame_runs"
    info: dict = {
        "backbone_params": sum(p.numel() for p in model.parameters()),
        "video_selection": "per-frame" if per_frame else "per-video",
    }
    tokenizer = processor.tokenizer
    colour_ids = torch.tensor(
        [tokenizer(name, add_special_tokens=False)["input_ids"][0] for name in COLOURS]
    )
    video = {"max_frames": cfg.frames, "video_fps": VIDEO_FPS}
    items = _encode_all(paths["backbone"], processor, spec.max_pixels, True, **video)
    grid = items[0]["video_grid_thw"][0].tolist()
    if grid[0] != cfg.moments or grid[1] * grid[2] // 4 != cfg.grid**2:
        raise RuntimeError(f"video grid {grid} is not {cfg.moments} scenes of {cfg.grid}^2")
    log(
        f"phase 1: fitting the backbone ({info['backbone_params'] / 1e6:.2f}M parameters, "
        f"{len(items)} videos x {cfg.backbone_turns} questions, {cfg.backbone_steps} steps "
        f"of {cfg.backbone_batch})"
    )
    info.update(fit_backbone(model, items, tokenizer.pad_token_id, backbone_cfg, log))
    del items
    backbone_dir = work / "backbone"
    model.save_pretrained(backbone_dir)
    processor.save_pretrained(backbone_dir)

    meta = json.loads((data / "heldout.meta.json").read_text())
    heldout = prepare_eval(
        model, _encode_all(paths["heldout"], processor, spec.max_pixels, **video), meta
    )
    full = evaluate(model, heldout, {}, colour_ids, log, per_frame, ratios=())[0]
    info["full_accuracy"] = full["accuracy"]
    log(f"backbone on held-out ring questions, all tokens: accuracy {full['accuracy']:.3f}")

    log(
        f"phase 2: vs-vllm train on the video samples ({cfg.scorer_steps} steps of "
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
            max_frames=cfg.frames,
            video_fps=VIDEO_FPS,
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
    log(f"phase 3: held-out evaluation ({len(heldout)} videos, hard top-k)")
    return evaluate(model, heldout, strategies, colour_ids, log, per_frame), info


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(
        list(sys.argv[1:] if argv is None else argv),
        script="benchmarks/video_selection_learning.py",
        description=__doc__.split("\n\n")[0],
        configs=(VideoRunConfig(), QUICK),
        run_fn=run,
        stem=lambda family: (
            "video_selection_learning"
            + ("" if family.name == DEFAULT_FAMILY else f"_{family.name}")
        ),
        subtitle=lambda cfg, family, info: (
            f"videos of {cfg.moments} scenes x {cfg.grid**2} tokens, ring in one scene; "
            f"{family.label} backbone {info['backbone_params'] / 1e6:.2f}M params; scorer "
            f"trained on videos at keep {cfg.train_keep}, selection {info['video_selection']}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
