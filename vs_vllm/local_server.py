"""Start `vs-vllm serve` (the real OpenAI-compatible server) in a subprocess and wait until
it answers: used by ``vs-vllm quickstart``, the tests and the benchmarks."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

VS_VLLM = str(Path(sys.executable).with_name("vs-vllm"))
#: ``vllm serve`` settings of the tiny random-weight test models (``tiny_models``) on a
#: CPU: float32 (their weights' dtype), a short context and no graph capture (fast start-up).
#: Never applied to a real model.
TINY_MODEL_SERVE_ARGS = ("--dtype", "float32", "--max-model-len", "2048", "--enforce-eager")


def subprocess_env() -> dict[str, str]:
    """This process's environment as a fresh shell would have it, for starting vLLM.

    Drops what importing libraries or a test runner put there: ``LD_LIBRARY_PATH`` entries of
    OpenCV's bundled libraries (``import cv2`` adds them; inherited by vLLM's workers they
    break the C++ compiler torch's inductor runs), ``PYTEST_*`` (inductor compiles differently
    under pytest) and ``TRITON_INTERPRET`` (set by the kernel tests).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")
    }
    if "LD_LIBRARY_PATH" in env:
        parts = [p for p in env["LD_LIBRARY_PATH"].split(":") if p and "/cv2/" not in p]
        if parts:
            env["LD_LIBRARY_PATH"] = ":".join(parts)
        else:
            del env["LD_LIBRARY_PATH"]
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(
    model: str | Path,
    *args: str,
    log: Path,
    timeout: float = 600,
    progress: bool = False,
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Yield the base URL of a running server on 127.0.0.1; stop it afterwards.

    ``args`` are the ``vllm serve`` arguments (none added: a real model is served with its
    own dtype and context length; the tiny local models take :data:`TINY_MODEL_SERVE_ARGS`);
    the server's output goes to ``log``; ``extra_env`` is added to the server's environment
    (e.g. CPU thread binding for TP).
    """
    port = free_port()
    env = {**subprocess_env(), **(extra_env or {})}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = [VS_VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited ({proc.returncode}):\n{log.read_text()[-5000:]}"
                    )
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"server not healthy in {timeout}s:\n{log.read_text()[-5000:]}"
                    )
                if progress:
                    print(".", end="", flush=True)
                time.sleep(1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def bench_serve_command(
    model: str,
    url: str,
    result: Path,
    *,
    image_size: int,
    input_len: int,
    output_len: int,
    num_prompts: int,
    concurrency: int,
) -> list[str]:
    """``vs-vllm bench serve`` (vLLM's own load generator) against ``url``, the server of
    ``model``: the ``random-mm`` dataset with one square image of ``image_size`` pixels and
    ``input_len`` random text tokens per request, ``output_len`` tokens out (EOS ignored),
    ``num_prompts`` requests, at most ``concurrency`` in flight, seed 0; vLLM writes its
    results as JSON to ``result``. Used by ``benchmarks/vllm_bench_compare.py`` and the tests."""
    return [
        VS_VLLM,
        "bench",
        "serve",
        "--backend",
        "openai-chat",
        "--base-url",
        url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        model,
        "--tokenizer",
        model,
        "--dataset-name",
        "random-mm",
        "--random-mm-base-items-per-request",
        "1",
        "--random-mm-num-mm-items-range-ratio",
        "0",
        "--random-mm-limit-mm-per-prompt",
        '{"image": 1, "video": 0}',
        "--random-mm-bucket-config",
        f"{{({image_size}, {image_size}, 1): 1.0}}",
        "--random-input-len",
        str(input_len),
        "--random-output-len",
        str(output_len),
        "--num-prompts",
        str(num_prompts),
        "--max-concurrency",
        str(concurrency),
        "--seed",
        "0",
        "--ignore-eos",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--save-result",
        "--result-dir",
        str(result.parent),
        "--result-filename",
        result.name,
    ]


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mp4_data_url(frames, fps: float = 2.0) -> str:
    """A (T, H, W, 3) uint8 RGB video as an MP4 data URL (OpenCV's mp4v writer; vLLM's video
    loader decodes it)."""
    import tempfile

    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        height, width = frames.shape[1:3]
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
