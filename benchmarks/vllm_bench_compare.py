"""vLLM's own load generator against a selection server and a plain one: ``vllm bench serve``
(through ``vs-vllm bench``, which runs on both vLLM builds) with the ``random-mm`` dataset.

For each setting (no selection; ``--vision-keep-ratio`` R with a training-free strategy) it
starts ``vs-vllm serve`` on the same model, runs::

    vs-vllm bench serve --backend openai-chat --endpoint /v1/chat/completions \\
        --dataset-name random-mm --random-mm-base-items-per-request 1 \\
        --random-mm-limit-mm-per-prompt '{"image": 1, "video": 0}' \\
        --random-mm-bucket-config '{(448, 448, 1): 1.0}' --random-input-len 64 \\
        --random-output-len 16 --num-prompts N --max-concurrency C --save-result ...

and collects what vLLM's benchmark reports (request throughput, mean / median / p99 TTFT,
TPOT, ITL, end-to-end latency, input tokens) into one CSV row per setting, then prints the
table and draws a bar plot (matplotlib, when installed).

    python benchmarks/vllm_bench_compare.py                      # small random model (60M)
    python benchmarks/vllm_bench_compare.py --model DIR --strategy learned --vision-selector S

Writes ``<out>/<device>/vllm_bench_random_mm.csv`` and ``.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from benchmarks.device_name import device_label, device_slug

METRICS = (
    "completed",
    "total_input_tokens",
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "mean_itl_ms",
    "mean_e2el_ms",
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the small random one)")
    p.add_argument("--keep-ratio", type=float, default=0.1)
    p.add_argument("--strategy", default="norm", help="selection strategy (default: norm)")
    p.add_argument("--vision-selector", default=None, help="scorer for --strategy learned")
    p.add_argument("--image-size", type=int, default=448, help="square images (448: 256 tokens)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG")
    args = p.parse_args(argv)

    from vs_vllm.local_server import TINY_MODEL_SERVE_ARGS, bench_serve_command, served

    command = shlex.join(["python", "benchmarks/vllm_bench_compare.py", *argv])
    work = Path(tempfile.mkdtemp(prefix="vs-vllm-bench-"))
    serve_args = list(args.serve_arg)
    if args.model is None:
        from benchmarks.prefill_latency import PRESETS
        from tiny_models.tiny_qwen import build_tiny_qwen25_vl

        print("building the small random-weight model (60M parameters) ...", flush=True)
        model, model_name = str(build_tiny_qwen25_vl(work / "small", PRESETS["small"])), "small"
        serve_args = [*TINY_MODEL_SERVE_ARGS, *serve_args]
    else:
        model = model_name = args.model
    selection = ["--vision-keep-ratio", str(args.keep_ratio)]
    selection += ["--vision-selector-strategy", args.strategy]
    if args.vision_selector:
        selection += ["--vision-selector", args.vision_selector]
    settings = {
        "no selection": [],
        f"keep {args.keep_ratio:g} ({args.strategy})": selection,
    }
    rows = []
    for label, extra in settings.items():
        log = work / f"server-{len(rows)}.log"
        print(f"\n== {label}: vs-vllm serve {' '.join([*serve_args, *extra])}", flush=True)
        started = time.perf_counter()
        with served(
            model, *serve_args, "--max-num-seqs", str(args.concurrency), *extra, log=log
        ) as url:
            print(f"server up after {time.perf_counter() - started:.0f} s", flush=True)
            result = work / f"result-{len(rows)}.json"
            bench = bench_serve_command(
                model,
                url,
                result,
                image_size=args.image_size,
                input_len=args.input_len,
                output_len=args.output_len,
                num_prompts=args.num_prompts,
                concurrency=args.concurrency,
            )
            print("$ " + shlex.join(bench), flush=True)
            subprocess.run(bench, check=True)
        data = json.loads(result.read_text())
        row = {"setting": label, **{m: data.get(m) for m in METRICS}}
        if row["completed"] != args.num_prompts:
            raise RuntimeError(f"{label}: {row['completed']} of {args.num_prompts} completed")
        rows.append(row)

    device = torch.device("cpu")
    facts = {
        "command": command,
        "model": model_name,
        "image_size": args.image_size,
        "num_prompts": args.num_prompts,
        "concurrency": args.concurrency,
        "device": device_label(device),
    }
    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "vllm_bench_random_mm.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *facts])
        writer.writeheader()
        writer.writerows({**r, **facts} for r in rows)
    print(f"\ncommand: {command}")
    print(
        f"{'setting':<22} {'input tok':>10} {'req/s':>7} {'TTFT mean':>10} {'TTFT p99':>9} "
        f"{'TPOT':>7} {'E2E mean':>9}  (ms)"
    )
    for r in rows:
        print(
            f"{r['setting']:<22} {r['total_input_tokens']:>10} {r['request_throughput']:>7.2f} "
            f"{r['mean_ttft_ms']:>10.0f} {r['p99_ttft_ms']:>9.0f} {r['mean_tpot_ms']:>7.1f} "
            f"{r['mean_e2el_ms']:>9.0f}"
        )
    if _plot(rows, csv_path.with_suffix(".png"), command):
        print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}")
    else:
        print(f"wrote {csv_path} (matplotlib not installed: no plot)")
    return 0


def _plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("mean_ttft_ms", "mean TTFT (ms)"), ("mean_e2el_ms", "mean E2E latency (ms)")]
    keys += [("request_throughput", "requests / s"), ("total_input_tokens", "input tokens")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for ax, (key, label) in zip(axes, keys, strict=True):
        ax.bar([r["setting"] for r in rows], [r[key] for r in rows], color=["grey", "tab:blue"])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
