"""How much does selection change the model's answer? Every strategy x keep ratio vs full tokens.

For each prompt, the full-token model (every visual token kept) is the reference. For every
strategy and keep ratio the same prompt is run with only the kept visual tokens (the HF
selection path, :func:`vs_vllm.hf.select_inputs`, the same selection as the vLLM plugin) and
compared with the reference:

* ``kl`` / ``top1``: KL(full || selected) (nats) and top-1 agreement of the next-token
  distribution at the last prompt position (the first answer token), mean over prompts
  (``kl_max``: the largest);
* ``kl_answer`` / ``top1_answer`` (``--answer-positions N``, default 4; 0 leaves them out): the
  same over the first N answer positions, teacher-forced on the full model's greedy answer (so
  both models are compared on the same continuation), pooled over positions; a greedy answer
  shorter than N (it stopped at ``<|im_end|>``) contributes its own length;
* ``accuracy`` (only when the data has answers): the greedy answer equals the reference answer
  (exact match after strip + lower-case); the ``full`` row is the full-token model's own.

Models and data:

    python benchmarks/quality.py        # tiny random Qwen2.5-VL built locally, generated images
    python benchmarks/quality.py --model DIR --data held_out.jsonl --image-root images/ \\
        --scorer scorer/                # e.g. the backbone, scorer and held-out split of
                                        # benchmarks/selection_learning.py --work W:
                                        # --model W/backbone --scorer W/scorer
                                        # --data W/data/heldout.jsonl --image-root W/data

Without ``--data`` the prompts are ``--samples`` generated images
(:func:`tiny_models.tiny_qwen.tiny_image`) with the question "Describe this image in one
sentence." (no reference answers, so no accuracy). With ``--data`` (LLaVA / Qwen-VL JSONL, as
``vs-vllm train`` reads it) each sample's prompt is its conversation up to its *last* answer
(earlier answers stay in the prompt as context) and that answer is the reference; text-only
samples are skipped. ``learned`` uses ``--scorer``, else the scorer merged into ``--model``
when there is one, else a random scorer (seeded), labelled ``learned (random scorer)``.

Deterministic: the generated images, the tiny model and the random scorer come from
``--seed``; ``random`` selection is seeded from each image's content. On the CPU two runs
write the same numbers. Writes ``benchmarks/results/<device>/quality.csv`` (one row per
strategy x ratio after a ``full`` row; every row also holds the command, model, data, scorer
and number of samples) and ``quality.png`` (``--out`` changes the results folder, ``--name``
the file stem).
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.device_name import device_label, device_slug
from benchmarks.results_name import file_stem

DEFAULT_RATIOS = (0.5, 0.3, 0.2, 0.1)
QUESTION = "Describe this image in one sentence."
# Sizes of the generated images (cycled): different aspect ratios, so token grids differ.
IMAGE_SIZES = ((224, 224), (300, 200), (168, 336), (448, 280), (200, 300), (256, 192))
RANDOM_SCORER_LABEL = "learned (random scorer)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- inputs


@dataclass
class Item:
    """One evaluation prompt: unpruned prompt ids, its images' visual tokens, the answer."""

    name: str
    prompt_ids: torch.Tensor  # (1, L)
    grid_thw: torch.Tensor  # (num_images, 3)
    feats: torch.Tensor  # (sum N_i, D) visual tokens (vision tower + merger), computed once
    answer: str | None  # reference answer, None without data


@dataclass
class Reference:
    """The full-token model's outputs for one prompt."""

    logprobs: torch.Tensor  # (P, V) float64 log-probs at the compared positions
    teacher: list[int]  # greedy answer tokens fed after the prompt (P - 1 of them)
    correct: float | None


@dataclass
class Totals:
    """Running sums for one (strategy, ratio) setting."""

    samples: int = 0
    kl: float = 0.0
    kl_max: float = 0.0
    top1: float = 0.0
    positions: int = 0
    kl_answer: float = 0.0
    top1_answer: float = 0.0
    correct: float = 0.0
    answered: int = 0
    visual_tokens: int = 0
    kept_tokens: int = 0


def _last_answer_start(labels: torch.Tensor) -> int:
    """Index of the first labelled token of the last labelled run (the last answer)."""
    at = (labels != -100).nonzero().flatten().tolist()
    if not at:
        raise ValueError("the sample has no labelled answer token")
    i = len(at) - 1
    while i > 0 and at[i - 1] == at[i] - 1:
        i -= 1
    return at[i]


def data_items(model, processor, args, log) -> tuple[list[Item], int]:
    """Items from ``args.data`` (LLaVA JSONL): prompt up to the last answer; skipped count."""
    from vs_vllm.hf import image_features
    from vs_vllm.train.data import SampleEncoder, read_samples

    samples = read_samples(args.data, args.image_root or args.data.parent, log=log)
    encoder = SampleEncoder(processor, max_pixels=args.max_pixels)
    items: list[Item] = []
    skipped = 0
    for sample in samples:
        if args.samples is not None and len(items) >= args.samples:
            break
        if not sample.images:
            skipped += 1
            continue
        enc = encoder(sample)
        start = _last_answer_start(enc["labels"])
        grid = enc["image_grid_thw"].to(args.device)
        with torch.no_grad():
            feats = image_features(
                model, {"pixel_values": enc["pixel_values"].to(args.device), "image_grid_thw": grid}
            )
        items.append(
            Item(
                name=f"{args.data.name}:{sample.line}",
                prompt_ids=enc["input_ids"][:start].unsqueeze(0).to(args.device),
                grid_thw=grid,
                feats=feats,
                answer=sample.conversations[-1][1],
            )
        )
    if skipped:
        log(f"skipped {skipped} text-only samples")
    return items, skipped


def generated_items(model, processor, args) -> list[Item]:
    """``args.samples`` generated images, each with :data:`QUESTION` (no reference answer)."""
    from tiny_models.tiny_qwen import tiny_image
    from vs_vllm.hf import image_features
    from vs_vllm.train.data import SampleEncoder

    pixels = SampleEncoder(processor, max_pixels=args.max_pixels)  # the training pixel bounds
    size = {"shortest_edge": pixels.min_pixels, "longest_edge": pixels.max_pixels}
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    items = []
    for i in range(args.samples):
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        image = tiny_image(w, h, seed=args.seed * 1000 + i)
        enc = processor(
            text=[text], images=[image], return_tensors="pt", images_kwargs={"size": size}
        )
        grid = enc["image_grid_thw"].to(args.device)
        with torch.no_grad():
            feats = image_features(
                model, {"pixel_values": enc["pixel_values"].to(args.device), "image_grid_thw": grid}
            )
        items.append(
            Item(
                name=f"tiny_image({w}, {h}, seed={args.seed * 1000 + i})",
                prompt_ids=enc["input_ids"].to(args.device),
                grid_thw=grid,
                feats=feats,
                answer=None,
            )
        )
    return items


# ----------------------------------------------------------------------------- metrics


def _matches(tokenizer, tokens: list[int], answer: str) -> float:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return float(text.strip().lower() == answer.strip().lower())


def _budget(tokenizer, item: Item, args) -> int:
    """Greedy tokens to decode for the accuracy check."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return len(tokenizer(item.answer, add_special_tokens=False)["input_ids"]) + 4


@torch.no_grad()
def position_logprobs(model, inputs, teacher: list[int]) -> torch.Tensor:
    """(1 + len(teacher), V) float64 log-probs: last prompt position, then after each teacher
    token (fed on the unpruned timeline, as greedy decoding does)."""
    from vs_vllm.hf import language_model_logits

    embeds, positions = inputs.inputs_embeds, inputs.position_ids
    if teacher:
        feed = torch.tensor([teacher], dtype=torch.int64, device=embeds.device)
        embeds = torch.cat([embeds, model.get_input_embeddings()(feed)], dim=1)
        tail = inputs.next_position + torch.arange(len(teacher), device=positions.device)
        positions = torch.cat([positions, tail.view(1, 1, -1).expand(3, 1, -1)], dim=2)
    logits = language_model_logits(model, embeds, positions)[0, inputs.seq_len - 1 :]
    return torch.log_softmax(logits.double(), dim=-1)


def kl_and_agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(ref || got) in nats (float64, clamped at 0 against rounding) and
    whether the argmax tokens agree."""
    kl = (ref.exp() * (ref - got)).sum(-1).clamp(min=0.0)
    return kl, (ref.argmax(-1) == got.argmax(-1)).double()


@torch.no_grad()
def reference(model, tokenizer, item: Item, args, eos) -> Reference:
    """The full-token model: greedy answer (teacher tokens, accuracy) and its log-probs."""
    from vs_vllm.hf import greedy_decode, select_inputs
    from vs_vllm.strategies import build_strategy

    # ratio 1.0 keeps every token whatever the strategy: plain transformers' inputs
    inputs = select_inputs(
        model,
        item.prompt_ids,
        {"image_grid_thw": item.grid_thw},
        build_strategy("uniform"),
        1.0,
        image_embeds=item.feats,
    )
    steps = max(args.answer_positions, 1)
    if item.answer is not None:
        steps = max(steps, _budget(tokenizer, item, args))
    greedy = greedy_decode(model, inputs, steps, eos_token_id=eos)
    positions = max(1, min(args.answer_positions, len(greedy)))
    teacher = greedy[: positions - 1]
    correct = None
    if item.answer is not None:
        correct = _matches(tokenizer, greedy[: _budget(tokenizer, item, args)], item.answer)
    return Reference(position_logprobs(model, inputs, teacher), teacher, correct)


@torch.no_grad()
def compare(model, tokenizer, item: Item, ref: Reference, strategy, ratio, args, eos, acc):
    """Select at ``ratio`` with ``strategy``, compare with ``ref``, add to ``acc``."""
    from vs_vllm.hf import greedy_decode, select_inputs

    inputs = select_inputs(
        model,
        item.prompt_ids,
        {"image_grid_thw": item.grid_thw},
        strategy,
        ratio,
        image_embeds=item.feats,
    )
    kl, agree = kl_and_agreement(ref.logprobs, position_logprobs(model, inputs, ref.teacher))
    acc.samples += 1
    acc.kl += float(kl[0])
    acc.kl_max = max(acc.kl_max, float(kl[0]))
    acc.top1 += float(agree[0])
    acc.positions += int(kl.numel())
    acc.kl_answer += float(kl.sum())
    acc.top1_answer += float(agree.sum())
    acc.visual_tokens += inputs.images.total_tokens
    acc.kept_tokens += inputs.images.total_kept
    if item.answer is not None:
        budget = _budget(tokenizer, item, args)
        tokens = greedy_decode(model, inputs, budget, eos_token_id=eos)
        acc.correct += _matches(tokenizer, tokens, item.answer)
        acc.answered += 1


def _row(strategy: str, ratio: float, acc: Totals, answer_positions: int) -> dict[str, Any]:
    n = max(acc.samples, 1)
    row: dict[str, Any] = {
        "strategy": strategy,
        "keep_ratio": ratio,
        "visual_tokens_mean": round(acc.visual_tokens / n, 2),
        "kept_tokens_mean": round(acc.kept_tokens / n, 2),
        "kl": acc.kl / n,
        "kl_max": acc.kl_max,
        "top1": acc.top1 / n,
        "kl_answer": "",
        "top1_answer": "",
        "answer_positions_mean": "",
        "accuracy": acc.correct / acc.answered if acc.answered else "",
    }
    if answer_positions:
        row["kl_answer"] = acc.kl_answer / max(acc.positions, 1)
        row["top1_answer"] = acc.top1_answer / max(acc.positions, 1)
        row["answer_positions_mean"] = round(acc.positions / n, 2)
    return row


# ----------------------------------------------------------------------------- model


def _load_scorer(args, model, log):
    """(scorer, label, source) for ``learned``: --scorer, the merged one, or a random one."""
    from vs_vllm.checkpoint import CheckpointError, load_scorer
    from vs_vllm.scorer import VisionSelectorScorer

    hidden = model.config.vision_config.out_hidden_size
    if args.scorer is not None:
        scorer = load_scorer(args.scorer, hidden, device=args.device)
        return scorer, "learned", str(args.scorer)
    if args.model is not None:
        try:
            scorer = load_scorer(args.model, hidden, device=args.device)
        except CheckpointError:
            pass
        else:
            log(f"learned: the scorer merged into {args.model}")
            return scorer, "learned", f"merged in {args.model}"
    # A fresh scorer's init (std 1e-4) is meant for training; a random projection at the
    # usual 1/sqrt(D) scale rates tokens by an arbitrary direction, seeded.
    scorer = VisionSelectorScorer(hidden)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for p in scorer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(hidden))
    log(f"learned: no scorer checkpoint, a random scorer (seed {args.seed})")
    return scorer.to(args.device), RANDOM_SCORER_LABEL, f"random (seed {args.seed})"


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]


# ----------------------------------------------------------------------------- output


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'strategy':>24} {'keep':>5} {'kept':>7} {'KL':>9} {'top1':>6} {'KL ans':>9} "
        f"{'top1 ans':>8} {'acc':>6}"
    )

    def f(value: Any, spec: str, width: int) -> str:
        return f"{value:{width}{spec}}" if value != "" else f"{'-':>{width}}"

    for r in rows:
        print(
            f"{r['strategy']:>24} {r['keep_ratio']:>5.2f} {r['kept_tokens_mean']:>7.1f} "
            f"{f(r['kl'], '.4f', 9)} {f(r['top1'], '.3f', 6)} {f(r['kl_answer'], '.4f', 9)} "
            f"{f(r['top1_answer'], '.3f', 8)} {f(r['accuracy'], '.3f', 6)}"
        )


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != "full"))
    ratios = sorted({r["keep_ratio"] for r in rows})
    with_answers = any(r["kl_answer"] != "" for r in rows)
    with_accuracy = any(r["accuracy"] != "" for r in rows)
    panels = [("kl", "KL(full || selected), last prompt position", "nats")]
    panels.append(("top1", "top-1 agreement with full tokens", "fraction"))
    if with_accuracy:
        panels.append(("accuracy", "answer accuracy (exact match)", "fraction"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label, unit) in zip(axes[0], panels, strict=True):
        for i, name in enumerate(strategies):
            colour = colours[i % len(colours)]
            pts = sorted((r["keep_ratio"], r[key]) for r in rows if r["strategy"] == name)
            ax.plot(*zip(*pts, strict=True), marker="o", color=colour, label=name)
            answer_key = {"kl": "kl_answer", "top1": "top1_answer"}.get(key)
            if with_answers and answer_key:
                pts = sorted(
                    (r["keep_ratio"], r[answer_key]) for r in rows if r["strategy"] == name
                )
                ax.plot(*zip(*pts, strict=True), marker=".", linestyle="--", color=colour)
        full = next((r for r in rows if r["strategy"] == "full"), None)
        if full is not None and full[key] != "":
            ax.plot([1.0], [full[key]], "k*", markersize=10, label="full (all tokens)")
            if key == "accuracy":
                ax.axhline(full[key], color="k", linestyle=":", linewidth=0.8)
        if key != "kl":
            ax.set_ylim(-0.03, 1.03)
        ax.set(xlabel="keep ratio", ylabel=unit, title=label, xticks=ratios)
    if with_answers:
        axes[0][0].plot([], [], "k--", marker=".", label="dashed: first answer positions")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def _ratios(text: str) -> list[float]:
    from vs_vllm.selection import validate_keep_ratio

    out = []
    for part in text.split(","):
        try:
            out.append(validate_keep_ratio(float(part), name="--ratios"))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    from vs_vllm.strategies import available_strategies

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="Qwen2.5-VL model directory (default: a tiny random one built locally)",
    )
    p.add_argument("--data", type=Path, default=None, help="LLaVA-format JSONL with answers")
    p.add_argument("--image-root", type=Path, default=None, help="default: the JSONL's folder")
    p.add_argument("--scorer", type=Path, default=None, help="scorer checkpoint for learned")
    p.add_argument("--strategies", default=",".join(available_strategies()))
    p.add_argument("--ratios", type=_ratios, default=list(DEFAULT_RATIOS))
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="prompts (default: 16 generated images; with --data, every sample)",
    )
    p.add_argument(
        "--answer-positions",
        type=int,
        default=4,
        help="compare the first N answer positions too (0: last prompt position only)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="greedy answer length for accuracy (default: reference tokens + 4)",
    )
    p.add_argument("--max-pixels", type=int, default=None, help="default: the training 50176")
    p.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="default: float32 on the CPU, bfloat16 on CUDA",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--work", type=Path, default=None, help="keep the tiny model here")
    p.add_argument(
        "--name",
        type=file_stem,
        default="quality",
        help="file stem of the CSV and PNG (default: quality)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in available_strategies()]
    if unknown or not args.strategies:
        p.error(f"--strategies: unknown {unknown}; choose from {', '.join(available_strategies())}")
    if args.samples is not None and args.samples < 1:
        p.error("--samples must be >= 1")
    if args.answer_positions < 0:
        p.error("--answer-positions must be >= 0")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.data is None:
        if args.image_root is not None:
            p.error("--image-root needs --data")
        if args.samples is None:
            args.samples = 16
    if args.max_pixels is None:
        from vs_vllm.train.data import DEFAULT_MAX_PIXELS

        args.max_pixels = DEFAULT_MAX_PIXELS
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    args.dtype_name, args.dtype = args.dtype, DTYPES[args.dtype]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/quality.py", *argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)

    work = args.work
    temporary = work is None and args.model is None
    if temporary:
        work = Path(tempfile.mkdtemp(prefix="vs-quality-"))
    try:
        rows, info = _run(args, work, log)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)

    out_dir = args.out / device_slug(args.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {
        "samples": info["samples"],
        "command": command,
        "model": info["model"],
        "data": str(args.data) if args.data else f"generated: {QUESTION}",
        "scorer": info["scorer"],
        "answer_positions": args.answer_positions,
        "device": device_label(args.device),
        "dtype": args.dtype_name,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    csv_path = out_dir / f"{args.name}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *extra])
        writer.writeheader()
        for r in rows:
            writer.writerow({**_rounded(r), **extra})
    title = (
        f"{command}\n{info['model']}; {info['samples']} prompts; {device_label(args.device)}, "
        f"{args.dtype_name}; dashed: first {args.answer_positions} answer positions"
    )
    plot(rows, out_dir / f"{args.name}.png", title)
    print()
    print(f"command: {command}")
    print(f"model: {info['model']}  data: {extra['data']}  samples: {info['samples']}")
    print_table(rows)
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')} ({extra['seconds']:.0f} s)")
    return 0


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    """Floats to 6 significant digits for the CSV (KL 0 stays 0.0)."""
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}


def _run(args, work: Path | None, log) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from tqdm.auto import tqdm
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vs_vllm.strategies import build_strategy

    if args.model is None:
        from tiny_models.tiny_qwen import build_tiny_qwen25_vl

        log("building the tiny random Qwen2.5-VL")
        model_dir = build_tiny_qwen25_vl(work / "tiny-qwen25-vl", seed=args.seed)
        model_name = f"tiny random Qwen2.5-VL (seed {args.seed})"
    else:
        model_dir = args.model
        model_name = str(args.model)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=args.dtype)
    model = model.to(args.device).eval()
    tokenizer = processor.tokenizer
    eos = _eos_ids(model, tokenizer)

    scorer, learned_label, scorer_source = _load_scorer(args, model, log)
    strategies = {}
    for name in args.strategies:
        label = learned_label if name == "learned" else name
        strategies[label] = build_strategy(name, scorer if name == "learned" else None)

    log("preparing prompts (vision tower once per prompt)")
    if args.data is not None:
        items, _ = data_items(model, processor, args, log)
    else:
        items = generated_items(model, processor, args)
    if not items:
        raise SystemExit("quality: no prompt with an image to evaluate")

    settings = [(label, ratio) for ratio in args.ratios for label in strategies]
    totals = {key: Totals() for key in settings}
    full = Totals()
    bar = tqdm(total=len(items) * (1 + len(settings)), desc="quality", disable=args.no_progress)
    for item in items:
        ref = reference(model, tokenizer, item, args, eos)
        full.samples += 1
        full.top1 += 1.0
        full.top1_answer += float(ref.logprobs.shape[0])
        full.positions += int(ref.logprobs.shape[0])
        n = int(item.feats.shape[0])
        full.visual_tokens += n
        full.kept_tokens += n
        if ref.correct is not None:
            full.correct += ref.correct
            full.answered += 1
        bar.update(1)
        for label, ratio in settings:
            compare(
                model,
                tokenizer,
                item,
                ref,
                strategies[label],
                ratio,
                args,
                eos,
                totals[label, ratio],
            )
            bar.update(1)
    bar.close()

    rows = [_row("full", 1.0, full, args.answer_positions)]
    rows += [
        _row(label, ratio, totals[label, ratio], args.answer_positions) for label, ratio in settings
    ]
    info = {"samples": len(items), "model": model_name, "scorer": scorer_source}
    return rows, info


if __name__ == "__main__":
    sys.exit(main())
