"""The main job on the bundled demo model: learned vs random selection at keep 0.1, visibly.

``demo/ring/`` holds a small vision-language model (0.41M parameters) fitted to answer "What
colour is the <shape>?" about generated images of 8 shapes, a VisionSelector scorer trained on its
frozen backbone for "What colour is the ring?", and a few held-out images it never saw; all
rebuilt by one seeded command (``demo/ring/README.md``). This starts two real vLLM servers
on that model, one selecting with the trained scorer, one at random, both at keep 0.1, asks
every held-out image's question in three modes (all visual tokens; learned at 0.1; random at
0.1), and prints for each mode the question, truth and answer per image, the accuracy, the
prompt tokens and the time to first token. One PNG per mode shows each image as the model
sees it with the kept squares outlined and the rest dimmed (drawn by ``vs-vllm show``'s code:
the same tower and strategy, run with transformers).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vs_vllm.local_server import TINY_MODEL_SERVE_ARGS, data_url, served

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo" / "ring"
DEMO_RATIO = 0.1


@dataclass(frozen=True)
class Mode:
    name: str
    server: str  # which server answers: "learned" or "random"
    ratio: float
    strategy: str  # for the picture

    @property
    def label(self) -> str:
        return f"{self.name} (keep {self.ratio:g})"


MODES = (
    Mode("all tokens", "learned", 1.0, "learned"),
    Mode("learned", "learned", DEMO_RATIO, "learned"),
    Mode("random", "random", DEMO_RATIO, "random"),
)


@dataclass
class Answer:
    image: str
    question: str
    truth: str
    answer: str
    prompt_tokens: int
    ttft: float

    @property
    def correct(self) -> bool:
        return self.answer.strip().lower().startswith(self.truth.lower())


def demo_dir() -> Path:
    """The bundled model's folder; a clear error when the source tree is not there."""
    if not (DEMO_DIR / "questions.jsonl").is_file():
        raise SystemExit(
            f"vs-vllm: error: the bundled demo model is not at {DEMO_DIR} (it lives in the "
            "source tree: run from a clone, or pass --model)"
        )
    return DEMO_DIR


def _ask(client: Any, model: str, item: dict, root: Path, ratio: float) -> Answer:
    with Image.open(root / item["image"]) as img:
        url = data_url(img.convert("RGB"))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": item["question"]},
            ],
        }
    ]
    start = time.perf_counter()
    ttft, text, usage = None, "", None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        # the servers select at DEMO_RATIO; only the all-tokens mode asks for another ratio
        extra_body=None
        if ratio == DEMO_RATIO
        else {"mm_processor_kwargs": {"vision_keep_ratio": ratio}},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - start
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    if usage is None:
        raise RuntimeError("the server sent no usage (prompt tokens) with the stream")
    return Answer(
        item["image"],
        item["question"],
        item["answer"],
        text.strip(),
        usage.prompt_tokens,
        ttft if ttft is not None else time.perf_counter() - start,
    )


def _pictures(root: Path, items: list[dict], answers: dict[str, list[Answer]], out: Path) -> None:
    """One PNG per mode: every image with its kept squares, its answer under it."""
    import torch

    from vs_vllm.checkpoint import load_scorer
    from vs_vllm.hf import load_hf_model, model_adapter
    from vs_vllm.show import draw_kept, kept_tokens
    from vs_vllm.strategies import build_strategy

    model, processor = load_hf_model(root / "backbone", torch.float32)
    scorer = load_scorer(root / "scorer", model_adapter(model).score_width(model.config))
    for mode in MODES:
        strategy = build_strategy(mode.strategy, scorer if mode.strategy == "learned" else None)
        tiles = []
        for item, answer in zip(items, answers[mode.name], strict=True):
            with Image.open(root / item["image"]) as img:
                selection = kept_tokens(model, processor, img, strategy, mode.ratio)
            picture = draw_kept(selection)
            tile = Image.new("RGB", (picture.width, picture.height + 28), "white")
            tile.paste(picture, (0, 0))
            mark = "right" if answer.correct else "WRONG"
            caption = f"{answer.answer or '-'} ({mark}; truth {answer.truth})"
            ImageDraw.Draw(tile).text((4, picture.height + 8), caption, fill="black")
            tiles.append(tile)
        width, height = tiles[0].size
        columns = min(8, len(tiles))
        rows = -(-len(tiles) // columns)
        sheet = Image.new("RGB", (columns * (width + 4) - 4, rows * (height + 4) + 24), "white")
        draw = ImageDraw.Draw(sheet)
        right = sum(a.correct for a in answers[mode.name])
        draw.text((4, 4), f"{mode.label}: {right}/{len(tiles)} right", fill="black")
        for i, tile in enumerate(tiles):
            r, c = divmod(i, columns)
            sheet.paste(tile, (c * (width + 4), 24 + r * (height + 4)))
        sheet.save(out / f"{mode.name.replace(' ', '_')}.png")


def run(out: Path | None = None, images: int | None = None) -> int:
    """The comparison; prints the tables and writes the pictures under ``out``."""
    import openai

    root = demo_dir()
    items = [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines()]
    items = items[:images] if images else items
    out = out or Path(tempfile.mkdtemp(prefix="vs-vllm-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    common = [*TINY_MODEL_SERVE_ARGS, "--vision-keep-ratio", str(DEMO_RATIO)]
    flags = {
        "learned": [
            *common,
            "--vision-selector",
            str(root / "scorer"),
            "--trust-request-mm-kwargs",
        ],
        "random": [*common, "--vision-selector-strategy", "random"],
    }
    print(
        f"bundled demo model: {root} (a 0.41M-parameter vision-language model trained on "
        f"generated images, see its README.md; {len(items)} held-out images)"
    )
    print("starting two vLLM servers on it, keep 0.1: one with the trained scorer, one random")
    start = time.perf_counter()
    answers: dict[str, list[Answer]] = {}
    with contextlib.ExitStack() as stack:
        urls = {
            name: stack.enter_context(served(root / "backbone", *args, log=out / f"{name}.log"))
            for name, args in flags.items()
        }
        print(f"servers up after {time.perf_counter() - start:.0f} s (logs in {out})\n")
        clients = {n: openai.OpenAI(base_url=f"{u}/v1", api_key="none") for n, u in urls.items()}
        names = {n: c.models.list().data[0].id for n, c in clients.items()}
        for mode in MODES:
            client, name = clients[mode.server], names[mode.server]
            answers[mode.name] = [_ask(client, name, item, root, mode.ratio) for item in items]
    _print_modes(answers)
    _pictures(root, items, answers, out)
    print(f"\npictures (kept squares outlined, the rest dimmed): {out}/*.png")
    return 0


def _print_modes(answers: dict[str, list[Answer]]) -> None:
    """One row per image with every mode's answer side by side, then one line per mode."""
    width = 21
    header = f"{'image':<18} {'truth':<8}" + "".join(f"{m.label:<{width}}" for m in MODES)
    print(f"question: {answers[MODES[0].name][0].question}")
    print(header)
    for row in zip(*(answers[m.name] for m in MODES), strict=True):
        cells = "".join(
            f"{(a.answer or '-') + (' ok' if a.correct else ' WRONG'):<{width}}" for a in row
        )
        print(f"{row[0].image:<18} {row[0].truth:<8}{cells}")
    print(f"\n{'mode':<22} {'accuracy':>9} {'prompt tokens':>14} {'TTFT (ms)':>10}")
    for mode in MODES:
        got = answers[mode.name]
        right = sum(a.correct for a in got)
        tokens = statistics.mean(a.prompt_tokens for a in got)
        ttft = 1000 * statistics.mean(a.ttft for a in got)
        print(f"{mode.label:<22} {f'{right}/{len(got)}':>9} {tokens:>14.0f} {ttft:>10.0f}")
