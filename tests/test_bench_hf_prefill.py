"""CPU smoke tests of benchmarks/hf_prefill.py: the repo's tiny Qwen2.5-VL geometry, no GPU."""

from __future__ import annotations

import csv

import pytest
import torch

from benchmarks import hf_prefill
from vs_vllm.selection import num_kept_tokens


def _read_csv(tmp_path, name):
    (path,) = tmp_path.glob(f"*/{name}.csv")
    assert path.with_suffix(".png").stat().st_size > 0
    with path.open() as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_7b_geometry_matches_the_published_model():
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = hf_prefill.make_config(hf_prefill.QWEN25_VL_7B)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (3584, 28, 28)
    assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (
        4,
        18944,
        152064,
    )
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.hidden_size, vision.num_heads) == (32, 1280, 16)
    assert (vision.intermediate_size, vision.out_hidden_size, vision.window_size) == (
        3420,
        3584,
        112,
    )
    assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31]
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(8.29e9, rel=0.01)


def test_hf_prefill_tiny_cpu_smoke(tmp_path, capsys):
    argv = [
        "--geometry",
        "tiny",
        "--allow-cpu",
        "--threads",
        "1",
        "--sizes",
        "112,224",
        "--ratios",
        "1.0,0.5,0.2",
        "--warmup",
        "1",
        "--repeat",
        "3",
        "--out",
        str(tmp_path),
    ]
    assert hf_prefill.main(argv) == 0
    out = capsys.readouterr().out
    assert "paper: 1.73x" in out and "select kernel backend: torch" in out
    assert "median of 3 interleaved rounds after 1 warm-up rounds" in out
    assert "parts/whole" in out and "speedup [min-max]" in out
    assert "n/a (CUDA only)" in out  # the measured activation memory needs CUDA

    fields, rows = _read_csv(tmp_path, "hf_prefill_tiny")
    assert fields == list(hf_prefill.COLUMNS)
    assert "peak_over_base_mib" not in fields  # replaced by the KV / activation columns
    assert len(rows) == 2 * 3
    assert {(int(r["image_px"]), float(r["keep_ratio"])) for r in rows} == {
        (px, r) for px in (112, 224) for r in (1.0, 0.5, 0.2)
    }
    text_cfg = hf_prefill.tiny_geometry()["text"]
    # layers x 2 (K, V) x KV heads x head dim x 4 bytes (float32), per prompt token
    kv_per_token = (
        text_cfg["num_hidden_layers"]
        * 2
        * text_cfg["num_key_value_heads"]
        * (text_cfg["hidden_size"] // text_cfg["num_attention_heads"])
        * 4
    )
    assert kv_per_token == 2 * 2 * 1 * 32 * 4
    text = hf_prefill.PREFIX_TOKENS + hf_prefill.QUESTION_TOKENS + 2  # + vision start/end
    for r in rows:
        n, ratio = int(r["visual_tokens"]), float(r["keep_ratio"])
        assert n == (int(r["image_px"]) // 28) ** 2
        k = int(r["kept_tokens"])
        assert k == num_kept_tokens(n, ratio)
        full, kept = int(r["prompt_len_full"]), int(r["prompt_len_kept"])
        assert full == text + n and kept == text + k
        assert (kept == full) if ratio == 1.0 else (0 < kept < full)

        # every region: median within [min, max], a spread, all positive
        for name in hf_prefill.REGIONS:
            lo, med, hi = (float(r[f"{name}_{s}"]) for s in ("min_ms", "ms", "max_ms"))
            assert 0 < lo <= med <= hi, (name, r)
            assert float(r[f"{name}_iqr_pct"]) >= 0
        # parts = vit + inputs + llm per round: its median lies between the sums of the
        # parts' minima and maxima; parts/whole is that median over the whole's median
        parts = float(r["parts_ms"])
        assert sum(float(r[f"{p}_min_ms"]) for p in hf_prefill.PARTS) <= parts + 1e-3
        assert parts <= sum(float(r[f"{p}_max_ms"]) for p in hf_prefill.PARTS) + 1e-3
        pw = float(r["parts_over_whole"])
        assert pw == pytest.approx(parts / float(r["whole_ms"]), abs=2e-3)
        assert float(r["parts_over_whole_min"]) - 1e-3 <= pw
        assert pw <= float(r["parts_over_whole_max"]) + 1e-3
        # the speedup (ratio of medians) lies within its per-round range
        spd, spd_lo, spd_hi = (float(r[c]) for c in ("speedup", "speedup_min", "speedup_max"))
        assert spd_lo - 1e-3 <= spd <= spd_hi + 1e-3 and spd_lo > 0
        assert float(r["speedup_limit"]) > 0
        if ratio == 1.0:
            assert spd == spd_lo == spd_hi == 1.0  # each round against itself

        # the KV cache column is the formula on the kept prompt length, exactly
        assert int(r["kv_cache_bytes"]) == kv_per_token * kept
        assert float(r["kv_cache_mib"]) == pytest.approx(kv_per_token * kept / 2**20, rel=1e-3)
        assert float(r["kv_saved_pct"]) == pytest.approx(100 * (1 - kept / full), abs=0.05)
        for col in ("llm_act_mib", "llm_act_saved_pct", "vit_act_mib", "peak_mem_mib"):
            assert r[col] == "", col  # measured on CUDA only
        assert r["sm_clock_mhz_min"] == r["sm_clock_mhz_max"] == ""
        assert r["timer"] == "perf_counter"
        assert (r["warmup"], r["repeat"]) == ("1", "3")
        assert r["command"].startswith("python benchmarks/hf_prefill.py --geometry tiny")
        assert r["paper_speedup"] == ("1.73" if ratio == 0.2 else "")


def test_consistency_warnings_flag_parts_that_do_not_add_up():
    rows = [
        {"image_px": 1792, "keep_ratio": 1.0, "parts_ms": 552.8, "whole_ms": 443.3},
        {"image_px": 1792, "keep_ratio": 0.2, "parts_ms": 470.3, "whole_ms": 480.0},
    ]
    for r in rows:
        r["parts_over_whole"] = r["parts_ms"] / r["whole_ms"]
    (line,) = hf_prefill.consistency_warnings(rows, 0.10)
    assert line.startswith("WARNING: 1792 px, keep 1.0:") and "parts/whole 1.25" in line
    assert hf_prefill.consistency_warnings(rows, 0.30) == []


def test_kv_cache_bytes_match_a_real_cache():
    """The formula against the bytes a transformers DynamicCache holds after a prefill."""
    from transformers import DynamicCache

    geometry = hf_prefill.tiny_geometry()
    model = hf_prefill.build_model(geometry, torch.device("cpu"), torch.float32, seed=0)
    cfg = model.config.text_config
    tokens = 37
    cache = DynamicCache(config=cfg)
    with torch.inference_mode():
        model.model.language_model(
            inputs_embeds=torch.randn(1, tokens, cfg.hidden_size),
            position_ids=torch.arange(tokens).expand(3, 1, tokens),
            past_key_values=cache,
            use_cache=True,
        )
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == hf_prefill.kv_cache_bytes(cfg, torch.float32, tokens)
    assert hf_prefill.kv_cache_bytes_per_token(geometry, torch.float32) * tokens == held
    # Qwen2.5-VL-7B, bf16: 28 layers x 2 x 4 KV heads x 128 x 2 bytes = 57344 bytes per token
    cfg7 = hf_prefill.make_config(hf_prefill.QWEN25_VL_7B).text_config
    assert hf_prefill.kv_cache_bytes(cfg7, torch.bfloat16, 4125) == 57344 * 4125
