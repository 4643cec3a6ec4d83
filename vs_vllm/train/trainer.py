"""The scorer's training loop: frozen backbone (any family a model adapter covers),
trainable VisionSelectorScorer.

AdamW with a cosine schedule and linear warmup, gradient accumulation to a global batch,
the BCE weight annealed linearly (curriculum), a tqdm bar with the loss terms, a CSV of the
curves (and a PNG at the end), checkpoints every ``save_every`` optimizer steps that
``resume`` continues exactly: the same step, optimizer and schedule state, and the same data
position (the data order is a pure function of the seed, the epoch and a global sample count).
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vs_vllm.checkpoint import save_scorer
from vs_vllm.hf.load import load_hf_model
from vs_vllm.models import adapter_for
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.selection import validate_keep_ratio
from vs_vllm.train.data import JsonlDataset, SampleEncoder, data_hash, read_samples
from vs_vllm.train.objective import soft_selection_losses
from vs_vllm.train.schedule import bce_weight, cosine_with_warmup

CURVE_FIELDS = ("step", "loss", "ce", "bce", "bce_weight", "lr")


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    image_root: str = "."
    keep_ratio: float = 0.2
    epochs: float = 1.0
    max_steps: int | None = None
    global_batch: int = 512
    micro_batch: int = 4
    lr: float = 5e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    bce_start: float = 0.1
    bce_end: float = 2.0
    max_pixels: int = 50176
    max_frames: int = 16
    video_fps: float = 2.0  # frame rate of folders of frames
    video_max_pixels: int | None = None
    save_every: int = 50
    seed: int = 0
    dtype: str = "auto"  # auto: bf16 on a GPU that supports it, float32 elsewhere
    device: str | None = None
    skip_bad: bool = False
    resume: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance

    def __post_init__(self) -> None:
        self.keep_ratio = validate_keep_ratio(self.keep_ratio, name="--keep-ratio")
        if self.micro_batch < 1 or self.global_batch < self.micro_batch:
            raise ValueError("need 1 <= --micro-batch <= --global-batch")
        if self.max_frames < 1 or self.video_fps <= 0:
            raise ValueError("need --max-frames >= 1 and --video-fps > 0")
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"--global-batch {self.global_batch} must be a multiple of --micro-batch "
                f"{self.micro_batch}"
            )


@dataclass
class TrainResult:
    scorer_path: Path
    steps: int
    curves: list[dict[str, float]]


def _resolve_device_dtype(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    return device, {
        "bf16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
    }[cfg.dtype]


class DataOrder:
    """Which samples micro-batch ``m`` holds: a seeded permutation per epoch, indexed by a
    global sample counter, so any position can be recomputed on resume."""

    def __init__(self, num_samples: int, micro_batch: int, seed: int) -> None:
        self.num_samples, self.micro_batch, self.seed = num_samples, micro_batch, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.num_samples))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {epoch: order}
        return self._perms[epoch]

    def micro_batch_indices(self, m: int) -> list[int]:
        out = []
        for s in range(m * self.micro_batch, (m + 1) * self.micro_batch):
            out.append(self._perm(s // self.num_samples)[s % self.num_samples])
        return out


def _load_backbone(cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    model, processor = load_hf_model(cfg.model, dtype)
    model.to(device).eval()
    model.requires_grad_(False)
    return model, processor


def _checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*/state.pt"))
    return found[-1].parent if found else None


def _write_curves(path: Path, rows: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(rows: list[dict[str, float]], path: Path) -> bool:
    """Draw the curves into ``path``; ``False`` (nothing drawn) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss", "ce", "bce"):
        ax1.plot(steps, [r[key] for r in rows], label=key)
    ax1.set(xlabel="optimizer step", title="training losses")
    ax1.legend()
    ax2.plot(steps, [r["bce_weight"] for r in rows], label="BCE weight (lambda)")
    peak = max(r["lr"] for r in rows) or 1.0
    ax2.plot(steps, [r["lr"] / peak for r in rows], label="lr / peak")
    ax2.set(xlabel="optimizer step", title="schedules")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def train(cfg: TrainConfig) -> TrainResult:
    """Train the scorer as ``cfg`` says; write checkpoints, curves and the scorer under
    ``cfg.out``; return where the scorer went."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = _resolve_device_dtype(cfg)
    samples = read_samples(cfg.data, cfg.image_root, skip_bad=cfg.skip_bad)
    model, processor = _load_backbone(cfg, device, dtype)
    encoder = SampleEncoder(
        processor,
        max_pixels=cfg.max_pixels,
        max_frames=cfg.max_frames,
        video_fps=cfg.video_fps,
        video_max_pixels=cfg.video_max_pixels,
    )
    dataset = JsonlDataset(samples, encoder)
    hidden = adapter_for(model.config, cfg.model).score_width(model.config)

    accum = cfg.global_batch // cfg.micro_batch
    total_steps = cfg.max_steps or max(1, math.ceil(len(samples) * cfg.epochs / cfg.global_batch))
    order = DataOrder(len(samples), cfg.micro_batch, cfg.seed)

    torch.manual_seed(cfg.seed)
    scorer = VisionSelectorScorer(hidden).to(device)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, total_steps, cfg.warmup_ratio)
    step, curves = 0, []
    if cfg.resume and (ckpt := _latest_checkpoint(out)) is not None:
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
        if state["total_steps"] != total_steps or state["data_hash"] != data_hash(cfg.data):
            raise ValueError(f"{ckpt}: written for another run (steps or data differ)")
        scorer.load_state_dict(state["scorer"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, curves = state["step"], state["curves"]
        print(f"resuming from {ckpt} at step {step}/{total_steps}")

    bar = tqdm(total=total_steps, initial=step, disable=not cfg.progress, desc="train scorer")
    while step < total_steps:
        weight = bce_weight(step, total_steps, cfg.bce_start, cfg.bce_end)
        sums = {"loss": 0.0, "ce": 0.0, "bce": 0.0}
        for a in range(accum):
            items = [dataset[i] for i in order.micro_batch_indices(step * accum + a)]
            batch = {k: v.to(device) for k, v in dataset.collate(items).items()}
            losses = soft_selection_losses(model, scorer, batch, cfg.keep_ratio, weight)
            (losses.total / accum).backward()
            for key, value in (("loss", losses.total), ("ce", losses.ce), ("bce", losses.bce)):
                sums[key] += float(value.detach()) / accum  # ok-sync: training loop logging
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        curves.append({"step": step, **sums, "bce_weight": weight, "lr": lr})
        bar.update(1)
        bar.set_postfix(
            loss=f"{sums['loss']:.3f}",
            ce=f"{sums['ce']:.3f}",
            bce=f"{sums['bce']:.3f}",
            lam=f"{weight:.2f}",
        )
        _write_curves(out / "train_curves.csv", curves)
        if step % cfg.save_every == 0 or step == total_steps:
            ckpt = _checkpoint_dir(out, step)
            ckpt.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "step": step,
                    "total_steps": total_steps,
                    "data_hash": data_hash(cfg.data),
                    "scorer": scorer.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "curves": curves,
                    "config": asdict(cfg),
                },
                ckpt / "state.pt",
            )
    bar.close()
    provenance = {
        "base_model": cfg.model,
        "hidden_size": hidden,
        "keep_ratio": cfg.keep_ratio,
        "schedule": {
            "lr": cfg.lr,
            "warmup_ratio": cfg.warmup_ratio,
            "bce_start": cfg.bce_start,
            "bce_end": cfg.bce_end,
            "global_batch": cfg.global_batch,
            "micro_batch": cfg.micro_batch,
            "dtype": str(dtype),
        },
        "steps": total_steps,
        "samples": len(samples),
        "video_samples": sum(1 for s in samples if s.videos),
        "data": cfg.data,
        "data_hash": data_hash(cfg.data),
        "seed": cfg.seed,
        **cfg.extra,
    }
    final = scorer.float().cpu()  # ok-sync: saving the trained scorer
    path = save_scorer(final, out, provenance=json.loads(json.dumps(provenance)))
    # the scorer and its JSON are on disk: only optional output from here on
    if not plot_curves(curves, out / "train_curves.png"):
        print(
            f"note: matplotlib is not installed, so {out / 'train_curves.png'} was not drawn "
            f"(the curves are in {out / 'train_curves.csv'}; pip install matplotlib for the plot)"
        )
    return TrainResult(path, total_steps, curves)
