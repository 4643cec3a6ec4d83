"""Soak: a bounded mixed load on a vs-vllm server from a second process on 127.0.0.1.

    python benchmarks/soak.py            # tiny local model, 500 requests, 16 in flight
    python benchmarks/soak.py --requests 2000 --model DIR --serve-arg=--vision-selector=PATH

Starts `vs-vllm serve` (with --trust-request-mm-kwargs) unless --url is given, warms up,
then sends the requests: random per-request ratios in (0, 1], 1 to 3 images of random sizes
drawn from a small pool (so images repeat), and about 5% bad requests (bad ratios). Checks:
every good request has the right prompt token count, every bad one gets HTTP 400, the server
log has no error, and the server's resident memory after the load is within 10% of its value
after warm-up. Writes benchmarks/results/<device>/soak.csv (one row per run) and exits
non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.device_name import device_slug
from vs_vllm.local_server import TINY_MODEL_SERVE_ARGS, data_url, served
from vs_vllm.selection import num_kept_tokens

TINY_ARGS = [
    *TINY_MODEL_SERVE_ARGS,
    "--vision-selector-strategy",
    "norm",
]
BAD_RATIOS = [0, -0.3, 1.5, "0.5", True, None]


def server_rss(pid: int) -> int:
    """Resident memory of the server process and all its children (engine, workers), bytes."""
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total


def make_pool(seed: int):
    from tiny_models.tiny_qwen import num_image_tokens, tiny_image

    rng = random.Random(seed)
    pool = []
    for i in range(8):
        w, h = rng.choice([56, 112, 168, 224, 300, 448]), rng.choice([56, 112, 200, 250, 336])
        pool.append({"url": data_url(tiny_image(w, h, seed=100 + i)), "n": num_image_tokens(w, h)})
    return pool


def make_requests(count: int, pool, seed: int, bad_share: float):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        images = [rng.choice(pool) for _ in range(rng.randint(1, 3))]
        if rng.random() < bad_share:
            out.append({"images": images, "ratio": rng.choice(BAD_RATIOS), "bad": True})
        else:
            ratio = round(rng.uniform(0.01, 1.0), 3)
            out.append({"images": images, "ratio": ratio, "bad": False})
    return out


def messages(images):
    parts = [{"type": "image_url", "image_url": {"url": im["url"]}} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "describe it"}]}]


async def run_load(client, model, requests, concurrency, text_tokens, timeout, desc="soak"):
    """Send ``requests`` with at most ``concurrency`` in flight; one result dict per request."""
    import openai
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(concurrency)
    results = []
    bar = tqdm(total=len(requests), desc=desc)

    async def one(req):
        async with sem:
            start = time.perf_counter()
            try:
                resp = await client.chat.completions.create(
                    model=model,
                    messages=messages(req["images"]),
                    max_tokens=4,
                    temperature=0,
                    extra_body={"mm_processor_kwargs": {"vision_keep_ratio": req["ratio"]}},
                    timeout=timeout,
                )
                status, tokens = 200, resp.usage.prompt_tokens
            except openai.APIStatusError as err:
                status, tokens = err.status_code, None
            except Exception as err:  # a transport error is a failed request
                status, tokens = f"error: {type(err).__name__}", None
            elapsed = time.perf_counter() - start
            bar.update(1)
            expected = None
            if not req["bad"]:
                expected = text_tokens[len(req["images"])] + sum(
                    num_kept_tokens(im["n"], req["ratio"]) for im in req["images"]
                )
            results.append(
                {
                    **req,
                    "status": status,
                    "tokens": tokens,
                    "expected": expected,
                    "latency": elapsed,
                }
            )

    await asyncio.gather(*(one(r) for r in requests))
    bar.close()
    return results


async def calibrate(client, model, pool) -> dict[int, int]:
    """Prompt tokens that are not image tokens, for 1, 2 and 3 images (ratio 1.0 requests)."""
    out = {}
    for n in (1, 2, 3):
        images = pool[:n]
        resp = await client.chat.completions.create(
            model=model,
            messages=messages(images),
            max_tokens=1,
            extra_body={"mm_processor_kwargs": {"vision_keep_ratio": 1.0}},
        )
        out[n] = resp.usage.prompt_tokens - sum(im["n"] for im in images)
    return out


async def soak(url: str, pool, requests, args) -> tuple[list[dict], list[int]]:
    """Calibrate, warm up, then run the load in two halves; the server's memory is read after
    warm-up and after each half (so bounded growth, e.g. KV pages touched for the first time
    or the processor cache filling up to its cap, can be told from a leak)."""
    import openai

    pid = _server_pid(url)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    try:
        model = (await client.models.list()).data[0].id
        text_tokens = await calibrate(client, model, pool)
        # Warm-up: requests of every shape, then the reference memory reading.
        warm = make_requests(2 * args.concurrency, pool, args.seed + 1, 0.0)
        await run_load(client, model, warm, args.concurrency, text_tokens, args.timeout, "warm-up")
        rss = [server_rss(pid)]
        half = len(requests) // 2
        results = []
        for part in (requests[:half], requests[half:]):
            results += await run_load(
                client, model, part, args.concurrency, text_tokens, args.timeout
            )
            rss.append(server_rss(pid))
        return results, rss
    finally:
        await client.close()


def summarize(results, rss: list[int], log_text: str) -> dict:
    """Checks and numbers of one soak; ``rss`` = server memory after warm-up, half, end."""
    rss_warm, rss_mid, rss_after = rss
    good = [r for r in results if not r["bad"]]
    bad = [r for r in results if r["bad"]]
    wrong_counts = [r for r in good if r["status"] != 200 or r["tokens"] != r["expected"]]
    wrong_bad = [r for r in bad if r["status"] != 400]
    latencies = sorted(r["latency"] for r in good if r["status"] == 200)
    log_errors = [
        line for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line
    ]

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    growth = (rss_after - rss_warm) / rss_warm
    return {
        "requests": len(results),
        "good": len(good),
        "bad": len(bad),
        "good_wrong": len(wrong_counts),
        "bad_not_400": len(wrong_bad),
        "log_errors": len(log_errors),
        "latency_p50_s": round(statistics.median(latencies), 4) if latencies else 0.0,
        "latency_p99_s": round(pct(0.99), 4),
        "rss_warm_mib": round(rss_warm / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1),
        "rss_mid_mib": round(rss_mid / 2**20, 1),
        "rss_growth": round(growth, 4),
        "rss_growth_second_half": round((rss_after - rss_mid) / rss_warm, 4),
        "ok": not wrong_counts and not wrong_bad and not log_errors and growth <= 0.10,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bad-share", type=float, default=0.05)
    p.add_argument("--model", help="model dir (default: a tiny local Qwen2.5-VL)")
    p.add_argument("--keep-ratio", type=float, default=0.3)
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)

    import tempfile

    import torch

    work = Path(tempfile.mkdtemp(prefix="vs-vllm-soak-"))
    serve_args = list(args.serve_arg)
    if args.model is None:
        from tiny_models.tiny_qwen import build_tiny_qwen25_vl

        model = str(build_tiny_qwen25_vl(work / "tiny"))
        serve_args = TINY_ARGS + serve_args
    else:
        model = args.model
    serve_args += [
        "--vision-keep-ratio",
        str(args.keep_ratio),
        "--trust-request-mm-kwargs",
        "--max-num-seqs",
        str(args.concurrency),
    ]
    pool = make_pool(args.seed)
    requests = make_requests(args.requests, pool, args.seed, args.bad_share)
    log = work / "server.log"
    print(f"server log: {log}")
    with served(model, *serve_args, log=log, progress=True) as url:
        results, rss = asyncio.run(soak(url, pool, requests, args))
        log_text = log.read_text()
    summary = summarize(results, rss, log_text)
    device = torch.device("cpu")
    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    row = {
        **summary,
        "concurrency": args.concurrency,
        "model": args.model or "tiny-local",
        "command": " ".join(["python", "benchmarks/soak.py", *(argv or sys.argv[1:])]),
    }
    path = out_dir / "soak.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    for key, value in summary.items():
        print(f"{key:>16}: {value}")
    print(f"wrote {path}")
    return 0 if summary["ok"] else 1


def _server_pid(url: str) -> int:
    """The pid of the process listening on the server's port."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return conn.pid
    raise RuntimeError(f"no process listens on port {port}")


if __name__ == "__main__":
    sys.exit(main())
