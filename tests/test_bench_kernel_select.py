"""CPU smoke tests of benchmarks/kernel_select.py (tiny sizes).

No GPU: it times the torch paths only (the Triton kernel is checked for correctness in the
interpreter, not timed).
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import kernel_select
from vs_vllm.batch import PackedImages
from vs_vllm.selection import num_kept_tokens

ROOT = Path(__file__).resolve().parents[1]


def _read_csv(tmp_path, name):
    (path,) = tmp_path.glob(f"*/{name}.csv")
    assert path.with_suffix(".png").stat().st_size > 0
    with path.open() as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


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


def _serving_floor_bytes(b, n, k, d, itemsize):
    """The serving step's floor, written out term by term (S = W = D)."""
    return (
        b * n * d * itemsize  # fold: x[:, :S] read once (chunk sums)
        + 2 * (math.ceil(b * n / 256) + b) * d * 4  # fold scratch written + read, fp32
        + b * 2 * (d // 2) * d * 4  # each image reads both (S/2, S) fp32 scorer matrices
        + b * n * d * itemsize  # score: x[:, :S] read again
        + b * n * 4  # the fp32 scores written
        + 5 * b * n * 4  # select: the scores read five times
        + 2 * b * k * d * itemsize  # gather: kept rows read + written
        + b * k * 8 * itemsize  # the 8 position channels written
    )


def test_serving_floor_counts_every_pass():
    from vs_vllm.kernels.fold_triton import GPU_FOLD_PLAN

    assert GPU_FOLD_PLAN.chunk == kernel_select.FOLD_CHUNK
    # 1 x 1024, bf16, D = 3584, keep 0.2 (k = 204): the numbers of kernels/NOTES.md.
    got = kernel_select.serving_floor_bytes([1024], [204], 3584, 3584, 2)
    assert got == _serving_floor_bytes(1, 1024, 204, 3584, 2) == 69_156_032
    assert kernel_select.issue16_floor_bytes([1024], [204], 3584, 2) == (1024 + 204) * 3584 * 2
    # 32 x 16384: the weights are read per image, the scratch has one spare row per image.
    got = kernel_select.serving_floor_bytes([16384] * 32, [3276] * 32, 3584, 3584, 2)
    assert got == _serving_floor_bytes(32, 16384, 3276, 3584, 2)
    # a scored width narrower than the rows: the gather moves whole rows, the fold S columns
    narrow = kernel_select.serving_floor_bytes([100], [20], 64, 32, 2)
    assert (
        narrow
        == (2 * 100 * 32 * 2 + 2 * (1 + 1) * 32 * 4 + 2 * 16 * 32 * 4 + 6 * 100 * 4)
        + 2 * 20 * 64 * 2
        + 20 * 8 * 2
    )


@pytest.mark.parametrize(
    ("n", "grid"), [(1024, (1, 64, 64)), (7, (1, 2, 14)), (1296, (1, 72, 72)), (8, (1, 4, 8))]
)
def test_media_grid_has_the_benchmark_tokens(n, grid):
    assert kernel_select.media_grid(n) == grid
    assert grid[1] * grid[2] // kernel_select.MERGE**2 == n


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exact_scorer_folds_to_the_exact_case_direction(backend):
    images = PackedImages.from_ratio([50, 30], 0.2, "cpu")
    x = torch.randn(80, 16, dtype=torch.bfloat16)
    kernel_select.exact_case(x, images, seed=0)
    scorer = kernel_select.exact_scorer(16, torch.device("cpu"), seed=1)
    step = kernel_select.ServingStep(images, scorer, backend, 16)
    w, c = step.fold(x, images)
    assert (w[:, 1] > 0).all() and torch.equal(w[:, 0], 256 * w[:, 1])
    assert not w[:, 2:].any() and not c.any()


def _exact_serving_case(backend="torch"):
    images = PackedImages.from_ratio([50, 30], 0.2, "cpu")
    x = torch.randn(80, 16, dtype=torch.bfloat16)
    w, c, _ = kernel_select.exact_case(x, images, seed=0)
    ref = kernel_select.score_select_reference(
        x, images.cu_seqlens, images.keep_counts, images.total_kept, w, c
    )
    scorer = kernel_select.exact_scorer(16, torch.device("cpu"), seed=1)
    return images, x, ref, kernel_select.ServingStep(images, scorer, backend, 16)


def test_serving_check_catches_wrong_rows_indices_and_channels():
    images, x, ref, step = _exact_serving_case()
    assert kernel_select.check_serving(step, x, images, ref) is None

    class Broken:
        def __init__(self, edit):
            self.items, self.edit = step.items, edit

        def __call__(self, x):
            outs = [o.clone() for o in step(x)]
            self.edit(outs)
            return outs

    def swap_rows(outs):
        outs[1][[0, 1], :16] = outs[1][[1, 0], :16]

    def shift_w(outs):  # the w position's low byte of one kept token: another index
        outs[0][0, 16 + 5] += 1

    def wrong_extent(outs):  # the c channel only: the indices still decode right
        outs[0][0, 16 + 7] += 1

    def drop_channels(outs):
        outs[0] = outs[0][:, :16]

    check = kernel_select.check_serving
    assert "kept rows differ" in check(Broken(swap_rows), x, images, ref)
    assert "kept indices" in check(Broken(shift_w), x, images, ref)
    assert "position channels differ" in check(Broken(wrong_extent), x, images, ref)
    assert "output shapes" in check(Broken(drop_channels), x, images, ref)


def test_fold_check_compares_with_the_torch_fold():
    images = PackedImages.from_ratio([50, 30], 0.2, "cpu")
    x = torch.randn(80, 16, dtype=torch.bfloat16)
    scorer = kernel_select.random_scorer(16, torch.device("cpu"), seed=3)
    step = kernel_select.ServingStep(images, scorer, "triton", 16)
    torch_step = kernel_select.ServingStep(images, scorer, "torch", 16)
    assert kernel_select.check_fold(step, torch_step, x, images) is None

    class Off:
        def __init__(self, dw, dc):
            self.dw, self.dc = dw, dc

        def fold(self, x, images):
            w, c = torch_step.fold(x, images)
            return w + self.dw * w.abs().max(), c + self.dc * w.abs().max()

    assert "fold w differs" in kernel_select.check_fold(Off(1e-3, 0), torch_step, x, images)
    assert "fold c differs" in kernel_select.check_fold(Off(0, 1e-3), torch_step, x, images)
    assert kernel_select.check_fold(Off(1e-6, 1e-6), torch_step, x, images) is None


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
    interpreted = "would run in the interpreter (checked for correctness in the interpreter)"
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    for impl in ("fused_triton", "serving_step"):  # conftest: TRITON_INTERPRET=1
        (line,) = [n for n in notes if n.startswith(f"note: {impl}: not timed on the CPU")]
        assert line.endswith(interpreted), line
    assert "flashinfer: skipped" in out
    assert "FAILED" not in out
    # every exact check ran and passed: 3 sizes x 2 batches, the Triton rows in the interpreter
    (checks,) = [line for line in out.splitlines() if line.startswith("exact checks passed:")]
    for impl in ("serving_step", "fused_triton", "serving_torch", "eager", "torch_batched"):
        assert f" {impl} 6/6" in checks, checks

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
    for col in (
        "verified",
        "overlap",
        "median_us",
        "first_call_us",
        "gbps",
        "peak_gbps",
        "pct_peak",
        "floor_us",
        "serving_floor_us",
        "x_serving_floor",
        "timer",
    ):
        assert col in fields
    timed = ("serving_torch", "eager", "compiled", "torch_batched")
    assert len(rows) == 3 * 2 * len(timed)  # sizes x batches x implementations timed on the CPU
    assert {r["impl"] for r in rows} == set(timed)
    for r in rows:
        n, b = int(r["tokens_per_image"]), int(r["images"])
        k = int(r["kept_per_image"])
        assert k == num_kept_tokens(n, 0.2)
        assert r["verified"] == "True" and float(r["overlap"]) >= 0.9
        if r["impl"] == "serving_torch":  # the same fold and select as its reference
            assert float(r["overlap"]) == 1.0
        assert float(r["median_us"]) > 0 and float(r["gbps"]) > 0
        assert float(r["first_call_us"]) > 0  # every timed row: its first call on a new layout
        assert float(r["pct_peak"]) == pytest.approx(100 * float(r["gbps"]) / 50, rel=0.01)
        assert r["timer"] == "perf_counter" and r["fused_speedup"] == ""
        # The floors: the point's bytes at the copy rate measured in the same run.
        nbytes = b * (n + k) * 40 * 2
        copy = float(r["copy_gbps"])
        assert copy > 0 and r["copy_gbps"] == rows[0]["copy_gbps"]
        assert float(r["floor_us"]) == pytest.approx(nbytes / (copy * 1e3), rel=0.02, abs=0.01)
        assert float(r["x_floor"]) == pytest.approx(
            float(r["median_us"]) / float(r["floor_us"]), rel=0.02
        )
        srv = _serving_floor_bytes(b, n, k, 40, 2)
        assert float(r["serving_floor_us"]) == pytest.approx(srv / (copy * 1e3), rel=0.01)
        # the same copy rate: the floors' ratio is their bytes' ratio (4 digits each)
        ratio = float(r["serving_floor_us"]) / float(r["floor_us"])
        assert ratio == pytest.approx(srv / nbytes, rel=1e-3)
        assert float(r["serving_floor_us"]) > float(r["floor_us"])
        assert float(r["x_serving_floor"]) == pytest.approx(
            float(r["median_us"]) / float(r["serving_floor_us"]), rel=1e-3
        )
        # Targets are judged on fused rows only (none is timed on the CPU).
        assert r["target"] == r["meets_target"] == r["faster_than_peers"] == ""
    assert "copy rate (floor):" in out
    assert "first call: per point, on a batch layout never seen before" in out
    assert "targets: no fused row was timed here" in out


def test_kernel_select_reports_a_wrong_serving_step(tmp_path, capsys, monkeypatch):
    """A Triton serving step that writes one wrong position channel: reported, not timed, and
    the run fails; the torch serving row is unaffected."""
    real = kernel_select.select_media

    def wrong_on_triton(x, items, strategy, **kw):
        outs = real(x, items, strategy, **kw)
        if strategy.backend == "triton":
            outs[0][0, -3] += 1  # the w position's low byte of the first kept token
        return outs

    monkeypatch.setattr(kernel_select, "select_media", wrong_on_triton)
    argv = ["--allow-cpu", "--tokens", "64", "--hidden", "40", "--images", "2"]
    argv += ["--impls", "serving_step,serving_torch", "--repeat", "2", "--out", str(tmp_path)]
    assert kernel_select.main(argv) == 1
    out = capsys.readouterr().out
    assert "FAILED D=40 B=2 N=64 serving_step: kept indices" in out
    assert "serving_torch:" not in out.split("FAILED", 1)[1].splitlines()[0]
    assert "exact checks passed: serving_torch 1/1, serving_step 0/1" in out
    _, rows = _read_csv(tmp_path, "kernel_select")
    assert [r["impl"] for r in rows] == ["serving_torch"]


def test_warmup_tokens_are_not_in_the_sweep():
    assert kernel_select.warmup_tokens([16, 17, 64]) == 18
    assert kernel_select.warmup_tokens([1024]) == 16


@pytest.mark.parametrize(
    ("images", "tokens", "target"),
    [
        (1, 1024, ("us", 25.0)),
        (8, 1024, ("x_floor", 2.5)),
        (1, 16384, ("x_floor", 2.5)),
        (2, 16384, ("x_floor", 1.5)),
        (32, 16384, ("x_floor", 1.5)),
        (1, 4096, None),
        (8, 256, None),
    ],
)
def test_issue_targets_by_batch(images, tokens, target):
    assert kernel_select.target_of(images, tokens) == target


def test_fused_rows_are_judged_against_the_targets_and_the_peers():
    def row(impl, images, tokens, us, x_floor):
        return {
            "impl": impl,
            "images": images,
            "tokens_per_image": tokens,
            "median_us": us,
            "x_floor": x_floor,
            "target": "",
            "meets_target": "",
            "faster_than_peers": "",
        }

    small = [
        row("fused_triton", 1, 1024, 30.0, 9.0),
        row("fused_graph", 1, 1024, 20.0, 6.0),
        row("eager", 1, 1024, 161.0, 50.0),
        row("torch_batched", 1, 1024, 25.0, 8.0),
    ]
    kernel_select.judge(small)
    assert [r["target"] for r in small] == ["<=25us", "<=25us", "", ""]
    assert [r["meets_target"] for r in small] == ["no", "yes", "", ""]
    assert [r["faster_than_peers"] for r in small] == ["no", "yes", "", ""]
    big = [
        row("fused_triton", 32, 16384, 1000.0, 1.4),
        row("torch_batched", 32, 16384, 1450.0, 2.0),
    ]
    kernel_select.judge(big)
    assert big[0]["target"] == "<=1.5x floor" and big[0]["meets_target"] == "yes"
    assert big[0]["faster_than_peers"] == "yes"
    big[0]["x_floor"] = 1.6
    kernel_select.judge(big)
    assert big[0]["meets_target"] == "no"


def test_serving_step_is_judged_against_its_own_floor():
    def row(impl, images, tokens, us, x_floor, x_serving_floor):
        return {
            "impl": impl,
            "images": images,
            "tokens_per_image": tokens,
            "median_us": us,
            "x_floor": x_floor,
            "x_serving_floor": x_serving_floor,
            "target": "",
            "meets_target": "",
            "faster_than_peers": "",
        }

    big = [
        row("serving_step", 32, 16384, 2600.0, 2.5, 1.3),
        row("fused_triton", 32, 16384, 1500.0, 1.45, 0.75),
        row("torch_batched", 32, 16384, 1450.0, 1.4, 0.7),
        row("serving_torch", 32, 16384, 9000.0, 8.5, 4.5),
    ]
    kernel_select.judge(big)
    assert [r["target"] for r in big] == ["<=1.5x serving floor", "<=1.5x floor", "", ""]
    assert [r["meets_target"] for r in big] == ["yes", "yes", "", ""]
    assert [r["faster_than_peers"] for r in big] == ["no", "no", "", ""]
    big[0]["x_serving_floor"] = 1.6
    kernel_select.judge(big)
    assert big[0]["meets_target"] == "no"
    small = [row("serving_step", 1, 1024, 24.0, 10.0, 1.1), row("eager", 1, 1024, 160.0, 60, 7)]
    kernel_select.judge(small)
    assert small[0]["target"] == "<=25us" and small[0]["meets_target"] == "yes"
    assert small[0]["faster_than_peers"] == "yes"


def test_kernel_select_refuses_cpu_without_flag(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert kernel_select.main(["--out", str(tmp_path)]) == 2


def test_kernel_select_runs_as_a_script(tmp_path):
    """``python benchmarks/kernel_select.py`` (the command the docs give), in a subprocess."""
    script = ROOT / "benchmarks" / "kernel_select.py"
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            "--allow-cpu",
            "--threads",
            "1",
            "--impls",
            "eager,torch_batched",
            "--tokens",
            "7,64",
            "--images",
            "1,3",
            "--hidden",
            "40",
            "--repeat",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "eager" in out.stdout and "torch_batched" in out.stdout
    (csv_path,) = tmp_path.glob("*/kernel_select.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("device,dtype,hidden,images,tokens_per_image")
    assert len(lines) == 1 + 2 * 2 * 2  # header + sizes x batches x impls
    assert (csv_path.parent / "kernel_select.png").is_file()
