"""Prefill time and memory of Qwen2.5-VL with visual-token selection on HF transformers (no vLLM).

For machines with a GPU but no vLLM. A Qwen2.5-VL with the published **Qwen2.5-VL-7B**
dimensions (:data:`QWEN25_VL_7B`, written out here: nothing is downloaded) is built from its
config with random weights directly on the device (bf16, SDPA attention). One image plus a
short question (batch 1), prompt laid out like Qwen's chat template:
``<system + user header> <|vision_start|> N x <|image_pad|> <|vision_end|> <question + assistant
header>``. Image sizes 448², 896², 1344², 1792² pixels give N = 256, 1024, 2304, 4096 visual
tokens (patch 14, merge 2).

Timed regions, for each image size and keep ratio (default 1.0, 0.5, 0.3, 0.2, 0.1):

* ``whole``: the first forward as a user runs it: vision tower + selection + assembling the
  pruned prompt (``vs_vllm.hf.select_inputs``) + LLM prefill with the last position's logits
  (``vs_vllm.hf.language_model_logits(last_only=True)``);
* ``vit``: the vision tower + merger alone (``vs_vllm.hf.image_features``);
* ``inputs``: selection + assembly of the pruned ids / embeddings / M-RoPE positions
  (``select_inputs`` on the vision tower's output);
* ``llm``: the LLM prefill on the kept sequence alone;
* ``select``: the selection alone, a part of ``inputs`` (``vs_vllm.selection.select_visual_tokens``
  with the ``learned`` strategy and a random-weight scorer, on CUDA through the fused Triton
  kernel; the sizes' device tensors are built inside the timed region, as in the real path;
  ratio 1.0 keeps everything without scoring).

``whole`` makes the calls of ``vit``, then ``inputs``, then ``llm``, with the same inputs, so
``parts = vit + inputs + llm`` must match it: the ``parts/whole`` column is that check (median
of the per-round sums over the median whole; the CSV adds the min and max of the per-round
ratios), and a WARNING line is printed for every row where it is off 1 by more than
``--parts-tolerance`` (default 10%).

**How it times** (the same for every region; :mod:`benchmarks.timing`). One timed call:
``torch.cuda.synchronize``, then a pair of CUDA events recorded around the call, read after the
end event completes
(``time.perf_counter`` around the call on the CPU, where the work is synchronous). Per image
size, every region of every keep ratio is first called ``--warmup`` times (compilation, the
allocator, GPU clocks up from idle), then timed in ``--repeat`` interleaved rounds: a round
times every region of every ratio once, starting at a different ratio each round and with the
region order reversed every other round, after a ``gc.collect()``; so a slow stretch of the host
or of the GPU clocks lands on all ratios and regions alike, instead of on one block of
repeats. Reported per region: the median over the rounds, min, max and the interquartile range
in % of the median. The speedup at keep r is median whole(1.0) / median whole(r), with the
min and max of the per-round ratios whole(1.0) / whole(r) (both timed in the same round). On
CUDA the SM clock is read through NVML before each round, outside the timed regions; its min
and max go into the CSV.

Why (previous version, 2026-11-29 H200 run): ``vit`` was timed in one block of repeats per image
size before any ratio, then all repeats of ``select``, ``inputs``, ``llm``, ``whole`` for one
ratio, then the next ratio; and transformers' vision tower on SDPA is bound by the host (per layer,
one ``.tolist()`` sync, then one SDPA call per attention window), so its time follows the
host's speed at that moment. Blocks timed apart disagreed by up to a third (``vit`` 327 ms in
one run, 439 ms in the next; parts 553 ms against a whole of 443 ms), and the speedup, a ratio
of two such blocks, moved with them (3 repeats: 1.42x at 1792 px; 15 repeats: 1.18x). The
README ("HF prefill on a GPU") has the details.

**Memory**, what selection saves (both per keep ratio, and as "saved" against 1.0):

* ``kv_cache_mib``: the KV cache the prompt leaves, computed exactly from the model's config and
  the prompt length at that ratio: layers x 2 (K and V) x KV heads x head dim x dtype bytes x
  prompt tokens (the timed prefill runs with ``use_cache=False``, so no cache is allocated);
* ``llm_act_mib`` (CUDA only): the measured peak activation memory of the LLM prefill alone:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` just before the call (weights and the prefill's inputs are in that base).

Also in the CSV (CUDA only): ``vit_act_mib``, the same for the vision tower (the same at every
ratio), and ``peak_mem_mib``, the process's peak during the whole forward, weights included.
The old column "peak above base" was the whole forward's peak minus what was allocated before
it; it read -0.0% at every size because that peak is reached in a part that does not depend on
the keep ratio, the vision tower (690.3 MiB above base at 1792 px at every ratio on the H200).

    python benchmarks/hf_prefill.py                                 # GPU: 7B geometry
    python benchmarks/hf_prefill.py --sizes 896,1792 --ratios 1.0,0.2 --repeat 20
    python benchmarks/hf_prefill.py --geometry tiny --allow-cpu     # CPU smoke test

Writes ``benchmarks/results/<device>/hf_prefill.csv`` and ``hf_prefill.png`` (``--out``
changes the results folder; the tiny geometry writes ``hf_prefill_tiny.*``), one row per
(image size, keep ratio) with the command line.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.device_name import device_label, device_slug
from benchmarks.timing import Region, interleaved_samples, spread
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

#: The timed regions, in the order of one round's group (reversed every other round).
REGIONS = ("whole", "vit", "inputs", "llm", "select")
#: The parts the whole forward is made of, call for call (``select`` is inside ``inputs``).
PARTS = ("vit", "inputs", "llm")
PARTS_TOLERANCE = 0.10

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
    """The repo's tiny Qwen2.5-VL (:class:`tiny_models.tiny_qwen.TinyQwenSpec`) in the same
    form as :data:`QWEN25_VL_7B` (vocab 1024, special ids at its top)."""
    from tiny_models.tiny_qwen import TinyQwenSpec, spec_text_config, spec_vision_config

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


def kv_cache_bytes(text_config, dtype: torch.dtype, tokens: int) -> int:
    """Bytes of the KV cache that ``tokens`` prompt tokens leave: layers x 2 (K and V) x KV heads
    x head dim x dtype bytes x tokens, from the text model's config (head dim as the attention
    layer computes it: ``head_dim`` if the config has one, else hidden size / attention heads)."""
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads
    )
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = text_config.num_hidden_layers * 2 * text_config.num_key_value_heads * head_dim
    return per_token * itemsize * tokens


def kv_cache_bytes_per_token(geometry: dict, dtype: torch.dtype) -> int:
    """Bytes of K and V that one prompt token leaves in the cache (all layers)."""
    return kv_cache_bytes(make_config(geometry).text_config, dtype, 1)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> tuple[float, float] | None:
    """(peak allocated, peak above what was allocated just before the call) MiB during ``fn``;
    CUDA only (None elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak / 2**20, (peak - base) / 2**20


def sm_clock_mhz(device: torch.device) -> int | None:
    """The GPU's SM clock as NVML reads it (None off CUDA or without NVML). Read only."""
    if device.type != "cuda":
        return None
    try:
        return int(torch.cuda.clock_rate(device))
    except Exception:  # no pynvml / NVML on this machine
        return None


def consistency_warnings(rows: Sequence[dict], tolerance: float) -> list[str]:
    """One line per row whose parts (vit + inputs + llm) miss the whole by more than
    ``tolerance`` (a fraction)."""
    return [
        f"WARNING: {r['image_px']} px, keep {r['keep_ratio']}: vit + inputs + llm = "
        f"{r['parts_ms']:.2f} ms but the whole forward took {r['whole_ms']:.2f} ms "
        f"(parts/whole {r['parts_over_whole']:.2f}, off by more than {100 * tolerance:.0f}%): "
        "do not trust this row's split"
        for r in rows
        if abs(r["parts_over_whole"] - 1) > tolerance
    ]


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
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed rounds (every region and ratio) per size"
    )
    p.add_argument("--repeat", type=int, default=10, help="timed interleaved rounds per image size")
    p.add_argument(
        "--parts-tolerance",
        type=float,
        default=PARTS_TOLERANCE,
        help="warn when (vit + inputs + llm) / whole is off 1 by more than this (default 0.1)",
    )
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
    if args.repeat < 1 or args.warmup < 0:
        p.error("need --repeat >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/hf_prefill.py", *argv])
    with torch_threads(args.threads):
        return run(args)


#: The CSV's columns, in order (``<region>_ms`` is the median over the rounds).
COLUMNS = (
    "geometry",
    "device",
    "dtype",
    "strategy",
    "select_backend",
    "image_px",
    "visual_tokens",
    "keep_ratio",
    "kept_tokens",
    "prompt_len_full",
    "prompt_len_kept",
    *(f"{name}_{stat}" for name in REGIONS for stat in ("ms", "min_ms", "max_ms", "iqr_pct")),
    "parts_ms",
    "parts_over_whole",
    "parts_over_whole_min",
    "parts_over_whole_max",
    "speedup",
    "speedup_min",
    "speedup_max",
    "speedup_limit",
    "paper_speedup",
    "kv_cache_bytes",
    "kv_cache_mib",
    "kv_saved_pct",
    "llm_act_mib",
    "llm_act_saved_pct",
    "vit_act_mib",
    "peak_mem_mib",
    "sm_clock_mhz_min",
    "sm_clock_mhz_max",
    "timer",
    "warmup",
    "repeat",
    "torch",
    "command",
)


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

    t0 = time.perf_counter()
    model = build_model(geometry, device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    hidden = geometry["text"]["hidden_size"]
    torch.manual_seed(args.seed + 1)
    scorer = VisionSelectorScorer(hidden).to(device)
    strategy = build_strategy("learned", scorer)
    fixed = {
        "geometry": args.geometry,
        "device": device_label(device),
        "dtype": str(dtype).removeprefix("torch."),
        "strategy": "learned",
        "select_backend": resolve_backend(device),
        "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
        "warmup": args.warmup,
        "repeat": args.repeat,
        "torch": torch.__version__,
        "command": args.command,
    }
    print(f"command: {args.command}")
    print(
        f"device: {fixed['device']}  geometry: {args.geometry} ({n_params / 1e6:,.1f}M "
        f"parameters, {dtype}, SDPA)  built in {time.perf_counter() - t0:.1f} s"
    )
    print(
        f"selection: learned strategy, random scorer, select kernel backend: "
        f"{fixed['select_backend']}"
    )
    print(
        f"timer: {'CUDA events after a synchronize' if device.type == 'cuda' else 'perf_counter'}"
        f" around each call; median of {args.repeat} interleaved rounds after {args.warmup} "
        "warm-up rounds (each round: every region of every ratio); [min-max] over the rounds"
    )
    print(
        f"{'px':>5} {'N':>5} {'ratio':>5} {'L kept':>6} {'whole ms':>9} {'IQR%':>5} {'vit':>8} "
        f"{'select':>7} {'inputs':>7} {'llm':>8} {'parts/whole':>11} {'speedup [min-max]':>18} "
        f"{'limit':>6} {'KV MiB':>8} {'LLM act MiB':>11}"
    )

    rows: list[dict] = []
    with torch.inference_mode():
        for px in args.sizes:
            for row in _one_size(args, model, geometry, strategy, px, device, dtype):
                row.update(fixed)
                rows.append({col: row[col] for col in COLUMNS})
                _print_row(rows[-1])
    for line in consistency_warnings(rows, args.parts_tolerance):
        print(line)

    _summary(rows)
    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "hf_prefill" if args.geometry == "7b" else "hf_prefill_tiny"
    csv_path = out_dir / f"{stem}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    _plot(rows, out_dir / f"{stem}.png")
    return 0


def _regions(model, strategy, ratio, input_ids, media, x, kept) -> list[Region]:
    """The timed regions of one keep ratio, in :data:`REGIONS` order."""
    counts = kept.images.num_tokens

    def whole():
        sel = select_inputs(model, input_ids, media, strategy, ratio)
        return language_model_logits(model, sel.inputs_embeds, sel.position_ids, last_only=True)

    def vit():
        return image_features(model, media)

    def inputs():
        return select_inputs(model, input_ids, media, strategy, ratio, image_embeds=x)

    def llm():
        return language_model_logits(model, kept.inputs_embeds, kept.position_ids, last_only=True)

    def select():
        return select_visual_tokens(x, PackedImages.from_ratio(counts, ratio, x.device), strategy)

    regions = {"whole": whole, "vit": vit, "inputs": inputs, "llm": llm, "select": select}
    return [(name, regions[name]) for name in REGIONS]


def _one_size(args, model, geometry, strategy, px, device, dtype) -> list[dict]:
    """Time every region of every keep ratio at one image size (interleaved rounds), then
    measure the memory; one row per ratio (the columns that do not depend on the size aside)."""
    input_ids, pixel_values, grid = make_prompt(geometry, px, device, dtype, args.seed)
    media = {"pixel_values": pixel_values, "image_grid_thw": grid}
    n_visual = image_token_counts(model, media)[0]
    x = image_features(model, media)
    kept = [
        select_inputs(model, input_ids, media, strategy, r, image_embeds=x) for r in args.ratios
    ]
    groups = [
        dict(_regions(model, strategy, r, input_ids, media, x, k))
        for r, k in zip(args.ratios, kept, strict=True)
    ]
    clocks: list[int | None] = []
    samples = interleaved_samples(
        [list(g.items()) for g in groups],
        device,
        args.warmup,
        args.repeat,
        before_round=lambda _round: clocks.append(sm_clock_mhz(device)),
    )
    clocks.append(sm_clock_mhz(device))
    read = [c for c in clocks if c is not None]

    # Memory, after the timing: one call each (the same every time).
    vit_mem = peak_memory_mib(groups[0]["vit"], device)
    llm_mem = [peak_memory_mib(g["llm"], device) for g in groups]
    whole_mem = [peak_memory_mib(g["whole"], device) for g in groups]
    kv = [kv_cache_bytes(model.config.text_config, dtype, k.seq_len) for k in kept]

    full = args.ratios.index(1.0)
    stats = [{name: spread(s[name]) for name in REGIONS} for s in samples]
    rows = []
    for g, r in enumerate(args.ratios):
        s, st = samples[g], stats[g]
        parts = [sum(t) for t in zip(*(s[name] for name in PARTS), strict=True)]
        over = spread([p / w for p, w in zip(parts, s["whole"], strict=True)])
        per_round = [f / w for f, w in zip(samples[full]["whole"], s["whole"], strict=True)]
        med = {name: st[name]["median"] for name in REGIONS}
        llm_full = stats[full]["llm"]["median"]
        row = {
            "image_px": px,
            "visual_tokens": n_visual,
            "keep_ratio": r,
            "kept_tokens": kept[g].images.total_kept,
            "prompt_len_full": int(input_ids.shape[1]),
            "prompt_len_kept": kept[g].seq_len,
        }
        for name in REGIONS:
            row[f"{name}_ms"] = round(st[name]["median"], 3)
            row[f"{name}_min_ms"] = round(st[name]["min"], 3)
            row[f"{name}_max_ms"] = round(st[name]["max"], 3)
            row[f"{name}_iqr_pct"] = round(st[name]["iqr_pct"], 1)
        llm_act = round(llm_mem[g][1], 1) if llm_mem[g] else ""
        llm_act_full = round(llm_mem[full][1], 1) if llm_mem[full] else ""
        row.update(
            parts_ms=round(statistics.median(parts), 3),
            parts_over_whole=round(statistics.median(parts) / med["whole"], 3),
            parts_over_whole_min=round(over["min"], 3),
            parts_over_whole_max=round(over["max"], 3),
            speedup=round(stats[full]["whole"]["median"] / med["whole"], 3),
            speedup_min=round(min(per_round), 3),
            speedup_max=round(max(per_round), 3),
            speedup_limit=round(
                (med["vit"] + llm_full) / (med["vit"] + med["select"] + med["llm"]), 3
            ),
            paper_speedup=PAPER_SPEEDUP if r == PAPER_RATIO else "",
            kv_cache_bytes=kv[g],
            kv_cache_mib=float(f"{kv[g] / 2**20:.4g}"),
            kv_saved_pct=round(100 * (1 - kv[g] / kv[full]), 1),
            llm_act_mib=llm_act,
            llm_act_saved_pct=(
                round(100 * (1 - llm_act / llm_act_full), 1) if llm_act_full else ""
            ),
            vit_act_mib=round(vit_mem[1], 1) if vit_mem else "",
            peak_mem_mib=round(whole_mem[g][0], 1) if whole_mem[g] else "",
            sm_clock_mhz_min=min(read) if read else "",
            sm_clock_mhz_max=max(read) if read else "",
        )
        rows.append(row)
    return rows


def _print_row(row: dict) -> None:
    act = "n/a" if row["llm_act_mib"] == "" else f"{row['llm_act_mib']:.1f}"
    spd = f"{row['speedup']:.2f} [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]"
    print(
        f"{row['image_px']:>5} {row['visual_tokens']:>5} {row['keep_ratio']:>5} "
        f"{row['prompt_len_kept']:>6} {row['whole_ms']:>9.2f} {row['whole_iqr_pct']:>5.1f} "
        f"{row['vit_ms']:>8.2f} {row['select_ms']:>7.3f} {row['inputs_ms']:>7.2f} "
        f"{row['llm_ms']:>8.2f} {row['parts_over_whole']:>11.2f} {spd:>18} "
        f"{row['speedup_limit']:>6.2f} {row['kv_cache_mib']:>8.4g} {act:>11}"
    )


def _summary(rows: list[dict]) -> None:
    at = [r for r in rows if r["keep_ratio"] == PAPER_RATIO]
    if not at:
        return
    print(
        f"\nkeep {PAPER_RATIO} vs 1.0 (paper: {PAPER_SPEEDUP}x prefill, "
        f"{PAPER_MEMORY_REDUCTION}% memory reduction by its own definition)"
    )
    print(
        f"{'px':>5} {'N':>5} {'speedup [min-max]':>19} {'limit':>6} {'paper':>6} "
        f"{'parts/whole':>11} {'KV cache MiB (saved)':>26} {'LLM activations MiB (saved)':>28}"
    )
    for r in at:
        full = next(f for f in rows if f["image_px"] == r["image_px"] and f["keep_ratio"] == 1.0)
        kv = f"{full['kv_cache_mib']:g} -> {r['kv_cache_mib']:g} (-{r['kv_saved_pct']:.1f}%)"
        act = "n/a (CUDA only)"
        if r["llm_act_mib"] != "":
            act = f"{full['llm_act_mib']:g} -> {r['llm_act_mib']:g} (-{r['llm_act_saved_pct']}%)"
        spd = f"{r['speedup']:.2f}x [{r['speedup_min']:.2f}-{r['speedup_max']:.2f}]"
        print(
            f"{r['image_px']:>5} {r['visual_tokens']:>5} {spd:>19} {r['speedup_limit']:>5.2f}x "
            f"{PAPER_SPEEDUP:>5.2f}x {r['parts_over_whole']:>11.2f} {kv:>26} {act:>28}"
        )


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    has_act = any(r["llm_act_mib"] != "" for r in rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for px in sorted({r["image_px"] for r in rows}):
        pts = sorted((r for r in rows if r["image_px"] == px), key=lambda r: r["keep_ratio"])
        ratios = [r["keep_ratio"] for r in pts]
        name = f"{px}² ({pts[0]['visual_tokens']} tok)"
        (line,) = axes[0].plot(ratios, [r["whole_ms"] for r in pts], marker="o", label=name)
        color = line.get_color()
        axes[0].fill_between(
            ratios,
            [r["whole_min_ms"] for r in pts],
            [r["whole_max_ms"] for r in pts],
            color=color,
            alpha=0.2,
        )
        axes[0].plot(ratios, [r["parts_ms"] for r in pts], linestyle="--", color=color)
        axes[0].plot(ratios, [r["vit_ms"] for r in pts], linestyle=":", color=color)
        axes[1].plot(ratios, [r["speedup"] for r in pts], marker="o", color=color, label=name)
        axes[1].fill_between(
            ratios,
            [r["speedup_min"] for r in pts],
            [r["speedup_max"] for r in pts],
            color=color,
            alpha=0.2,
        )
        axes[1].plot(ratios, [r["speedup_limit"] for r in pts], linestyle="--", color=color)
        axes[2].plot(
            ratios, [r["kv_cache_mib"] for r in pts], marker="o", color=color, label=f"{name} KV"
        )
        if has_act:
            axes[2].plot(
                ratios,
                [r["llm_act_mib"] for r in pts],
                marker="s",
                linestyle="--",
                color=color,
                label=f"{name} LLM act.",
            )
    axes[0].set(
        xlabel="keep ratio",
        ylabel="ms",
        title="whole forward: median, [min, max] (band);\n"
        "parts sum (dashed), vision tower (dotted)",
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
    axes[1].set(
        xlabel="keep ratio",
        ylabel="speedup vs keep 1.0",
        title="speedup: median ratio, per-round [min, max];\nlimit from the parts (dashed)",
    )
    axes[2].set(
        xlabel="keep ratio",
        ylabel="MiB",
        title="KV cache of the prompt (computed)"
        + (",\nLLM prefill peak activations (measured, dashed)" if has_act else ""),
    )
    for ax in axes:
        ax.invert_xaxis()
        ax.legend(fontsize=6)
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
