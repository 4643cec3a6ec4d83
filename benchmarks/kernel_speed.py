"""Fused score + select + gather kernel vs the torch eager chain.

The eager chain is what a plain implementation does per image: a matvec for the scores,
``torch.topk``, ``torch.sort`` of the kept indices, ``index_select`` of the rows. The fused
kernel does all of it for the whole batch in one launch. Both are timed with CUDA events
(median of ``--repeat`` runs after warm-up); the table also shows the effective bandwidth
(bytes of X read once + kept rows written, over time) against which the floor of any
selection step is the memory read of N x D values.

    python benchmarks/kernel_speed.py                       # on a GPU: the default sweep
    python benchmarks/kernel_speed.py --tokens 64,1024 --hidden 64 --repeat 3   # quick look

Writes ``benchmarks/results/<device>/kernel_speed.csv`` and ``kernel_speed.png``. On a machine
without CUDA only the torch paths run (the Triton kernel would be interpreted, which says
nothing about its speed); pass ``--allow-cpu`` to run them anyway.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.device_name import device_label, device_slug
from vs_vllm.batch import PackedImages
from vs_vllm.kernels.score_select_reference import score_select_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_chain(x, images: PackedImages, w, c):
    rows, idx = [], []
    start = 0
    for b, (n, k) in enumerate(zip(images.num_tokens, images.num_kept, strict=True)):
        seg = x[start : start + n]
        s = seg.float() @ w[b] + c[b]
        kept = torch.sort(torch.topk(s, k).indices).values
        rows.append(seg.index_select(0, kept))
        idx.append(kept)
        start += n
    return torch.cat(rows), torch.cat(idx)


def time_fn(fn: Callable[[], object], device: torch.device, repeat: int) -> list[float]:
    for _ in range(3):
        fn()
    out = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="256,1024,4096,16384", help="tokens per image")
    p.add_argument("--images", default="1,8", help="images per batch")
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--keep-ratio", type=float, default=0.2)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--allow-cpu", action="store_true")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.allow_cpu:
        print(
            "no CUDA device: pass --allow-cpu to time the torch paths on the CPU", file=sys.stderr
        )
        return 2
    impls = ["eager_chain", "reference"]
    if device.type == "cuda":
        from vs_vllm.kernels.score_select_triton import score_select_triton

        impls.insert(0, "fused_triton")
    dtype = DTYPES[args.dtype]
    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    configs = [(int(n), int(b)) for b in args.images.split(",") for n in args.tokens.split(",")]
    print(f"device: {device_label(device)}  dtype: {args.dtype}  hidden: {args.hidden}")
    print(f"{'images':>6} {'N/img':>6} {'impl':>13} {'median us':>10} {'GB/s':>8}")
    for n, b in configs:
        images = PackedImages.from_ratio([n] * b, args.keep_ratio, device)
        x = torch.randn(images.total_tokens, args.hidden, device=device).to(dtype)
        w = torch.randn(b, args.hidden, device=device)
        c = torch.randn(b, device=device)
        nbytes = (images.total_tokens + images.total_kept) * args.hidden * x.element_size()
        packed = (x, images.cu_seqlens, images.keep_counts, images.total_kept, w, c)
        fns = {
            "eager_chain": partial(eager_chain, x, images, w, c),
            "reference": partial(score_select_reference, *packed),
        }
        if "fused_triton" in impls:
            fns["fused_triton"] = partial(score_select_triton, *packed)
        for impl in impls:
            times = time_fn(fns[impl], device, args.repeat)
            med = statistics.median(times)
            row = {
                "device": device_label(device),
                "dtype": args.dtype,
                "hidden": args.hidden,
                "images": b,
                "tokens_per_image": n,
                "keep_ratio": args.keep_ratio,
                "impl": impl,
                "median_us": round(med, 2),
                "min_us": round(min(times), 2),
                "gbps": round(nbytes / (med * 1e-6) / 1e9, 2),
                "repeat": args.repeat,
                "torch": torch.__version__,
            }
            rows.append(row)
            print(f"{b:>6} {n:>6} {impl:>13} {med:>10.1f} {row['gbps']:>8.1f}")
    csv_path = out_dir / "kernel_speed.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    _plot(rows, out_dir / "kernel_speed.png")
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    batches = sorted({r["images"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [
                (r["tokens_per_image"], r["median_us"])
                for r in rows
                if r["images"] == b and r["impl"] == impl
            ]
            ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="tokens per image",
            ylabel="median us",
            title=f"{b} image(s), {rows[0]['device']}",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
