"""Rebuild ``demo/ring/``, the bundled demo model of ``scripts/run.sh``, from its seeded command.

    python scripts/build_demo.py                    # the synthetic run (10 minutes, 2 cores)
    python scripts/build_demo.py --work runs/ring   # ... and keeps its data and models there
    python scripts/build_demo.py --from-work DIR    # copy from an existing --work DIR

It runs ``python benchmarks/selection_learning.py --work DIR`` (seed 0, torch's default thread
count; its docstring says what it builds, ``benchmarks/results/amd-epyc/selection_learning.csv``
holds its held-out results) and copies into ``demo/ring/``:

* ``backbone/``: the fitted 0.41M-parameter Qwen2.5-VL (safetensors, tokenizer, processor);
* ``scorer/``: the VisionSelector scorer trained on it (``vision_selector.safetensors`` +
  ``.json`` provenance);
* ``images/`` and ``questions.jsonl``: the first ``--images`` held-out images (never seen in
  training), each with its question about the ring, the true colour and the ring's token;
* ``README.md``: what this is and the command that rebuilt it.

``VS_VLLM_FULL_RUNS=1 pytest tests/test_selection_learning.py`` reruns the same command and
checks that the rebuilt model gives the bundled one's answers on these images (in CI, only
the images are checked: the full run is too long for it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "demo" / "ring"
COMMAND = "python benchmarks/selection_learning.py --work DIR"
SCORER_FILES = ("vision_selector.safetensors", "vision_selector.json")


def copy_demo(work: Path, out: Path, images: int) -> None:
    """``demo/ring/`` from the ``--work`` folder of a ``selection_learning.py`` run."""
    backbone, scorer = work / "backbone", work / "scorer"
    data = work / "data"
    meta = json.loads((data / "heldout.meta.json").read_text())
    lines = [json.loads(x) for x in (data / "heldout.jsonl").read_text().splitlines() if x]
    if out.exists():
        shutil.rmtree(out)
    (out / "backbone").mkdir(parents=True)
    (out / "scorer").mkdir()
    (out / "images").mkdir()
    for name in sorted(p.name for p in backbone.iterdir() if p.is_file()):
        shutil.copy2(backbone / name, out / "backbone" / name)
    for name in SCORER_FILES:
        shutil.copy2(scorer / name, out / "scorer" / name)
    questions = []
    for line, info in list(zip(lines, meta, strict=True))[:images]:
        name = Path(line["image"]).name
        shutil.copy2(data / line["image"], out / "images" / name)
        question = line["conversations"][0]["value"].replace("<image>\n", "")
        questions.append(
            {
                "image": f"images/{name}",
                "question": question,
                "answer": info["answer"],
                "ring_token": info["target_token"],
            }
        )
    (out / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (out / "README.md").write_text(
        "# The bundled demo model of `scripts/run.sh`\n\n"
        'A small Qwen2.5-VL (0.41M parameters, random init) fitted to answer "What colour is '
        'the <shape>?" about generated 168 x 168 images holding 8 shapes (36 visual tokens '
        'each), and a VisionSelector scorer trained on its frozen backbone for "What colour is '
        'the ring?" at keep 0.2 (`vs-vllm train`). `images/` are held-out images it never '
        "saw; `questions.jsonl` gives each one's question, true colour and the index of the "
        "ring's visual token.\n\n"
        "Rebuilt, seeded, by:\n\n"
        "```bash\npython scripts/build_demo.py   # runs: " + COMMAND + "\n```\n\n"
        "(about 10 minutes on 2 cores; `VS_VLLM_FULL_RUNS=1 pytest "
        "tests/test_selection_learning.py` reruns it and checks that the rebuilt model answers "
        "these images as the bundled one does).\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, default=None, help="keep the run's data and models here")
    p.add_argument("--from-work", type=Path, default=None, help="copy from an existing run")
    p.add_argument("--images", type=int, default=24, help="held-out images to bundle")
    args = p.parse_args(argv)
    work = args.from_work
    temporary = None
    if work is None:
        from benchmarks.selection_learning import main as selection_learning

        work = args.work or Path(temporary := tempfile.mkdtemp(prefix="vs-vllm-demo-build-"))
        out = work / "results"
        if selection_learning(["--work", str(work), "--out", str(out)]) != 0:
            return 1
    try:
        copy_demo(work, args.out, args.images)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
