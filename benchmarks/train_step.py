"""Time one training step of the VisionSelector scorer at Qwen2.5-VL-3B geometry (HF, no vLLM).

For a machine with a GPU (torch + transformers, no internet needed). A Qwen2.5-VL with the
published **Qwen2.5-VL-3B** dimensions (:data:`QWEN25_VL_3B`, written out here: nothing is
downloaded; 3.75B parameters, tied embeddings) is built from its config with random weights
directly on the device (bf16 where the GPU supports it, SDPA attention), frozen as the trainer
freezes it (``eval()``, ``requires_grad_(False)``), next to a float32
:class:`~vs_vllm.scorer.VisionSelectorScorer` of the LLM's width (2048).

A micro batch of ``--batch`` synthetic samples, each one square image of ``--image-size`` pixels
(448² = 256 visual tokens; random pixels) in the prompt layout of ``benchmarks/hf_prefill.py``
(``<system + user header> <|vision_start|> N x <|image_pad|> <|vision_end|> <question +
assistant header>``) followed by a short labelled answer (random token ids + ``<|im_end|>``),
padded by :func:`vs_vllm.train.data.collate`. One training step is exactly the trainer's
(:func:`vs_vllm.train.trainer.train` with one micro batch per optimizer step): the forward and
loss of :func:`vs_vllm.train.objective.soft_selection_losses` (frozen vision tower, soft top-k
mask at ``--keep-ratio`` multiplying the visual embeddings, answer CE + lambda * BCE), backward,
AdamW step on the scorer, the cosine schedule's step, ``zero_grad(set_to_none=True)`` and the
trainer's read-back of the three loss values (one device sync per step, as in training).

Each (image size, batch) pair runs ``--warmup`` steps, then ``--steps`` timed steps, each timed
with CUDA events (``time.perf_counter`` on the CPU); reported: the median ms/step, steps/s and
samples/s from it, the peak memory of the timed steps (``torch.cuda.max_memory_allocated``, reset
after the warm-up) and the backbone's weight memory. The first step checks that no backbone
parameter got a gradient and that every scorer parameter did (finite; not all zero over the
scorer); a failure stops the run. A pair that runs out of GPU memory is reported as ``oom``
and the run goes on.

    python benchmarks/train_step.py                                  # GPU: 3B, 448², batch 1
    python benchmarks/train_step.py --image-size 448,896 --batch 1,4
    python benchmarks/train_step.py --geometry tiny --allow-cpu      # CPU smoke test

Writes ``benchmarks/results/<device>/train_step.csv`` and ``train_step.png`` (``--out`` changes
the results folder; the tiny geometry writes ``train_step_tiny.*``), one row per (image size,
batch) with the command line.
"""

from __future__ import annotations

import argparse
import copy
import csv
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.device_name import device_label, device_slug
from benchmarks.hf_prefill import QWEN25_VL_7B, build_model, make_prompt, tiny_geometry
from benchmarks.timing import measure_ms
from benchmarks.torch_threads import torch_threads
from vs_vllm.batch import PackedImages
from vs_vllm.hf import image_token_counts
from vs_vllm.models import adapter_for
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.train.data import IGNORE_INDEX, collate
from vs_vllm.train.objective import StepLosses, soft_selection_losses
from vs_vllm.train.schedule import bce_weight, cosine_with_warmup
from vs_vllm.train.trainer import TrainConfig, _resolve_device_dtype

#: Qwen/Qwen2.5-VL-3B-Instruct's config.json: the 7B's (:data:`QWEN25_VL_7B`, transformers 5.x
#: field names, the same special ids, M-RoPE sections and vision tower) with the 3B's text model,
#: merger width and tied embeddings.
QWEN25_VL_3B: dict[str, Any] = copy.deepcopy(QWEN25_VL_7B)
QWEN25_VL_3B["text"].update(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    max_window_layers=70,
)
QWEN25_VL_3B["vision"]["out_hidden_size"] = 2048
QWEN25_VL_3B["tie_word_embeddings"] = True

ANSWER_TOKENS = 8  # answer text tokens; <|im_end|> follows, labelled too (as in training)
DEFAULT_SIZES = {"3b": "448", "tiny": "56,112"}
TRAINER_LR = TrainConfig.lr  # the trainer's defaults: AdamW lr, warmup ratio, BCE ramp
TRAINER_WARMUP_RATIO = TrainConfig.warmup_ratio
CSV_STEM = {"3b": "train_step", "tiny": "train_step_tiny"}


def geometry_for(name: str) -> dict[str, Any]:
    return QWEN25_VL_3B if name == "3b" else tiny_geometry()


def build_backbone(geometry: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int):
    """:func:`benchmarks.hf_prefill.build_model`, frozen like the trainer's backbone."""
    model = build_model(geometry, device, dtype, seed)
    model.requires_grad_(False)
    return model


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers (tied tensors counted once)."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def make_batch(
    geometry: dict[str, Any], image_px: int, batch: int, seed: int
) -> dict[str, torch.Tensor]:
    """A collated micro batch (CPU): ``batch`` samples of one image + question + labelled answer."""
    ids, eos = geometry["ids"], geometry["text"]["eos_token_id"]
    items = []
    for i in range(batch):
        sample_seed = seed + 7919 * i
        prompt, pixel_values, grid = make_prompt(
            geometry, image_px, torch.device("cpu"), torch.float32, sample_seed
        )
        gen = torch.Generator().manual_seed(sample_seed + 1)
        answer = torch.randint(0, ids["text_vocab"], (ANSWER_TOKENS,), generator=gen)
        answer = torch.cat([answer, torch.tensor([eos])])
        input_ids = torch.cat([prompt[0], answer])
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[-answer.numel() :] = answer
        items.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "labels": labels,
                "pixel_values": pixel_values,
                "image_grid_thw": grid,
            }
        )
    return collate(items, adapter=adapter_for(["Qwen2_5_VLForConditionalGeneration"]))


def check_gradients(model: torch.nn.Module, scorer: torch.nn.Module) -> None:
    """Raise unless no backbone parameter has a gradient and every scorer parameter has a finite
    one, not all zero over the scorer.

    (``q_proj.bias`` only shifts all scores of an image by one constant, which the soft top-k
    ignores: its gradient is zero up to rounding, so zeros are not checked per parameter.)
    """
    leaked = [name for name, p in model.named_parameters() if p.grad is not None]
    if leaked:
        raise RuntimeError(f"backbone parameters got gradients: {leaked[:5]}")
    grads = []
    for name, p in scorer.named_parameters():
        if p.grad is None:
            raise RuntimeError(f"scorer parameter {name} got no gradient")
        if not bool(torch.isfinite(p.grad).all()):  # ok-sync: one-off check
            raise RuntimeError(f"scorer parameter {name}: gradient not finite")
        grads.append(p.grad.abs().sum())
    if not bool(torch.stack(grads).sum() > 0):  # ok-sync: one-off check
        raise RuntimeError("the scorer's gradient is zero")


class TrainStep:
    """One optimizer step of the trainer on a fixed micro batch (accumulation 1)."""

    def __init__(
        self,
        model: torch.nn.Module,
        hidden: int,
        batch: dict[str, torch.Tensor],
        keep_ratio: float,
        total_steps: int,
        seed: int,
    ) -> None:
        device = batch["input_ids"].device
        torch.manual_seed(seed)
        self.model, self.batch, self.keep_ratio = model, batch, keep_ratio
        self.scorer = VisionSelectorScorer(hidden).to(device)
        self.optimizer = torch.optim.AdamW(self.scorer.parameters(), lr=TRAINER_LR)
        self.scheduler = cosine_with_warmup(self.optimizer, total_steps, TRAINER_WARMUP_RATIO)
        self.total_steps, self.step = total_steps, 0
        self.check_next = True
        self.last: dict[str, float] = {}

    def __call__(self) -> None:
        weight = bce_weight(self.step, self.total_steps)
        losses: StepLosses = soft_selection_losses(
            self.model, self.scorer, self.batch, self.keep_ratio, weight
        )
        losses.total.backward()
        if self.check_next:
            check_gradients(self.model, self.scorer)
            self.check_next = False
        self.last = {  # the trainer reads these back every step (one sync)
            "loss": float(losses.total.detach()),
            "ce": float(losses.ce.detach()),
            "bce": float(losses.bce.detach()),
        }
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", choices=("3b", "tiny"), default="3b")
    p.add_argument(
        "--image-size",
        default=None,
        help="square image sizes in pixels, multiples of 28 (comma list; default 448, tiny 56,112)",
    )
    p.add_argument("--batch", default="1", help="micro-batch sizes (comma list)")
    p.add_argument("--keep-ratio", type=float, default=0.2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="backbone dtype; auto (the trainer's rule): bf16 on a GPU that supports it, else fp32",
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU (use --geometry tiny)")
    args = p.parse_args(argv)
    args.image_size = _ints(args.image_size or DEFAULT_SIZES[args.geometry])
    args.batch = _ints(args.batch)
    if not args.image_size or not args.batch:
        p.error("need at least one image size and one batch size")
    for px in args.image_size:
        if px <= 0 or px % 28:
            p.error(f"image sizes must be positive multiples of 28 pixels, got {px}")
    if min(args.batch) < 1:
        p.error("batch sizes must be >= 1")
    if args.steps < 1 or args.warmup < 0:
        p.error("need --steps >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/train_step.py", *argv])
    with torch_threads(args.threads):
        return run(args)


def _gib(n: float) -> float:
    return round(n / 2**30, 4)


def run(args: argparse.Namespace) -> int:
    # The trainer's own config validates the keep ratio and resolves device and dtype.
    try:
        cfg = TrainConfig(
            model=f"random Qwen2.5-VL ({args.geometry} geometry)",
            data="synthetic",
            out=str(args.out),
            keep_ratio=args.keep_ratio,
            dtype=args.dtype,
            device=args.device,
        )
    except ValueError as err:
        print(f"train_step: error: {err}", file=sys.stderr)
        return 2
    device, dtype = _resolve_device_dtype(cfg)
    if device.type != "cuda" and not args.allow_cpu:
        print(
            f"train_step: no CUDA device (device {device}): this benchmark is meant for a GPU; "
            "pass --allow-cpu (with --geometry tiny) to run it on the CPU",
            file=sys.stderr,
        )
        return 2
    geometry = geometry_for(args.geometry)
    label = device_label(device)
    is_cuda = device.type == "cuda"

    print(f"building Qwen2.5-VL {args.geometry} geometry (random weights) on {label} ...")
    t0 = time.perf_counter()
    model = build_backbone(geometry, device, dtype, args.seed)
    hidden = model.config.vision_config.out_hidden_size  # as the trainer sizes its scorer
    backbone_params = sum(p.numel() for p in model.parameters())
    scorer_params = sum(p.numel() for p in VisionSelectorScorer(hidden).parameters())
    weights = tensor_bytes(model)
    print(
        f"device: {label}  dtype: {str(dtype).removeprefix('torch.')}  attention: SDPA  "
        f"built in {time.perf_counter() - t0:.1f} s"
    )
    print(
        f"backbone: {backbone_params / 1e6:,.1f}M parameters (frozen), {_gib(weights):.3f} GiB; "
        f"scorer: {scorer_params:,} parameters (D={hidden}, float32, AdamW lr {TRAINER_LR})"
    )
    print(
        f"keep ratio {args.keep_ratio}; timer: "
        f"{'CUDA events' if is_cuda else 'time.perf_counter'}, median of {args.steps} steps "
        f"after {args.warmup} warm-up",
        flush=True,
    )

    common = {
        "geometry": args.geometry,
        "device": label,
        "dtype": str(dtype).removeprefix("torch."),
        "attention": "sdpa",
        "torch": torch.__version__,
        "keep_ratio": args.keep_ratio,
        "backbone_params": backbone_params,
        "scorer_params": scorer_params,
        "weights_gib": _gib(weights),
        "warmup": args.warmup,
        "steps": args.steps,
        "timer": "cuda_events" if is_cuda else "perf_counter",
    }
    rows: list[dict[str, Any]] = []
    for px in args.image_size:
        for b in args.batch:
            print(
                f"  {px}px x batch {b}: {args.warmup} warm-up + {args.steps} timed steps ...",
                flush=True,
            )
            row = {**common, "image_px": px, "batch": b}
            row.update(_time_pair(model, hidden, geometry, px, b, args, device))
            row["command"] = args.command
            rows.append(row)

    _table(rows)
    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = CSV_STEM[args.geometry]
    csv_path = out_dir / f"{stem}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    _plot(rows, out_dir / f"{stem}.png")
    print(f"command: {args.command}")
    return 0


def _time_pair(
    model: torch.nn.Module,
    hidden: int,
    geometry: dict[str, Any],
    px: int,
    b: int,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Build the batch and a fresh scorer + optimizer, warm up, time; the row's measured part."""
    is_cuda = device.type == "cuda"
    cpu_batch = make_batch(geometry, px, b, args.seed + px)
    counts = image_token_counts(model, cpu_batch)
    kept = PackedImages.from_ratio(counts, args.keep_ratio, "cpu").keep_counts.tolist()
    out: dict[str, Any] = {
        "visual_tokens": counts[0],
        "kept_soft": int(kept[0]),
        "seq_len": int(cpu_batch["input_ids"].shape[1]),
    }
    step = None
    try:
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        step = TrainStep(model, hidden, batch, args.keep_ratio, args.warmup + args.steps, args.seed)
        if args.warmup:
            measure_ms(step, device, 0, args.warmup)
        else:  # check the gradients outside the timed steps
            step()
        if is_cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        ms = measure_ms(step, device, 0, args.steps)
        peak = torch.cuda.max_memory_allocated(device) if is_cuda else None
    except torch.cuda.OutOfMemoryError:
        print(f"  {px}px x batch {b}: out of memory", flush=True)
        out.update(status="oom")
        return out
    finally:
        del step
        if is_cuda:
            torch.cuda.empty_cache()
    out.update(
        status="ok",
        ms_per_step=round(ms, 3),
        steps_per_s=round(1e3 / ms, 4),
        samples_per_s=round(b * 1e3 / ms, 4),
        peak_gib=_gib(peak) if peak is not None else "",
        peak_over_base_gib=_gib(peak - base) if peak is not None else "",
    )
    return out


def _table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'px':>5} {'N':>5} {'kept':>5} {'batch':>5} {'L':>6} {'ms/step':>9} {'steps/s':>8} "
        f"{'samples/s':>9} {'peak GiB':>9} {'+base GiB':>9}"
    )
    for r in rows:
        head = (
            f"{r['image_px']:>5} {r['visual_tokens']:>5} {r['kept_soft']:>5} {r['batch']:>5} "
            f"{r['seq_len']:>6}"
        )
        if r["status"] != "ok":
            print(f"{head} {r['status']:>9}")
            continue
        print(
            f"{head} {r['ms_per_step']:>9.2f} {r['steps_per_s']:>8.3f} {r['samples_per_s']:>9.3f} "
            f"{r['peak_gib']!s:>9} {r['peak_over_base_gib']!s:>9}"
        )


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    ok = [r for r in rows if r["status"] == "ok"]
    has_mem = any(r["peak_gib"] != "" for r in ok)
    fig, axes = plt.subplots(1, 3 if has_mem else 2, figsize=(15 if has_mem else 10, 4.2))
    for px in sorted({r["image_px"] for r in ok}):
        pts = sorted((r for r in ok if r["image_px"] == px), key=lambda r: r["batch"])
        name = f"{px}² ({pts[0]['visual_tokens']} tok)"
        batches = [r["batch"] for r in pts]
        axes[0].plot(batches, [r["ms_per_step"] for r in pts], marker="o", label=name)
        axes[1].plot(batches, [r["samples_per_s"] for r in pts], marker="o", label=name)
        if has_mem:
            axes[2].plot(batches, [r["peak_gib"] for r in pts], marker="o", label=name)
    axes[0].set(xlabel="micro batch", ylabel="ms", title="one training step (median)")
    axes[1].set(xlabel="micro batch", ylabel="samples / s", title="throughput")
    if has_mem:
        axes[2].axhline(ok[0]["weights_gib"], color="k", linestyle=":", label="backbone weights")
        axes[2].set(xlabel="micro batch", ylabel="GiB", title="peak memory (allocated)")
    for ax in axes:
        ax.set_xticks(sorted({r["batch"] for r in ok}))
        ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(
        f"scorer training step, Qwen2.5-VL {r0['geometry']} geometry (frozen), keep "
        f"{r0['keep_ratio']}, {r0['dtype']}, {r0['device']}"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
