"""lmms-eval hooks of the ``vs_demo_ring`` task: the bundled demo's held-out images and questions
(``demo/ring/questions.jsonl``), scored as ``vs_vllm/bundled_demo.py`` scores them."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

#: demo/ring/ of this source tree: questions.jsonl names its images relative to this folder.
DEMO_DIR = Path(__file__).resolve().parents[3] / "demo" / "ring"


def doc_to_visual(doc: dict) -> list:
    """The question's image, RGB (sent as PNG by lmms-eval's OpenAI backend, as the demo does)."""
    with Image.open(DEMO_DIR / doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question as written, after the image (the demo model was fitted on this prompt)."""
    return doc["question"]


def is_correct(answer: str, truth: str) -> bool:
    """The bundled demo's rule: the answer, stripped and lower-cased, starts with the colour."""
    return answer.strip().lower().startswith(truth.lower())


def process_results(doc: dict, results: list) -> dict:
    """``accuracy``: 1.0 when the greedy answer names the true colour, else 0.0."""
    return {"accuracy": float(is_correct(results[0], doc["answer"]))}
