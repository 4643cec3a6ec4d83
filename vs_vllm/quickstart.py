"""``vs-vllm quickstart``: serve a model with VisionSelector and show what it does.

Without ``--model``: the bundled demo (:mod:`vs_vllm.bundled_demo`): a small model trained on
generated images, served by two real vLLM servers at keep 0.1 (trained scorer / random), its
held-out questions answered in three modes, with accuracy, prompt tokens, time to first token
and one picture per mode of the kept tokens.

With ``--model``: starts the real OpenAI-compatible server on that model with
``--vision-keep-ratio`` (and ``--trust-request-mm-kwargs``, so one request can ask for the
full image), with the model's own dtype and context length, sends the same chat request with
one image twice, at ratio 1.0 and at the server's ratio, prints the answers and the prompt
tokens of both, and stops the server.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vs_vllm.local_server import data_url, served
from vs_vllm.sample_image import sample_image
from vs_vllm.selection import validate_keep_ratio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="model directory or hub id (default: the bundled demo model, demo/ring)"
    )
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--strategy", default=None, help="default: learned")
    parser.add_argument("--vision-selector", help="scorer checkpoint for the learned strategy")
    parser.add_argument("--image", type=Path, help="an image file (default: a generated one)")
    parser.add_argument("--question", default="Describe this image.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `vllm serve` argument (repeatable), e.g. --serve-arg=--tensor-parallel-size=2",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="bundled demo: folder for its pictures and logs"
    )
    parser.add_argument(
        "--images", type=int, default=None, help="bundled demo: ask only the first N images"
    )


def run(args: argparse.Namespace) -> int:
    import openai
    from PIL import Image

    if args.model is None:
        from vs_vllm import bundled_demo

        return bundled_demo.run(args.out, args.images)
    ratio = validate_keep_ratio(args.keep_ratio, name="--keep-ratio")
    workdir = Path(tempfile.mkdtemp(prefix="vs-vllm-quickstart-"))
    serve_args = list(args.serve_arg)
    # a real model: its own dtype and context length (add --serve-arg to change them)
    model = args.model
    strategy = args.strategy or "learned"
    serve_args += [
        "--vision-keep-ratio",
        str(ratio),
        "--vision-selector-strategy",
        strategy,
        "--trust-request-mm-kwargs",
    ]
    if args.vision_selector:
        serve_args += ["--vision-selector", args.vision_selector]
    image = Image.open(args.image).convert("RGB") if args.image else sample_image()
    log = workdir / "server.log"
    print(f"starting: vs-vllm serve {model} {' '.join(serve_args)}")
    print(f"(server log: {log}) ", end="", flush=True)
    start = time.perf_counter()
    with served(model, *serve_args, log=log, progress=True) as url:
        print(f"\nserver up after {time.perf_counter() - start:.0f} s at {url}")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        name = client.models.list().data[0].id
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                    {"type": "text", "text": args.question},
                ],
            }
        ]
        rows = []
        for label, body in (
            ("all visual tokens (ratio 1.0)", {"vision_keep_ratio": 1.0}),
            (f"VisionSelector (ratio {ratio}, {strategy})", None),
        ):
            t0 = time.perf_counter()
            resp = client.chat.completions.create(
                model=name,
                messages=messages,
                max_tokens=args.max_tokens,
                temperature=0,
                extra_body={"mm_processor_kwargs": body} if body else None,
            )
            rows.append(
                (
                    label,
                    resp.usage.prompt_tokens,
                    time.perf_counter() - t0,
                    resp.choices[0].message.content,
                )
            )
    print()
    for label, tokens, seconds, answer in rows:
        print(f"{label}: {tokens} prompt tokens, {seconds:.2f} s")
        print(f"  answer: {answer!r}")
    saved = rows[0][1] - rows[1][1]
    print(
        f"\nselection removed {saved} of {rows[0][1]} prompt tokens "
        f"({100 * saved / rows[0][1]:.0f}%); server stopped."
    )
    return 0
