"""Prefill time and memory of Qwen2.5-VL with visual-token selection on HF transformers (no vLLM).

For machines with a GPU but no vLLM. A Qwen2.5-VL with the published **Qwen2.5-VL-7B**
dimensions (:data:`QWEN25_VL_7B`, written out here: nothing is downloaded) is built from its
config with random weights directly on the device (bf16, SDPA attention). One image plus a
short question (batch 1), prompt laid out like Qwen's chat template:
``<system + user header> <|vision_start|> N x <|image_pad|> <|vision_end|> <question + assistant
header>``. Image sizes 448², 896², 1344², 1792² pixels give N = 256, 1024, 2304, 4096 visual
tokens (patch 14, merge 2).

For each image size and keep ratio (default 1.0, 0.5, 0.3, 0.2, 0.1) it times, with CUDA events
(``time.perf_counter`` on the CPU), median of ``--repeat`` after ``--warmup``:

* ``whole``: the first forward as a user runs it: vision tower + selection + assembling the
  pruned prompt (``vs_vllm.hf.select_inputs``) + LLM prefill with the last position's logits
  (``vs_vllm.hf.language_model_logits(last_only=True)``);
* ``vit``: the vision tower + merger alone (``vs_vllm.hf.image_features``);
* ``select``: the selection alone (``vs_vllm.select.select_visual_tokens`` with the ``learned``
  strategy and a random-weight scorer, on CUDA through the fused Triton kernel; the sizes'
  device tensors are built inside the timed region, as in the real path; ratio 1.0 keeps
  everything without scoring);
* ``inputs``: selection + assembly of the pruned ids / embeddings / M-RoPE positions;
* ``llm``: the LLM prefill on the kept sequence alone;

and, on CUDA, the peak memory of ``whole`` (``torch.cuda.max_memory_allocated``) and its part
above what was allocated before it (weights, inputs), plus the KV cache the prompt leaves
(computed: 2 x layers x KV heads x head dim x prompt length x itemsize). It prints the speedup
at keep 0.2 vs 1.0 next to the paper's 1.73x (HF, batch 1, vision tower included) and next to
the limit from the measured parts, ``(T_vit + T_llm(full)) / (T_vit + T_select + T_llm(kept))``,
and the memory reductions next to the paper's 86.08% (whose exact definition may differ).

    python benchmarks/hf_prefill.py                                 # GPU: 7B geometry
    python benchmarks/hf_prefill.py --sizes 448,896 --ratios 1.0,0.2 --repeat 3
    python benchmarks/hf_prefill.py --geometry tiny --allow-cpu     # CPU smoke test

Writes ``benchmarks/results/<device>/hf_prefill.csv`` and ``hf_prefill.png`` (``--out``
changes the results folder; the tiny geometry writes ``hf_prefill_tiny.*``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.device_name import device_label, device_slug
from benchmarks.torch_threads import torch_threads
from vs_vllm.batch import PackedImages
from vs_vllm.hf import image_features, image_token_counts, language_model_logits, select_inputs
from vs_vllm.kernels import resolve_backend
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.selection import select_visual_tokens
from vs_vllm.strategies import build_strategy

PAPER_SPEEDUP = 1.73  # VisionSelector paper: prefill speedup at 20% retention (HF, batch 1)
PAPER_MEMORY_REDUCTION = 86.08  # percent, same setting (the paper's own definition)
PAPER_RATIO = 0.2

#: Qwen/Qwen2.5-VL-7B-Instruct's config.json (transformers 5.x field names).
QWEN25_VL_7B = {
    "text": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 28,
        "attention_dropout": 0.0,
        "rope_parameters": {
            "rope_type": "default",
            "type": "mrope",
            "mrope_section": [16, 24, 24],
            "rope_theta": 1000000.0,
        },
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "hidden_act": "silu",
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "ids": {
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "text_vocab": 151643,  # ordinary text tokens are below the first special token
    },
}

# Text around the image, in tokens: "<|im_start|>system\nYou are a helpful assistant.<|im_end|>
# \n<|im_start|>user\n" before it, "Describe this image in one sentence.<|im_end|>\n
# <|im_start|>assistant\n" after it (lengths as Qwen's tokenizer splits them, roughly).
PREFIX_TOKENS = 14
QUESTION_TOKENS = 13

DEFAULT_SIZES = {"7b": "448,896,1344,1792", "tiny": "56,112,224"}


def tiny_geometry() -> dict:
    """The repo's tiny Qwen2.5-VL (:class:`vs_vllm.testing.tiny_qwen.TinyQwenSpec`) in the same
    form as :data:`QWEN25_VL_7B` (vocab 1024, special ids at its top)."""
    from vs_vllm.testing.tiny_qwen import TinyQwenSpec, spec_text_config, spec_vision_config

    spec = TinyQwenSpec()
    spec.validate()
    vocab = 1024
    return {
        "text": spec_text_config(spec, vocab, bos_token_id=vocab - 16, eos_token_id=vocab - 14),
        "vision": spec_vision_config(spec),
        "ids": {
            "image_token_id": vocab - 11,
            "video_token_id": vocab - 10,
            "vision_start_token_id": vocab - 13,
            "vision_end_token_id": vocab - 12,
            "text_vocab": vocab - 16,
        },
    }


def make_config(geometry: dict):
    from transformers import Qwen2_5_VLConfig

    ids = geometry["ids"]
    config = Qwen2_5_VLConfig(
        text_config=dict(geometry["text"]),
        vision_config=dict(geometry["vision"]),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=bool(geometry.get("tie_word_embeddings", False)),
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def build_model(geometry: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights from the config, allocated and initialised on ``device``; SDPA attention."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            make_config(geometry), dtype=dtype, attn_implementation="sdpa"
        )
    return model.eval()


def make_prompt(geometry: dict, image_px: int, device: torch.device, dtype: torch.dtype, seed: int):
    """(input_ids (1, L), pixel_values, image_grid_thw (1, 3)) of one square image + a question."""
    vision, ids = geometry["vision"], geometry["ids"]
    patch, merge = vision["patch_size"], vision["spatial_merge_size"]
    if image_px % (patch * merge):
        raise ValueError(f"image size {image_px} must be a multiple of {patch * merge} pixels")
    side = image_px // patch
    grid = torch.tensor([[1, side, side]], dtype=torch.int64, device=device)
    gen = torch.Generator().manual_seed(seed + image_px)
    per_patch = vision["in_channels"] * vision["temporal_patch_size"] * patch * patch
    pixel_values = torch.randn(side * side, per_patch, generator=gen).to(device, dtype)
    n = side * side // (merge * merge)
    prefix = torch.randint(0, ids["text_vocab"], (PREFIX_TOKENS,), generator=gen)
    question = torch.randint(0, ids["text_vocab"], (QUESTION_TOKENS,), generator=gen)
    input_ids = torch.cat(
        [
            prefix,
            torch.tensor([ids["vision_start_token_id"]]),
            torch.full((n,), ids["image_token_id"]),
            torch.tensor([ids["vision_end_token_id"]]),
            question,
        ]
    )
    return input_ids.unsqueeze(0).to(device), pixel_values, grid


def kv_cache_bytes_per_token(geometry: dict, dtype: torch.dtype) -> int:
    """Bytes of K and V that one prompt token leaves in the cache (all layers)."""
    text = geometry["text"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * itemsize


def measure_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on CUDA, ``perf_counter`` elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> tuple[float, float] | None:
    """(peak allocated, peak above what was allocated before) MiB during ``fn``; CUDA only."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**20, (peak - base) / 2**20


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", choices=("7b", "tiny"), default="7b")
    p.add_argument("--sizes", default=None, help="square image sizes in pixels (comma list)")
    p.add_argument("--ratios", default="1.0,0.5,0.3,0.2,0.1", help="keep ratios (comma list)")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="default: bfloat16 on CUDA, float32 on the CPU",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU (use --geometry tiny)")
    args = p.parse_args(argv)
    args.sizes = [int(v) for v in (args.sizes or DEFAULT_SIZES[args.geometry]).split(",") if v]
    args.ratios = _floats(args.ratios)
    if 1.0 not in args.ratios:
        args.ratios.insert(0, 1.0)  # the baseline every speedup is relative to
    for r in args.ratios:
        if not 0.0 < r <= 1.0:
            p.error(f"keep ratios must be in (0, 1], got {r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.allow_cpu:
        print(
            "no CUDA device: pass --allow-cpu (with --geometry tiny) to run on the CPU",
            file=sys.stderr,
        )
        return 2
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    geometry = QWEN25_VL_7B if args.geometry == "7b" else tiny_geometry()
    label = device_label(device)

    t0 = time.perf_counter()
    model = build_model(geometry, device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    hidden = geometry["text"]["hidden_size"]
    torch.manual_seed(args.seed + 1)
    scorer = VisionSelectorScorer(hidden).to(device)
    strategy = build_strategy("learned", scorer)
    backend = resolve_backend(device)
    print(
        f"device: {label}  geometry: {args.geometry} ({n_params / 1e6:,.1f}M parameters, "
        f"{dtype}, SDPA)  built in {time.perf_counter() - t0:.1f} s"
    )
    print(f"selection: learned strategy, random scorer, select kernel backend: {backend}")
    print(
        f"timer: {'CUDA events' if device.type == 'cuda' else 'time.perf_counter'}, "
        f"median of {args.repeat} after {args.warmup} warm-up"
    )
    print(
        f"{'px':>5} {'N':>5} {'ratio':>5} {'L full':>6} {'L kept':>6} {'whole ms':>9} "
        f"{'vit':>8} {'select':>7} {'inputs':>7} {'llm':>8} {'peak MiB':>9} {'speedup':>7} "
        f"{'limit':>6}"
    )

    rows: list[dict] = []
    with torch.inference_mode():
        for px in args.sizes:
            input_ids, pixel_values, grid = make_prompt(geometry, px, device, dtype, args.seed)
            counts = image_token_counts(model, grid)
            n_visual = counts[0]

            def vit(pv=pixel_values, g=grid):
                return image_features(model, pv, g)

            t_vit = measure_ms(vit, device, args.warmup, args.repeat)
            x = vit()
            per_ratio: dict[float, dict] = {}
            kv_bytes_per_token = kv_cache_bytes_per_token(geometry, dtype)
            for r in args.ratios:

                def select(r=r, x=x, counts=counts):
                    return select_visual_tokens(
                        x, PackedImages.from_ratio(counts, r, device), strategy
                    )

                def inputs(r=r, x=x, ids=input_ids, g=grid):
                    return select_inputs(model, ids, None, g, strategy, r, image_embeds=x)

                kept = inputs()

                def llm(kept=kept):
                    return language_model_logits(
                        model, kept.inputs_embeds, kept.position_ids, last_only=True
                    )

                def whole(r=r, ids=input_ids, pv=pixel_values, g=grid):
                    sel = select_inputs(model, ids, pv, g, strategy, r)
                    return language_model_logits(
                        model, sel.inputs_embeds, sel.position_ids, last_only=True
                    )

                t_select = measure_ms(select, device, args.warmup, args.repeat)
                t_inputs = measure_ms(inputs, device, args.warmup, args.repeat)
                t_llm = measure_ms(llm, device, args.warmup, args.repeat)
                t_whole = measure_ms(whole, device, args.warmup, args.repeat)
                mem = peak_memory_mib(whole, device)
                per_ratio[r] = {
                    "geometry": args.geometry,
                    "device": label,
                    "dtype": str(dtype).removeprefix("torch."),
                    "strategy": "learned",
                    "select_backend": backend,
                    "image_px": px,
                    "visual_tokens": n_visual,
                    "keep_ratio": r,
                    "kept_tokens": kept.images.total_kept,
                    "prompt_len_full": int(input_ids.shape[1]),
                    "prompt_len_kept": kept.seq_len,
                    "whole_ms": round(t_whole, 3),
                    "vit_ms": round(t_vit, 3),
                    "select_ms": round(t_select, 3),
                    "inputs_ms": round(t_inputs, 3),
                    "llm_ms": round(t_llm, 3),
                    "parts_ms": round(t_vit + t_inputs + t_llm, 3),
                    "peak_mem_mib": round(mem[0], 1) if mem else "",
                    "peak_over_base_mib": round(mem[1], 1) if mem else "",
                    "kv_cache_mib": float(f"{kv_bytes_per_token * kept.seq_len / 2**20:.4g}"),
                }
                del kept
            full = per_ratio[1.0]
            for r, row in per_ratio.items():
                row["speedup"] = round(full["whole_ms"] / row["whole_ms"], 3)
                row["speedup_limit"] = round(
                    (row["vit_ms"] + full["llm_ms"])
                    / (row["vit_ms"] + row["select_ms"] + row["llm_ms"]),
                    3,
                )
                row["paper_speedup"] = PAPER_SPEEDUP if r == PAPER_RATIO else ""
                row["repeat"] = args.repeat
                row["torch"] = torch.__version__
                rows.append(row)
                print(
                    f"{px:>5} {n_visual:>5} {r:>5} {row['prompt_len_full']:>6} "
                    f"{row['prompt_len_kept']:>6} {row['whole_ms']:>9.2f} {row['vit_ms']:>8.2f} "
                    f"{row['select_ms']:>7.3f} {row['inputs_ms']:>7.2f} {row['llm_ms']:>8.2f} "
                    f"{row['peak_mem_mib']!s:>9} {row['speedup']:>7.2f} "
                    f"{row['speedup_limit']:>6.2f}"
                )
            del x

    _summary(rows)
    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "hf_prefill" if args.geometry == "7b" else "hf_prefill_tiny"
    csv_path = out_dir / f"{stem}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    _plot(rows, out_dir / f"{stem}.png")
    return 0


def _summary(rows: list[dict]) -> None:
    at = [r for r in rows if r["keep_ratio"] == PAPER_RATIO]
    if not at:
        return
    print(
        f"\nkeep {PAPER_RATIO} vs 1.0 (paper: {PAPER_SPEEDUP}x prefill, "
        f"{PAPER_MEMORY_REDUCTION}% memory reduction)"
    )
    print(
        f"{'px':>5} {'N':>5} {'measured':>9} {'limit':>6} {'paper':>6} {'peak above base':>16} "
        f"{'KV cache':>9}"
    )
    for r in at:
        full = next(f for f in rows if f["image_px"] == r["image_px"] and f["keep_ratio"] == 1.0)
        mem = ""
        if r["peak_over_base_mib"] != "" and full["peak_over_base_mib"]:
            mem = f"-{100 * (1 - r['peak_over_base_mib'] / full['peak_over_base_mib']):.1f}%"
        kv = f"-{100 * (1 - r['prompt_len_kept'] / full['prompt_len_kept']):.1f}%"
        print(
            f"{r['image_px']:>5} {r['visual_tokens']:>5} {r['speedup']:>8.2f}x "
            f"{r['speedup_limit']:>5.2f}x {PAPER_SPEEDUP:>5.2f}x {mem:>16} {kv:>9}"
        )


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    has_mem = any(r["peak_mem_mib"] != "" for r in rows)
    fig, axes = plt.subplots(1, 3 if has_mem else 2, figsize=(15 if has_mem else 10, 4.2))
    sizes = sorted({r["image_px"] for r in rows})
    for px in sizes:
        pts = sorted((r for r in rows if r["image_px"] == px), key=lambda r: r["keep_ratio"])
        ratios = [r["keep_ratio"] for r in pts]
        name = f"{px}² ({pts[0]['visual_tokens']} tok)"
        (line,) = axes[0].plot(ratios, [r["whole_ms"] for r in pts], marker="o", label=name)
        axes[0].plot(ratios, [r["vit_ms"] for r in pts], linestyle=":", color=line.get_color())
        axes[1].plot(
            ratios,
            [r["speedup"] for r in pts],
            marker="o",
            color=line.get_color(),
            label=f"{name} measured",
        )
        axes[1].plot(
            ratios,
            [r["speedup_limit"] for r in pts],
            linestyle="--",
            color=line.get_color(),
            label=f"{name} limit",
        )
        if has_mem:
            axes[2].plot(ratios, [r["peak_mem_mib"] for r in pts], marker="o", label=name)
    axes[0].set(
        xlabel="keep ratio", ylabel="ms", title="first forward (solid), vision tower (dotted)"
    )
    axes[1].plot(
        [PAPER_RATIO],
        [PAPER_SPEEDUP],
        marker="*",
        markersize=14,
        color="k",
        linestyle="",
        label=f"paper {PAPER_SPEEDUP}x",
    )
    axes[1].set(xlabel="keep ratio", ylabel="speedup vs keep 1.0", title="prefill speedup")
    if has_mem:
        axes[2].set(xlabel="keep ratio", ylabel="MiB", title="peak memory (whole forward)")
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.invert_xaxis()
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    fig.suptitle(
        f"Qwen2.5-VL {rows[0]['geometry']} geometry, HF transformers + vs-vllm "
        f"selection, {rows[0]['dtype']}, {rows[0]['device']}"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
