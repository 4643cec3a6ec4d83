"""CPU smoke tests of benchmarks/kernel_select.py and benchmarks/hf_prefill.py (tiny sizes).

No GPU: kernel_select times the torch paths only (the Triton kernel is checked for correctness
in the interpreter, not timed), hf_prefill runs the repo's tiny Qwen2.5-VL geometry.
"""

from __future__ import annotations

import csv

import pytest
import torch

from benchmarks import hf_prefill, kernel_select
from vs_vllm.batch import PackedImages
from vs_vllm.selection import num_kept_tokens


def _read_csv(tmp_path, name):
    (path,) = tmp_path.glob(f"*/{name}.csv")
    assert path.with_suffix(".png").stat().st_size > 0
    with path.open() as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


# -- kernel_select ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 3350.0),
        ("NVIDIA H100 PCIe", 2000.0),
        ("NVIDIA H200", 4800.0),
        ("NVIDIA H200 NVL", 4800.0),
        ("NVIDIA A100-SXM4-80GB", 2000.0),
        ("NVIDIA A100 80GB PCIe", 2000.0),
        ("NVIDIA A100-SXM4-40GB", None),
        ("NVIDIA H100 NVL", None),
        ("AMD EPYC", None),
    ],
)
def test_peak_bandwidth_by_name(name, peak):
    assert kernel_select.peak_gbps(name) == peak


def test_exact_check_catches_a_wrong_selection():
    images = PackedImages.from_ratio([50, 30], 0.2, "cpu")
    x = torch.randn(80, 16, dtype=torch.bfloat16)
    w, c, _ = kernel_select.exact_case(x, images, seed=0)
    good = lambda x, w, c: kernel_select.per_image_chain(  # noqa: E731
        kernel_select._one_image, images, x, w, c
    )
    assert kernel_select.check_exact(good, x, w, c, images) is None

    def off_by_one(x, w, c):
        rows, idx = good(x, w, c)
        return rows, idx.flip(0)

    assert "indices differ" in kernel_select.check_exact(off_by_one, x, w, c, images)


def test_kernel_select_cpu_smoke(tmp_path, capsys):
    argv = [
        "--allow-cpu",
        "--threads",
        "1",
        "--tokens",
        "7,64,100",
        "--hidden",
        "40",
        "--images",
        "1,3",
        "--repeat",
        "3",
        "--peak-gbps",
        "50",
        "--out",
        str(tmp_path),
    ]
    assert kernel_select.main(argv) == 0
    out = capsys.readouterr().out
    assert "fused_triton: not timed on the CPU" in out
    assert "checked for correctness in the interpreter" in out  # conftest: TRITON_INTERPRET=1
    assert "flashinfer: skipped" in out
    assert "FAILED" not in out

    fields, rows = _read_csv(tmp_path, "kernel_select")
    assert fields[:8] == [
        "device",
        "dtype",
        "hidden",
        "images",
        "tokens_per_image",
        "keep_ratio",
        "kept_per_image",
        "impl",
    ]
    for col in ("verified", "overlap", "median_us", "gbps", "peak_gbps", "pct_peak", "timer"):
        assert col in fields
    timed = ("eager", "compiled", "torch_batched")
    assert len(rows) == 3 * 2 * len(timed)  # sizes x batches x implementations timed on the CPU
    assert {r["impl"] for r in rows} == set(timed)
    for r in rows:
        n = int(r["tokens_per_image"])
        assert int(r["kept_per_image"]) == num_kept_tokens(n, 0.2)
        assert r["verified"] == "True" and float(r["overlap"]) >= 0.9
        assert float(r["median_us"]) > 0 and float(r["gbps"]) > 0
        assert float(r["pct_peak"]) == pytest.approx(100 * float(r["gbps"]) / 50, rel=0.01)
        assert r["timer"] == "perf_counter" and r["fused_speedup"] == ""


def test_kernel_select_refuses_cpu_without_flag(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert kernel_select.main(["--out", str(tmp_path)]) == 2


# -- hf_prefill ---------------------------------------------------------------------------------


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
        "2",
        "--out",
        str(tmp_path),
    ]
    assert hf_prefill.main(argv) == 0
    out = capsys.readouterr().out
    assert "paper: 1.73x" in out and "select kernel backend: torch" in out

    fields, rows = _read_csv(tmp_path, "hf_prefill_tiny")
    for col in (
        "image_px",
        "visual_tokens",
        "keep_ratio",
        "kept_tokens",
        "prompt_len_full",
        "prompt_len_kept",
        "whole_ms",
        "vit_ms",
        "select_ms",
        "inputs_ms",
        "llm_ms",
        "peak_mem_mib",
        "speedup",
        "speedup_limit",
        "paper_speedup",
    ):
        assert col in fields
    assert len(rows) == 2 * 3
    assert {(int(r["image_px"]), float(r["keep_ratio"])) for r in rows} == {
        (px, r) for px in (112, 224) for r in (1.0, 0.5, 0.2)
    }
    geometry = hf_prefill.tiny_geometry()
    text = hf_prefill.PREFIX_TOKENS + hf_prefill.QUESTION_TOKENS + 2  # + vision start/end
    for r in rows:
        n, ratio = int(r["visual_tokens"]), float(r["keep_ratio"])
        assert n == (int(r["image_px"]) // 28) ** 2
        k = int(r["kept_tokens"])
        assert k == num_kept_tokens(n, ratio)
        full, kept = int(r["prompt_len_full"]), int(r["prompt_len_kept"])
        assert full == text + n and kept == text + k
        assert (kept == full) if ratio == 1.0 else (0 < kept < full)
        for col in (
            "whole_ms",
            "vit_ms",
            "select_ms",
            "inputs_ms",
            "llm_ms",
            "speedup",
            "speedup_limit",
        ):
            assert float(r[col]) > 0, (col, r)
        assert r["peak_mem_mib"] == ""  # CUDA only
        kv = hf_prefill.kv_cache_bytes_per_token(geometry, torch.float32) * kept / 2**20
        assert float(r["kv_cache_mib"]) == pytest.approx(kv, rel=1e-3)
        if ratio == 1.0:
            assert float(r["speedup"]) == 1.0
        assert r["paper_speedup"] == ("1.73" if ratio == 0.2 else "")
