"""The score + top-k + gather kernel against its peers, against the bandwidth floor.

Implementations (each returns the kept rows and their per-image indices, ascending):

* ``fused_triton``: :func:`vs_vllm.kernels.score_select_triton.score_select_triton`, three
  launches for the whole batch (scores over the packed rows, a per-image radix select, a
  gather over the kept rows), as called from Python.
* ``fused_graph``: the same three launches captured once in a CUDA graph for the point's fixed
  layout and replayed (what the kernel costs without Python's launch overhead; CUDA only).
* ``eager``: the torch chain a plain implementation runs per image: matvec
  (``x.float() @ w_b + c_b``, the reference's float32 numerics), ``torch.topk``, ``torch.sort``
  of the kept indices, ``index_select`` of the rows.
* ``compiled``: the same per-image chain through ``torch.compile(dynamic=True)`` (the cast is
  fused into the matvec; ``topk`` / ``sort`` stay library calls), still one call per image.
* ``torch_batched``: images of equal N only: one batched matvec for all images (``bmm`` in the
  input dtype with a float32 output where torch supports ``out_dtype`` on the device, else
  ``x.float()``), one ``torch.topk`` over (B, N), ``sort``, one ``index_select``.
* ``flashinfer``: ``torch_batched`` with FlashInfer's radix ``top_k`` instead of
  ``torch.topk``; only when ``flashinfer`` is importable (CUDA), otherwise skipped with a note.

Before any timing, every implementation is checked against the PyTorch reference
(``score_select_reference``) on data whose scores are exact in float32 and distinct within each
image (two columns of X carry a per-image permutation, ``w = (256, 1, 0, ...)``), so the kept
indices and rows must be *equal*; a failing implementation is reported and not timed. On the
random timing data (where different summation orders may swap near-threshold tokens) the share
of kept tokens that agree with the reference is reported as ``overlap``.

Timing: on CUDA ``triton.testing.do_bench`` (L2 flushed before each run; median, 20th and 80th
percentile). Bandwidth counts the bytes of X read once plus the kept rows written,
``(sum N_i + sum k_i) * D * itemsize``, over the median time, and its share of the device's peak
memory bandwidth (:data:`PEAK_GBPS` by device name, ``--peak-gbps`` to override; blank when
unknown).

The floor: the same run first measures the device-to-device copy rate (``dst.copy_(src)`` of
``--copy-mib`` MiB, counting read + write, timed like the kernels). ``floor_us`` is the time
the bytes above take at that rate, and ``x_floor`` = median / floor. The targets of issue 16
(H100/H200, bf16, D=3584, keep 0.2) are columns of every fused row: ``target`` (at most 25 us
for one image of 1024 tokens; at most 2.5x the floor for batches of 8192 to 32767 tokens and
1.5x from 32768), ``meets_target``, and ``faster_than_peers`` (no slower than ``torch_batched``
and ``eager`` at that point). A summary table of the fused rows ends the printout.

On a machine without CUDA, ``--allow-cpu`` times the torch paths with
``time.perf_counter`` only; the Triton kernel is not timed there (it would run in the Triton
interpreter, which says nothing about its speed), but it is still checked for correctness when
``TRITON_INTERPRET=1`` is set.

    python benchmarks/kernel_select.py                       # on a GPU: the full sweep
    python benchmarks/kernel_select.py --tokens 1024,16384 --hidden 3584 --images 1,32
    python benchmarks/kernel_select.py --allow-cpu --tokens 64,100 --hidden 40 --images 1,3

Writes ``benchmarks/results/<device>/kernel_select.csv`` and ``kernel_select.png``
(``--out`` changes the results folder).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.device_name import device_label, device_slug
from benchmarks.torch_threads import torch_threads
from vs_vllm.batch import PackedImages
from vs_vllm.kernels.score_select_reference import score_select_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("fused_triton", "fused_graph", "eager", "compiled", "torch_batched", "flashinfer")
FUSED = ("fused_triton", "fused_graph")
PEERS = ("torch_batched", "eager")

#: Peak memory bandwidth in GB/s by device name: (substrings that must all appear, GB/s).
#: First match wins; an unknown device gets no peak (``--peak-gbps`` sets one).
PEAK_GBPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 4800.0),
    (("H100", "PCIE"), 2000.0),
    (("H100", "HBM3"), 3350.0),  # H100 SXM5 reports as "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 3350.0),
    (("A100", "80GB"), 2000.0),
)

Impl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def peak_gbps(name: str) -> float | None:
    """Known peak memory bandwidth (GB/s) of a device by its name, or ``None``."""
    upper = name.upper()
    for needles, gbps in PEAK_GBPS:
        if all(n in upper for n in needles):
            return gbps
    return None


# -- implementations ---------------------------------------------------------------------------


def _one_image(seg: torch.Tensor, w: torch.Tensor, c: torch.Tensor, k: int):
    s = seg.float() @ w + c
    kept = torch.sort(torch.topk(s, k).indices).values
    return seg.index_select(0, kept), kept


def per_image_chain(one: Callable, images: PackedImages, x, w, c):
    """The chain image by image (``one`` = eager or compiled), outputs concatenated."""
    rows, idx = [], []
    start = 0
    for b, (n, k) in enumerate(zip(images.num_tokens, images.num_kept, strict=True)):
        r, i = one(x[start : start + n], w[b], c[b], k)
        rows.append(r)
        idx.append(i)
        start += n
    return torch.cat(rows), torch.cat(idx)


def _mm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return False
    try:
        a = torch.ones(1, 2, 2, dtype=dtype, device=device)
        torch.bmm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def batched_chain(topk: Callable, images: PackedImages, out_dtype: bool, x, w, c):
    """All images at once (equal N and k): bmm scores, one top-k over (B, N), sort, gather."""
    b, n, k = images.num_images, images.num_tokens[0], images.num_kept[0]
    x3 = x.view(b, n, x.shape[1])
    if out_dtype:
        s = torch.bmm(x3, w.to(x.dtype).unsqueeze(-1), out_dtype=torch.float32)
    else:
        s = torch.bmm(x3.float(), w.unsqueeze(-1))
    s = s.squeeze(-1) + c.unsqueeze(-1)
    kept = torch.sort(topk(s, k), dim=1).values
    flat = (kept + torch.arange(b, device=x.device).unsqueeze(-1) * n).flatten()
    return x.index_select(0, flat), kept.flatten()


def _torch_topk(s: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(s, k, dim=1).indices


def _flashinfer_topk(s: torch.Tensor, k: int) -> torch.Tensor:
    import flashinfer

    return flashinfer.top_k(s, k)[1]


def _fused(images: PackedImages, x, w, c):
    from vs_vllm.kernels.score_select_triton import score_select_triton

    out = score_select_triton(x, images.cu_seqlens, images.keep_counts, images.total_kept, w, c)
    return out.rows, out.indices


class GraphedFused:
    """``fused_triton`` captured in a CUDA graph, once per (x, w, c) buffers, then replayed.

    The graph reads the buffers it was captured with, so the exact check (which rewrites two
    columns of ``x`` in place and uses its own ``w`` / ``c``) gets its own graph."""

    def __init__(self, images: PackedImages) -> None:
        self.images = images
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}

    def _run(self, x, w, c, out) -> None:
        from vs_vllm.kernels.score_select_triton import score_select_triton

        im = self.images
        score_select_triton(x, im.cu_seqlens, im.keep_counts, im.total_kept, w, c, out=out)

    def __call__(self, x, w, c):
        from vs_vllm.kernels.select_io import allocate_outputs

        key = (x.data_ptr(), w.data_ptr(), c.data_ptr())
        if key not in self.graphs:
            out = allocate_outputs(x, self.images.total_kept)
            self._run(x, w, c, out)  # compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._run(x, w, c, out)
            self.graphs[key] = (graph, out)
        graph, out = self.graphs[key]
        graph.replay()
        return out[0], out[1]


def availability(device: torch.device) -> dict[str, str | None]:
    """Per implementation: ``None`` when it can be timed here, else why not."""
    notes: dict[str, str | None] = dict.fromkeys(IMPLS)
    if device.type != "cuda":
        notes["fused_triton"] = (
            "not timed on the CPU: the Triton kernel would run in the interpreter"
        )
        notes["fused_graph"] = "not timed on the CPU: CUDA graphs need CUDA"
        notes["flashinfer"] = "skipped: FlashInfer runs on CUDA only"
    else:
        try:
            import flashinfer  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install raising anything
            notes["flashinfer"] = f"skipped: flashinfer not importable ({type(exc).__name__})"
    return notes


# -- checks ------------------------------------------------------------------------------------


def exact_case(x: torch.Tensor, images: PackedImages, seed: int):
    """Write per-image distinct, float32-exact scores into columns 0-1 of ``x`` (in place).

    Returns (w, c, saved columns). Score of token i in an image = its value in a random
    permutation of 0..N-1, encoded as ``256 * hi + lo`` (both < 256, exact in bf16)."""
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=gen) for n in images.num_tokens]
    perm = torch.cat(perms).to(x.device)
    saved = x[:, :2].clone()
    x[:, 0] = (perm // 256).to(x.dtype)
    x[:, 1] = (perm % 256).to(x.dtype)
    w = torch.zeros(images.num_images, x.shape[1], device=x.device)
    w[:, 0], w[:, 1] = 256.0, 1.0
    c = torch.zeros(images.num_images, device=x.device)
    return w, c, saved


def check_exact(impl: Impl, x, w, c, images: PackedImages) -> str | None:
    """``None`` when ``impl`` keeps exactly the reference's indices and rows, else why not."""
    ref = score_select_reference(x, images.cu_seqlens, images.keep_counts, images.total_kept, w, c)
    try:
        rows, idx = impl(x, w, c)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if idx.shape != ref.indices.shape or not torch.equal(idx.cpu(), ref.indices.cpu()):
        return "kept indices differ from the reference"
    if not torch.equal(rows.cpu(), ref.rows.cpu()):
        return "kept rows differ from the reference"
    return None


def kept_mask(idx: torch.Tensor, images: PackedImages) -> torch.Tensor:
    offsets = images.cu_seqlens[:-1].index_select(0, images.kept_segment_ids)
    mask = torch.zeros(images.total_tokens, dtype=torch.bool, device=idx.device)
    mask[idx + offsets] = True
    return mask


# -- timing ------------------------------------------------------------------------------------


def time_us(fn: Callable[[], object], device: torch.device, args) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) microseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(
            fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8]
        )
        return med * 1e3, p20 * 1e3, p80 * 1e3
    for _ in range(2):
        fn()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), q[0], q[3]


def copy_gbps(device: torch.device, mib: int, args) -> float:
    """Device-to-device copy rate in GB/s, counting the bytes read and the bytes written."""
    n = mib * 2**20 // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    med, _, _ = time_us(lambda: dst.copy_(src), device, args)
    return 2 * n * src.element_size() / (med * 1e-6) / 1e9


def target_of(images: int, tokens_per_image: int) -> tuple[str, float] | None:
    """The issue-16 target of a point: ("us", 25) for one image of 1024 tokens, ("x_floor",
    2.5) for 8192 to 32767 tokens in the batch, ("x_floor", 1.5) from 32768; else None."""
    total = images * tokens_per_image
    if images == 1 and tokens_per_image == 1024:
        return ("us", 25.0)
    if total >= 32768:
        return ("x_floor", 1.5)
    if total >= 8192:
        return ("x_floor", 2.5)
    return None


def judge(point: list[dict]) -> None:
    """Fill ``target`` / ``meets_target`` / ``faster_than_peers`` of the fused rows in place."""
    peers = [r["median_us"] for r in point if r["impl"] in PEERS]
    for r in point:
        if r["impl"] not in FUSED:
            continue
        if peers:
            r["faster_than_peers"] = "yes" if r["median_us"] <= min(peers) else "no"
        target = target_of(r["images"], r["tokens_per_image"])
        if target is None:
            continue
        kind, limit = target
        if kind == "us":
            r["target"] = f"<={limit:g}us"
            r["meets_target"] = "yes" if r["median_us"] <= limit else "no"
        else:
            r["target"] = f"<={limit:g}x floor"
            r["meets_target"] = "yes" if r["x_floor"] <= limit else "no"


# -- main --------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tokens",
        default="256,512,1024,1296,2048,4096,8192,16384",
        help="visual tokens per image (comma list)",
    )
    p.add_argument("--hidden", default="2048,3584", help="hidden sizes D (comma list)")
    p.add_argument("--images", default="1,8,32", help="images per batch (comma list)")
    p.add_argument("--keep-ratio", type=float, default=0.2)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time (CUDA)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per point on the CPU")
    p.add_argument(
        "--copy-mib",
        type=int,
        default=None,
        help="size of the copy that measures the bandwidth floor (default 1024 on CUDA, 64 else)",
    )
    p.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="peak memory bandwidth of the device in GB/s (default: by name)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--allow-cpu", action="store_true", help="time the torch paths on the CPU")
    args = p.parse_args(argv)
    args.impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        p.error(f"unknown --impls {unknown}; choose from {list(IMPLS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.allow_cpu:
        print(
            "no CUDA device: pass --allow-cpu to time the torch paths on the CPU", file=sys.stderr
        )
        return 2
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 would time the Triton interpreter: unset it", file=sys.stderr)
        return 2
    label = device_label(device)
    peak = args.peak_gbps if args.peak_gbps is not None else peak_gbps(label)
    dtype = DTYPES[args.dtype]
    notes = availability(device)
    interpret_check = device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1"
    out_dtype = _mm_out_dtype_works(device, dtype)
    compiled_one = None
    if "compiled" in args.impls:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compiled_one = torch.compile(_one_image, dynamic=True)

    print(f"device: {label}  dtype: {args.dtype}  keep ratio: {args.keep_ratio}")
    print(f"peak memory bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown (--peak-gbps)'}")
    print(f"timer: {'triton.testing.do_bench' if device.type == 'cuda' else 'time.perf_counter'}")
    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 64)
    copy_rate = copy_gbps(device, copy_mib, args)
    print(f"copy rate (floor): {copy_rate:.0f} GB/s, read + write, {copy_mib} MiB copy")
    for impl in args.impls:
        if notes[impl]:
            extra = (
                " (checked for correctness in the interpreter)"
                if (impl == "fused_triton" and interpret_check)
                else ""
            )
            print(f"note: {impl}: {notes[impl]}{extra}")
    header = (
        f"{'D':>5} {'imgs':>4} {'N/img':>6} {'impl':>13} {'median us':>10} {'GB/s':>8} "
        f"{'%peak':>6} {'floor us':>9} {'x floor':>8} {'overlap':>7}"
    )
    print(header)

    rows: list[dict] = []
    failures: list[str] = []
    for hidden in _ints(args.hidden):
        for b in _ints(args.images):
            for n in _ints(args.tokens):
                images = PackedImages.from_ratio([n] * b, args.keep_ratio, device)
                gen_seed = args.seed + 1000003 * hidden + 1009 * b + n
                torch.manual_seed(gen_seed)
                x = torch.randn(images.total_tokens, hidden, device=device, dtype=dtype)
                w = torch.randn(b, hidden, device=device) / hidden**0.5
                c = torch.randn(b, device=device)
                impls: dict[str, Impl] = {
                    "fused_triton": partial(_fused, images),
                    "fused_graph": GraphedFused(images),
                    "eager": partial(per_image_chain, _one_image, images),
                    "torch_batched": partial(batched_chain, _torch_topk, images, out_dtype),
                    "flashinfer": partial(batched_chain, _flashinfer_topk, images, out_dtype),
                }
                if compiled_one is not None:
                    impls["compiled"] = partial(per_image_chain, compiled_one, images)
                todo = [i for i in args.impls if notes[i] is None]
                if interpret_check and "fused_triton" in args.impls:
                    todo_check = [*todo, "fused_triton"]
                else:
                    todo_check = list(todo)

                # 1. exact check (distinct float32-exact scores): indices and rows must be equal.
                failed: dict[str, str] = {}
                checked = n <= 65536 and hidden >= 2
                if checked:
                    wx, cx, saved = exact_case(x, images, gen_seed)
                    for impl in todo_check:
                        why = check_exact(impls[impl], x, wx, cx, images)
                        if why:
                            failed[impl] = why
                            failures.append(f"D={hidden} B={b} N={n} {impl}: {why}")
                            print(f"FAILED {failures[-1]}")
                    x[:, :2] = saved
                else:
                    print(f"note: D={hidden} B={b} N={n}: too large for the exact check")

                # 2. timing on random data (+ agreement with the reference there).
                ref = score_select_reference(
                    x, images.cu_seqlens, images.keep_counts, images.total_kept, w, c
                )
                ref_mask = kept_mask(ref.indices, images)
                nbytes = (images.total_tokens + images.total_kept) * hidden * x.element_size()
                floor_us = nbytes / (copy_rate * 1e9) * 1e6
                point: list[dict] = []
                for impl in todo:
                    if impl in failed:
                        continue
                    fn = partial(impls[impl], x, w, c)
                    overlap = (kept_mask(fn()[1], images) & ref_mask).sum() / images.total_kept
                    med, p20, p80 = time_us(fn, device, args)
                    gbps = nbytes / (med * 1e-6) / 1e9
                    point.append(
                        {
                            "device": label,
                            "dtype": args.dtype,
                            "hidden": hidden,
                            "images": b,
                            "tokens_per_image": n,
                            "keep_ratio": args.keep_ratio,
                            "kept_per_image": images.num_kept[0],
                            "impl": impl,
                            "verified": checked,
                            "overlap": round(float(overlap), 5),
                            "median_us": round(med, 2),
                            "p20_us": round(p20, 2),
                            "p80_us": round(p80, 2),
                            "gbps": float(f"{gbps:.4g}"),
                            "peak_gbps": peak if peak else "",
                            "pct_peak": float(f"{100 * gbps / peak:.3g}") if peak else "",
                            "copy_gbps": round(copy_rate, 1),
                            "floor_us": float(f"{floor_us:.4g}"),
                            "x_floor": float(f"{med / floor_us:.4g}"),
                            "target": "",
                            "meets_target": "",
                            "faster_than_peers": "",
                            "fused_speedup": "",
                            "timer": "do_bench" if device.type == "cuda" else "perf_counter",
                            "torch": torch.__version__,
                        }
                    )
                fused = next((r for r in point if r["impl"] == "fused_triton"), None)
                judge(point)
                for r in point:
                    if fused is not None:
                        r["fused_speedup"] = round(r["median_us"] / fused["median_us"], 2)
                    print(
                        f"{hidden:>5} {b:>4} {n:>6} {r['impl']:>13} {r['median_us']:>10.1f} "
                        f"{r['gbps']:>8.1f} {r['pct_peak']!s:>6} {r['floor_us']:>9.1f} "
                        f"{r['x_floor']:>8.2f} {r['overlap']:>7.4f}"
                    )
                rows.extend(point)
                del x, ref, ref_mask, impls  # free the device memory before the next point
                fn = None

    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not rows:
        print("nothing was timed", file=sys.stderr)
        return 1
    csv_path = out_dir / "kernel_select.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    print_targets(rows)
    _plot(rows, peak, out_dir / "kernel_select.png")
    if failures:
        print(f"{len(failures)} correctness failure(s); those implementations were not timed")
        return 1
    return 0


def print_targets(rows: list[dict]) -> None:
    """One line per fused row: time, floor ratio, the target and whether it holds."""
    fused = [r for r in rows if r["impl"] in FUSED]
    if not fused:
        print("targets: no fused row was timed here (they are judged on a GPU)")
        return
    print("targets (issue 16):")
    print(
        f"{'D':>5} {'imgs':>4} {'N/img':>6} {'impl':>12} {'median us':>10} {'x floor':>8} "
        f"{'target':>14} {'meets':>6} {'<= peers':>8}"
    )
    for r in fused:
        print(
            f"{r['hidden']:>5} {r['images']:>4} {r['tokens_per_image']:>6} {r['impl']:>12} "
            f"{r['median_us']:>10.1f} {r['x_floor']:>8.2f} {r['target'] or '-':>14} "
            f"{r['meets_target'] or '-':>6} {r['faster_than_peers'] or '-':>8}"
        )
    missed = [r for r in fused if r["meets_target"] == "no" or r["faster_than_peers"] == "no"]
    print(f"{len(missed)} of {len(fused)} fused rows miss a target")


def _plot(rows: list[dict], peak: float | None, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    hiddens = sorted({r["hidden"] for r in rows})
    batches = sorted({r["images"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(
        2 * len(hiddens),
        len(batches),
        figsize=(4.5 * len(batches), 3.6 * 2 * len(hiddens)),
        squeeze=False,
    )
    for hi, d in enumerate(hiddens):
        for bi, b in enumerate(batches):
            ax_t, ax_b = axes[2 * hi][bi], axes[2 * hi + 1][bi]
            for impl in impls:
                pts = sorted(
                    (r["tokens_per_image"], r["median_us"], r["gbps"])
                    for r in rows
                    if r["hidden"] == d and r["images"] == b and r["impl"] == impl
                )
                if not pts:
                    continue
                ns, us, gb = zip(*pts, strict=True)
                ax_t.plot(ns, us, marker="o", label=impl)
                ax_b.plot(ns, gb, marker="o", label=impl)
            floor = sorted(
                {
                    (r["tokens_per_image"], r["floor_us"])
                    for r in rows
                    if r["hidden"] == d and r["images"] == b
                }
            )
            if floor:
                ns, us = zip(*floor, strict=True)
                ax_t.plot(ns, us, color="k", linestyle=":", label="floor (copy rate)")
            ax_b.axhline(
                rows[0]["copy_gbps"], color="k", linestyle=":", linewidth=1, label="copy rate"
            )
            if peak:
                ax_b.axhline(peak, color="k", linestyle="--", linewidth=1, label="peak")
            ax_t.set(
                xscale="log",
                yscale="log",
                xlabel="tokens per image",
                ylabel="median us",
                title=f"D={d}, {b} image(s)",
            )
            ax_b.set(
                xscale="log",
                xlabel="tokens per image",
                ylabel="GB/s (X read + kept written)",
                title=f"D={d}, {b} image(s)",
            )
            ax_t.legend(fontsize=7)
            ax_b.legend(fontsize=7)
    fig.suptitle(
        f"score + top-k + gather, {rows[0]['dtype']}, keep {rows[0]['keep_ratio']}, "
        f"{rows[0]['device']}"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
