"""Prefill latency: time to first token, prompt tokens and KV usage vs keep ratio on a server.

    python benchmarks/prefill_latency.py                  # tiny local model, the default sweep
    python benchmarks/prefill_latency.py --spec small     # a larger random Qwen2.5-VL (256 tokens)
    python benchmarks/prefill_latency.py --model DIR --serve-arg=--vision-selector=PATH
    python benchmarks/prefill_latency.py --url http://127.0.0.1:8000   # a running server
    python benchmarks/prefill_latency.py --ratios 1.0,0.2 --image-sizes 112 --concurrency 1,2 \
        --requests-per-point 2                            # a quick look
    python benchmarks/prefill_latency.py --video-frames 4,8,16   # videos: frames x ratio

With ``--video-frames`` the sweep sends one video per request instead of an image (an MP4
data URL of ``--video-size`` frames, written locally with OpenCV at 2 fps; vLLM decodes it),
with ``video_keep_ratio`` per request on a server started with ``--video-keep-ratio 1.0``;
rows then carry ``media=video``, ``video_frames`` in ``image_size`` and the video's tokens
in ``image_tokens`` (the plots label them as frames). The default file stem is
``prefill_latency_video``.

Sweeps keep ratio x image size x concurrency on one OpenAI-compatible vLLM server. Unless
``--url`` is given it starts ``vs-vllm serve`` itself with ``--trust-request-mm-kwargs
--vision-keep-ratio 1.0`` (strategy ``norm`` unless told otherwise), so every request carries
its own ratio in ``mm_processor_kwargs`` and one server covers the whole sweep. Without
``--model`` it builds a random-weight Qwen2.5-VL locally (``--spec tiny``: at most 64 visual
tokens per image; ``--spec small``: 256, a model the CPU can still serve).

Each point sends ``--requests-per-point`` streaming chat completions (one image each, every
image unique so neither the processor cache nor the prefix cache can serve it), at most
``concurrency`` in flight, ``--max-tokens`` output tokens each (``ignore_eos``; default 2, so
the prefill dominates and the request still holds its KV blocks for one step after the first
token). The client measures the time to first token (the first chunk with a choice: vLLM sends
it once the first token exists). Each image size is warmed up before its points (one request,
then a burst of the largest concurrency at once). While a point runs, the server's
``/metrics`` are polled for ``vllm:kv_cache_usage_perc`` and ``vllm:num_requests_running``
(the maxima are reported; short requests can slip between two polls, so the analytic KV
blocks, ``ceil((prompt + output - 1) / block_size)`` per request, are reported too), and the
server's own histograms (``vllm:time_to_first_token_seconds``,
``vllm:request_prefill_time_seconds``, ``vllm:request_queue_time_seconds``,
``vllm:request_prefill_kv_computed_tokens``) are read before and after for per-point means.

Writes ``benchmarks/results/<device>/prefill_latency.csv`` (one row per point; replaced by each
run; ``--name`` changes the stem, ``--spec small`` defaults to ``prefill_latency_small``) and
three plots beside it: ``prefill_latency_ttft.png`` (TTFT vs ratio per image size, at
the lowest concurrency), ``prefill_latency_kv.png`` (prompt tokens and peak KV blocks vs ratio)
and ``prefill_latency_throughput.png`` (requests/s vs concurrency per ratio, largest image).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.device_name import device_label, device_slug
from benchmarks.results_name import file_stem
from tiny_models.tiny_qwen import TinyQwenSpec
from vs_vllm.selection import num_kept_tokens, validate_keep_ratio

#: Random-weight models this script can build (``--spec``).
PRESETS: dict[str, TinyQwenSpec] = {
    # text hidden 64, 2 layers; vision depth 2, hidden 32; at most 64 visual tokens per image
    "tiny": TinyQwenSpec(),
    # text hidden 768, 8 layers (12 heads, 2 KV heads, head_dim 64); vision depth 6, hidden 384;
    # at most 256 visual tokens per image (448 x 448); about 60 M parameters
    "small": TinyQwenSpec(
        text_hidden=768,
        text_layers=8,
        heads=12,
        kv_heads=2,
        intermediate=2048,
        mrope_section=(8, 12, 12),
        vision_depth=6,
        vision_hidden=384,
        vision_heads=6,
        vision_intermediate=1024,
        max_pixels=28 * 28 * 256,
    ),
}
QUESTION = "Describe this image."
VIDEO_FPS = 2.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HISTOGRAMS = {
    "server_ttft_mean_s": "vllm:time_to_first_token_seconds",
    "server_prefill_mean_s": "vllm:request_prefill_time_seconds",
    "server_queue_mean_s": "vllm:request_queue_time_seconds",
    "server_prefill_kv_tokens_mean": "vllm:request_prefill_kv_computed_tokens",
}
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# --- the model's image geometry -------------------------------------------------------------


def processor_geometry(model_dir: str | Path | None) -> TinyQwenSpec | None:
    """The image processor's patch/merge sizes and pixel bounds, read from a local model
    directory (``processor_config.json`` or ``preprocessor_config.json``); None if unknown."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        cfg = json.loads(path.read_text())
        cfg = cfg.get("image_processor", cfg)
        size = cfg.get("size") or {}
        max_pixels = cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        min_pixels = cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        if max_pixels and min_pixels:
            return TinyQwenSpec(
                patch_size=int(cfg.get("patch_size", 14)),
                spatial_merge_size=int(cfg.get("merge_size", 2)),
                min_pixels=int(min_pixels),
                max_pixels=int(max_pixels),
            )
    return None


def default_image_sizes(geometry: TinyQwenSpec | None) -> list[int]:
    """Square sides 56, 112, 224, ... doubling up to the largest square the processor keeps
    whole (sqrt(max_pixels), rounded down to the 28-pixel grid); 112,224,448 if unknown."""
    if geometry is None:
        return [112, 224, 448]
    factor = geometry.patch_size * geometry.spatial_merge_size
    top = math.isqrt(geometry.max_pixels) // factor * factor
    sizes, side = [], 2 * factor
    while side < top:
        sizes.append(side)
        side *= 2
    return [*sizes, top]


def image_tokens(side: int, geometry: TinyQwenSpec | None) -> int | None:
    return image_tokens_wh(side, side, geometry)


def image_tokens_wh(width: int, height: int, geometry: TinyQwenSpec | None) -> int | None:
    from tiny_models.tiny_qwen import num_image_tokens

    return None if geometry is None else num_image_tokens(width, height, geometry)


# --- /metrics -------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> {sample name: [(labels, value), ...]}."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        try:
            out.setdefault(name, []).append((dict(_LABEL.findall(labels)), float(value)))
        except ValueError:
            continue
    return out


def metric_sum(metrics, name: str) -> float:
    return sum(v for _, v in metrics.get(name, []))


def metric_max(metrics, name: str) -> float:
    return max((v for _, v in metrics.get(name, [])), default=0.0)


def cache_info(metrics) -> tuple[int | None, int | None]:
    """(block_size, num_gpu_blocks) from ``vllm:cache_config_info`` (None when absent)."""
    for labels, _ in metrics.get("vllm:cache_config_info", []):
        size, blocks = labels.get("block_size"), labels.get("num_gpu_blocks")
        if size not in (None, "None") and blocks not in (None, "None"):
            return int(size), int(blocks)
    return None, None


@dataclass
class Sampler:
    """Polls ``/metrics`` while a point runs; keeps the maxima of the in-flight gauges.

    Besides every ``interval`` seconds it polls at once when :meth:`poke` is called (on each
    first token: the request then holds its KV blocks until its next step), so a short request
    is less likely to slip between two polls."""

    http: object
    url: str
    interval: float
    kv_usage_max: float = 0.0
    running_max: float = 0.0
    samples: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def scrape(self):
        resp = await self.http.get(f"{self.url}/metrics", timeout=30)
        resp.raise_for_status()
        return parse_metrics(resp.text)

    async def run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            with contextlib.suppress(Exception):
                m = await self.scrape()
                self.kv_usage_max = max(
                    self.kv_usage_max, metric_max(m, "vllm:kv_cache_usage_perc")
                )
                self.running_max = max(self.running_max, metric_sum(m, "vllm:num_requests_running"))
                self.samples += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


# --- requests -------------------------------------------------------------------------------


def messages(url: str) -> list[dict]:
    part = (
        {"type": "video_url", "video_url": {"url": url}}
        if url.startswith("data:video/")
        else {"type": "image_url", "image_url": {"url": url}}
    )
    return [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]


async def one_request(
    client, model: str, image_url: str, ratio: float, args, on_first_token=None
) -> dict:
    """One streaming chat completion; TTFT, end-to-end latency and usage, or the error."""
    start = time.perf_counter()
    ttft = usage = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages(image_url),
            max_tokens=args.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={
                "mm_processor_kwargs": {
                    "video_keep_ratio"
                    if image_url.startswith("data:video/")
                    else "vision_keep_ratio": ratio
                },
                "ignore_eos": True,
            },
            timeout=args.timeout,
        )
        async for chunk in stream:
            if ttft is None and chunk.choices:
                ttft = time.perf_counter() - start
                if on_first_token is not None:
                    on_first_token()
            if chunk.usage is not None:
                usage = chunk.usage
    except Exception as err:  # a failed request is counted, not fatal
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    if ttft is None or usage is None:
        return {"error": "stream ended without a token or without usage"}
    return {
        "ttft": ttft,
        "latency": time.perf_counter() - start,
        "prompt_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
    }


def make_images(side: int, count: int, first_seed: int, video_size=None) -> list[str]:
    """``count`` unique data URLs: square images of ``side`` pixels, or with ``video_size``
    (w, h) MP4 videos of ``side`` frames."""
    from tiny_models.tiny_qwen import tiny_image, tiny_video
    from vs_vllm.local_server import data_url, mp4_data_url

    if video_size is not None:
        return [
            mp4_data_url(tiny_video(side, *video_size, seed=first_seed + i), VIDEO_FPS)
            for i in range(count)
        ]
    return [data_url(tiny_image(side, side, seed=first_seed + i)) for i in range(count)]


def video_tokens(frames: int, size: tuple[int, int], geometry: TinyQwenSpec | None) -> int | None:
    """Visual tokens of a video of ``frames`` frames of ``size`` (w, h): temporal patches of
    ``temporal_patch_size`` frames, each of the image's merged grid."""
    n = image_tokens_wh(*size, geometry)
    if n is None:
        return None
    return math.ceil(frames / geometry.temporal_patch_size) * n


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


async def run_point(client, http, url, model, images, ratio, concurrency, args, bar) -> dict:
    """Send one image per request, at most ``concurrency`` in flight; the point's numbers."""
    sem = asyncio.Semaphore(concurrency)
    sampler = Sampler(http, url, args.metrics_interval)
    before = await sampler.scrape()

    async def bounded(image_url):
        async with sem:
            result = await one_request(client, model, image_url, ratio, args, sampler.poke)
            bar.update(1)
            return result

    poller = asyncio.create_task(sampler.run())
    start = time.perf_counter()
    try:
        results = await asyncio.gather(*(bounded(u) for u in images))
    finally:
        sampler.stop()
        await poller
    wall = time.perf_counter() - start
    after = await sampler.scrape()

    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttfts = [r["ttft"] for r in ok]
    prompt = sorted({r["prompt_tokens"] for r in ok})
    output = [r["output_tokens"] for r in ok]
    block_size, num_blocks = cache_info(after)
    row = {
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "prompt_tokens": prompt[0] if len(prompt) == 1 else "/".join(map(str, prompt)),
        "output_tokens": round(sum(output) / len(output), 2) if output else "",
        "ttft_p50_s": round(percentile(ttfts, 50), 5),
        "ttft_p90_s": round(percentile(ttfts, 90), 5),
        "ttft_p99_s": round(percentile(ttfts, 99), 5),
        "ttft_mean_s": round(sum(ttfts) / len(ttfts), 5) if ttfts else float("nan"),
        "latency_p50_s": round(percentile([r["latency"] for r in ok], 50), 5),
        "throughput_rps": round(len(ok) / wall, 4) if wall > 0 else float("nan"),
        "duration_s": round(wall, 3),
        "running_max": int(sampler.running_max),
        "kv_usage_max": sampler.kv_usage_max,
        "metrics_samples": sampler.samples,
        "block_size": block_size or "",
        "num_kv_blocks": num_blocks or "",
    }
    for column, name in HISTOGRAMS.items():
        count = metric_sum(after, f"{name}_count") - metric_sum(before, f"{name}_count")
        total = metric_sum(after, f"{name}_sum") - metric_sum(before, f"{name}_sum")
        row[column] = round(total / count, 5) if count > 0 else ""
    if num_blocks:
        # vLLM's usage = 1 - free / (num_gpu_blocks - 1): the null block is not counted
        row["kv_blocks_peak_measured"] = round(sampler.kv_usage_max * (num_blocks - 1))
    else:
        row["kv_blocks_peak_measured"] = ""
    if block_size and ok:
        # KV holds the prompt and every output token but the last one (never fed back)
        per_request = math.ceil((max(prompt) + max(output) - 1) / block_size)
        row["kv_blocks_per_request"] = per_request
        row["kv_blocks_peak_analytic"] = per_request * min(concurrency, len(images))
    else:
        row["kv_blocks_per_request"] = row["kv_blocks_peak_analytic"] = ""
    return row


async def warm_up(client, model: str, side: int, seed: int, args, bar) -> int:
    """Warm the server up for one image size: ``--warmup`` requests one at a time, then a burst
    of ``--warmup-burst`` at once (cycling through the sweep's ratios), so the first measured
    point of each size pays no first-batch cost. Returns the next unused image seed."""
    for image_url in make_images(side, args.warmup, seed, args.video_size):
        result = await one_request(client, model, image_url, 1.0, args)
        bar.update(1)
        if "error" in result:
            raise RuntimeError(f"warm-up at {side}px failed: {result['error']}")
    seed += args.warmup
    images = make_images(side, args.warmup_burst, seed, args.video_size)

    async def counted(i, image_url):
        result = await one_request(
            client, model, image_url, args.ratios[i % len(args.ratios)], args
        )
        bar.update(1)
        return result

    results = await asyncio.gather(*(counted(i, u) for i, u in enumerate(images)))
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"warm-up burst at {side}px failed: {errors[0]}")
    return seed + args.warmup_burst


async def sweep(url: str, args, geometry: TinyQwenSpec | None) -> tuple[list[dict], dict]:
    """The whole sweep against the server at ``url``: rows and facts about the server."""
    import httpx
    import openai
    from tqdm.auto import tqdm

    limits = httpx.Limits(max_connections=max(args.concurrency) + 8)
    async with httpx.AsyncClient(limits=limits) as http:
        models = (await http.get(f"{url}/v1/models", timeout=30)).json()["data"]
        model, root = models[0]["id"], models[0].get("root")
        if geometry is None:
            geometry = processor_geometry(root)
        version = ""
        with contextlib.suppress(Exception):
            version = (await http.get(f"{url}/version", timeout=30)).json()["version"]
        sizes = args.video_frames or args.image_sizes or default_image_sizes(geometry)
        points = [(s, r, c) for s in sizes for r in args.ratios for c in args.concurrency]
        per_point = {c: args.requests_per_point or max(8, c) for c in args.concurrency}
        warm = args.warmup + args.warmup_burst
        total = len(sizes) * (warm + len(args.ratios) * sum(per_point.values()))
        client = openai.AsyncOpenAI(
            base_url=f"{url}/v1",
            api_key="none",
            max_retries=0,
            http_client=httpx.AsyncClient(limits=limits, timeout=args.timeout),
        )
        rows: list[dict] = []
        seed = 1000  # every image unique: no processor-cache or prefix-cache hits
        bar = tqdm(total=total, desc="prefill sweep", unit="req")
        try:
            warmed = set()
            for side, ratio, concurrency in points:
                if side not in warmed:
                    bar.set_postfix_str(f"warm-up {side}px")
                    seed = await warm_up(client, model, side, seed, args, bar)
                    warmed.add(side)
                count = per_point[concurrency]
                images = make_images(side, count, seed, args.video_size)
                seed += count
                bar.set_postfix_str(f"{side}px r={ratio} c={concurrency}")
                point = await run_point(
                    client, http, url, model, images, ratio, concurrency, args, bar
                )
                if args.video_size is None:
                    n = image_tokens(side, geometry)
                else:
                    n = video_tokens(side, args.video_size, geometry)
                rows.append(
                    {
                        "media": "image" if args.video_size is None else "video",
                        "image_size": side,
                        "keep_ratio": ratio,
                        "concurrency": concurrency,
                        "image_tokens": n if n is not None else "",
                        "kept_tokens": num_kept_tokens(n, ratio) if n is not None else "",
                        **point,
                    }
                )
        finally:
            bar.close()
            await client.close()
    return rows, {"model_id": model, "model_root": root or "", "vllm_version": version}


# --- output ---------------------------------------------------------------------------------


def write_csv(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot(rows: list[dict], out_dir: Path, title: str, name: str = "prefill_latency") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["image_size"] for r in rows})
    ratios = sorted({r["keep_ratio"] for r in rows}, reverse=True)
    concs = sorted({r["concurrency"] for r in rows})
    c_low, c_high, biggest = concs[0], concs[-1], sizes[-1]

    def pick(size=None, ratio=None, conc=None):
        return [
            r
            for r in rows
            if (size is None or r["image_size"] == size)
            and (ratio is None or r["keep_ratio"] == ratio)
            and (conc is None or r["concurrency"] == conc)
        ]

    def label(size):
        row = pick(size=size)[0]
        n = row["image_tokens"]
        unit = " frames" if row.get("media") == "video" else "px"
        return f"{size}{unit}" + (f" (N={n})" if n != "" else "")

    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for size in sizes:
        pts = sorted(pick(size=size, conc=c_low), key=lambda r: r["keep_ratio"])
        ax.plot(
            [r["keep_ratio"] for r in pts],
            [1e3 * _num(r["ttft_p50_s"]) for r in pts],
            marker="o",
            label=label(size),
        )
    ax.set_xlabel("keep ratio")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"time to first token, concurrency {c_low}\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{name}_ttft.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, size in enumerate(sizes):
        color = f"C{i}"
        pts = sorted(pick(size=size, conc=c_low), key=lambda r: r["keep_ratio"])
        xs = [r["keep_ratio"] for r in pts]
        ax1.plot(xs, [_num(r["prompt_tokens"]) for r in pts], marker="o", color=color)
        pts = sorted(pick(size=size, conc=c_high), key=lambda r: r["keep_ratio"])
        xs = [r["keep_ratio"] for r in pts]
        ax2.plot(
            xs,
            [_num(r["kv_blocks_peak_measured"]) for r in pts],
            marker="o",
            color=color,
            label=f"{label(size)} measured",
        )
        ax2.plot(
            xs,
            [_num(r["kv_blocks_peak_analytic"]) for r in pts],
            ls="--",
            color=color,
            label=f"{label(size)} analytic",
        )
    ax1.set_xlabel("keep ratio")
    ax1.set_ylabel("prompt tokens per request")
    ax1.set_title("prompt tokens (one image)", fontsize=9)
    ax2.set_xlabel("keep ratio")
    ax2.set_ylabel("KV blocks in use at peak")
    ax2.set_title(
        f"peak KV blocks, concurrency {c_high} (measured: max of /metrics polls)", fontsize=9
    )
    for ax in (ax1, ax2):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / f"{name}_kv.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for ratio in ratios:
        pts = sorted(pick(size=biggest, ratio=ratio), key=lambda r: r["concurrency"])
        ax.plot(
            [r["concurrency"] for r in pts],
            [_num(r["throughput_rps"]) for r in pts],
            marker="o",
            label=f"ratio {ratio}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("requests / s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"throughput, {label(biggest)}\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{name}_throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server on 127.0.0.1 (default: start one)")
    where.add_argument("--model", help="model dir to serve (default: build one, see --spec)")
    p.add_argument("--spec", choices=PRESETS, default="tiny", help="model to build (no --model)")
    p.add_argument(
        "--strategy",
        help="--vision-selector-strategy (default: norm; learned when --vision-selector is given)",
    )
    p.add_argument("--vision-selector", help="scorer checkpoint for the learned strategy")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `vllm serve` argument (repeatable): --serve-arg=--max-num-seqs=64",
    )
    p.add_argument(
        "--ratios", type=floats, default=[1.0, 0.5, 0.3, 0.2, 0.1], help="default: 1,.5,.3,.2,.1"
    )
    p.add_argument(
        "--image-sizes",
        type=ints,
        default=None,
        help="square image sides in pixels (default: 56, 112, ... up to the "
        "processor's max_pixels)",
    )
    p.add_argument(
        "--video-frames",
        type=ints,
        default=None,
        help="sweep videos of these frame counts instead of images (e.g. 4,8,16)",
    )
    p.add_argument(
        "--video-size",
        default="224x224",
        help="video frame size WxH with --video-frames (default: 224x224)",
    )
    p.add_argument("--concurrency", type=ints, default=[1, 8, 32], help="default: 1,8,32")
    p.add_argument("--requests-per-point", type=int, default=0, help="default: max(8, concurrency)")
    p.add_argument("--max-tokens", type=int, default=2, help="output tokens (default: 2)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up requests per image size")
    p.add_argument(
        "--warmup-burst",
        type=int,
        default=None,
        help="then this many at once (default: the largest concurrency)",
    )
    p.add_argument("--metrics-interval", type=float, default=0.05, help="seconds between polls")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--server-timeout", type=float, default=900.0, help="server start, seconds")
    p.add_argument("--device-label", help="default: this machine's GPU, else its CPU")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="writes OUT/<device>/"
    )
    p.add_argument(
        "--name",
        type=file_stem,
        help="file stem of the CSV and plots (default: prefill_latency, with --spec S other "
        "than tiny: prefill_latency_S)",
    )
    args = p.parse_args(argv)

    if args.video_frames is not None:
        if not args.video_frames or min(args.video_frames) < 1:
            p.error("--video-frames needs positive frame counts")
        try:
            width, height = (int(v) for v in args.video_size.lower().split("x"))
        except ValueError:
            p.error(f"--video-size must be WxH, got {args.video_size!r}")
        args.video_size = (width, height)
    else:
        args.video_size = None
    if args.name is None:
        built = not (args.url or args.model)
        args.name = "prefill_latency" + (f"_{args.spec}" if built and args.spec != "tiny" else "")
        if args.video_size is not None:
            args.name += "_video"
    for r in args.ratios:
        validate_keep_ratio(r, name="--ratios")
    if not args.ratios or not args.concurrency or min(args.concurrency) < 1:
        p.error("--ratios and --concurrency need at least one value; concurrency >= 1")
    if args.image_sizes is not None and (not args.image_sizes or min(args.image_sizes) < 1):
        p.error("--image-sizes needs positive sides")
    args.ratios = list(dict.fromkeys(args.ratios))
    args.concurrency = list(dict.fromkeys(args.concurrency))
    if args.image_sizes is not None:
        args.image_sizes = list(dict.fromkeys(args.image_sizes))
    if args.warmup_burst is None:
        args.warmup_burst = max(args.concurrency)
    if min(args.requests_per_point, args.warmup, args.warmup_burst) < 0 or args.max_tokens < 1:
        p.error("--requests-per-point, --warmup, --warmup-burst >= 0; --max-tokens >= 1")
    if args.url and (args.serve_arg or args.strategy or args.vision_selector):
        p.error("--serve-arg, --strategy and --vision-selector only apply to a started server")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url must be on 127.0.0.1, got {args.url}")

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = args.device_label or device_label(device)
    out_dir = args.out / (device_slug(device) if not args.device_label else _slug(label))
    out_dir.mkdir(parents=True, exist_ok=True)
    strategy = args.strategy or ("learned" if args.vision_selector else "norm")

    if args.url:
        rows, facts = asyncio.run(sweep(args.url.rstrip("/"), args, None))
        model_name = facts["model_root"] or facts["model_id"]
        strategy = "(server's)"
    else:
        from vs_vllm.local_server import TINY_MODEL_SERVE_ARGS, served

        work = Path(tempfile.mkdtemp(prefix="vs-vllm-prefill-"))
        if args.model is None:
            from tiny_models.tiny_qwen import build_tiny_qwen25_vl

            model = str(build_tiny_qwen25_vl(work / args.spec, PRESETS[args.spec]))
            model_name = f"random-{args.spec}-local"
            serve_args = list(TINY_MODEL_SERVE_ARGS)
        else:  # a real model: its own dtype and context length (--serve-arg changes them)
            model = model_name = args.model
            serve_args = []
        serve_args += [
            "--trust-request-mm-kwargs",
            "--vision-keep-ratio",
            "1.0",
            "--vision-selector-strategy",
            strategy,
            "--max-num-seqs",
            str(max(args.concurrency)),
        ]
        if args.vision_selector:
            serve_args += ["--vision-selector", args.vision_selector]
        if args.video_size is not None:
            serve_args += ["--video-keep-ratio", "1.0", "--limit-mm-per-prompt", '{"video": 1}']
        serve_args += args.serve_arg
        log = work / "server.log"
        print(f"server log: {log}", flush=True)
        with served(model, *serve_args, log=log, timeout=args.server_timeout) as url:
            rows, facts = asyncio.run(sweep(url, args, processor_geometry(model)))

    command = shlex.join(["python", "benchmarks/prefill_latency.py", *(argv or sys.argv[1:])])
    common = {
        "device": label,
        "model": model_name,
        "spec": args.spec if not (args.url or args.model) else "",
        "strategy": strategy,
        "vllm_version": facts["vllm_version"],
        "max_tokens": args.max_tokens,
    }
    rows = [{**row, **common, "command": command} for row in rows]
    path = out_dir / f"{args.name}.csv"
    write_csv(rows, path)
    title = f"{model_name}, {strategy}, vLLM {facts['vllm_version']}, {label}"
    pngs = plot(rows, out_dir, title, args.name)
    _print_table(rows)
    print(f"wrote {path}")
    for png in pngs:
        print(f"wrote {png}")
    return 1 if any(r["errors"] for r in rows) else 0


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _print_table(rows: list[dict]) -> None:
    cols = [
        "image_size",
        "keep_ratio",
        "concurrency",
        "prompt_tokens",
        "ttft_p50_s",
        "ttft_p90_s",
        "throughput_rps",
        "kv_blocks_peak_measured",
        "errors",
    ]
    print("  ".join(f"{c:>14}" for c in cols))
    for row in rows:
        print("  ".join(f"{row[c]!s:>14}" for c in cols))


if __name__ == "__main__":
    sys.exit(main())
