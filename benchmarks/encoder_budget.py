"""Encoder budget and encoder-cache memory with and without per-request ratios.

With per-request ratios allowed (``--trust-request-mm-kwargs``) a request may ask for the
whole image, so vLLM's encoder budget and encoder cache must fit the full largest image;
without them the budget follows the server's ratio. This asks vLLM's own
``compute_mm_encoder_budget`` through the plugin's processor, at Qwen2.5-VL-7B image geometry
(default max_pixels 12845056 -> 16384 visual tokens per image; hidden 3584, bf16), and writes
the token budgets and the encoder-cache bytes they allow.

    python benchmarks/encoder_budget.py
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN25_VL_MAX_PIXELS = 12845056
HIDDEN_7B = 3584
POSITION_CHANNELS = 8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=HIDDEN_7B)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "analytic")
    args = p.parse_args(argv)

    from vllm.config import ModelConfig, SchedulerConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins
    from vllm.v1.core.encoder_cache_manager import compute_mm_encoder_budget

    from tiny_models.tiny_qwen import TinyQwenSpec, build_tiny_qwen25_vl

    load_general_plugins()
    model_dir = build_tiny_qwen25_vl(
        Path(tempfile.mkdtemp()) / "geometry",
        TinyQwenSpec(max_pixels=QWEN25_VL_MAX_PIXELS, max_position_embeddings=32768),
    )
    scheduler = SchedulerConfig(
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=32768,
        is_encoder_decoder=False,
    )
    rows = []
    configs = [("stock (no selection)", None)]
    for ratio in (0.5, 0.3, 0.2, 0.1):
        configs.append(
            (
                f"ratio {ratio}, per-request ratios",
                {"keep_ratio": ratio, "strategy": "norm", "request_ratios": True},
            )
        )
        configs.append(
            (f"ratio {ratio}, server ratio only", {"keep_ratio": ratio, "strategy": "norm"})
        )
    for label, settings in configs:
        overrides = {} if settings is None else {"vision_selector": settings}
        config = ModelConfig(model=str(model_dir), max_model_len=32768, hf_overrides=overrides)
        info = MULTIMODAL_REGISTRY.create_processor(config).info
        per_item = info.get_mm_max_tokens_per_item(32768, {"image": 1})
        compute, cache = compute_mm_encoder_budget(scheduler, {"image": per_item["image"]})
        width = args.hidden + (0 if settings is None else POSITION_CHANNELS)
        rows.append(
            {
                "config": label,
                "max_tokens_per_image": per_item["image"],
                "encoder_compute_budget_tokens": compute,
                "encoder_cache_tokens": cache,
                "encoder_cache_mib_bf16": round(cache * width * 2 / 2**20, 1),
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "hidden": args.hidden,
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "encoder_budget.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'config':<36} {'max tok/img':>11} {'cache tok':>9} {'cache MiB':>9}")
    for r in rows:
        print(
            f"{r['config']:<36} {r['max_tokens_per_image']:>11} {r['encoder_cache_tokens']:>9} "
            f"{r['encoder_cache_mib_bf16']:>9}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
