"""``vs-vllm train``: train a VisionSelector scorer on a frozen VL model (any supported family).

    vs-vllm train --model DIR --data train.jsonl --image-root IMAGES --out scorer/ --keep-ratio 0.2

The JSONL may hold image and video samples (``vs_vllm.train.data``); a video is a folder of
frames or a video file, at most ``--max-frames`` frames of it are used.

Writes ``OUT/vision_selector.safetensors`` (+ ``.json`` provenance), which
``vllm serve MODEL --vision-selector OUT`` loads, plus ``train_curves.csv``/``.png`` and
resumable checkpoints under ``OUT/checkpoints/``.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory of a supported family (frozen)")
    p.add_argument("--data", required=True, help="training JSONL (LLaVA / Qwen-VL format)")
    p.add_argument(
        "--image-root", default=".", help="folder the JSONL's image and video paths are under"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--keep-ratio", type=float, default=0.2, help="training keep ratio")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides epochs)")
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--bce-start", type=float, default=0.1)
    p.add_argument("--bce-end", type=float, default=2.0)
    p.add_argument("--max-pixels", type=int, default=50176)
    p.add_argument(
        "--max-frames", type=int, default=16, help="frames per video, spread evenly (default 16)"
    )
    p.add_argument(
        "--video-fps", type=float, default=2.0, help="frame rate of folders of frames (default 2)"
    )
    p.add_argument(
        "--video-max-pixels",
        type=int,
        default=None,
        help="the video processor's longest_edge (default: the processor's own)",
    )
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--skip-bad", action="store_true", help="log and skip bad samples")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from vs_vllm.train.trainer import TrainConfig, train

    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command", "no_progress")}
    try:
        cfg = TrainConfig(**fields, progress=not args.no_progress)
        result = train(cfg)
    except (ValueError, OSError) as err:
        # bad arguments, data (DataError: "file:line: problem"), model folder or samples:
        # one line, like ``vs-vllm serve``, not a traceback
        raise SystemExit(f"vs-vllm: error: {err}") from None
    print(f"wrote {result.scorer_path} after {result.steps} steps")
    print(
        f"serve it: vllm serve {cfg.model} --vision-keep-ratio {cfg.keep_ratio} "
        f"--vision-selector {result.scorer_path}"
    )
    return 0
