"""The package layout: ``kernels/`` is installed as ``vs_vllm.kernels`` (editable and normal
installs), the console script exists, and product code has no host-device syncs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vs_vllm.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_folder():
    assert Path(vs_vllm.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_no_top_level_kernels_package_installed_by_us():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import vs_vllm.kernels, importlib.util as u; "
            "s = u.find_spec('kernels'); print(s.origin if s else None)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    origin = out.stdout.strip()
    assert origin == "None" or not origin.startswith(str(ROOT)), origin


@pytest.mark.slow
def test_normal_install_has_vs_vllm_kernels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("vs_vllm", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
    )
    assert (target / "vs_vllm" / "kernels" / "score_select_triton.py").is_file()
    assert not (target / "kernels").exists()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import vs_vllm.kernels as k; "
        "print(k.__file__); from vs_vllm.kernels import score_select"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip().startswith(str(target / "vs_vllm" / "kernels"))


def test_console_script_installed():
    script = Path(sys.executable).with_name("vs-vllm")
    assert script.is_file()
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout


SYNC = re.compile(r"\.item\(\)|\.tolist\(\)|\.nonzero\(|\.cpu\(\)|torch\.nonzero\(")


def test_no_host_device_sync_in_product_code():
    """The selection path must not stall the GPU: any sync in product code is marked
    ``# ok-sync`` with a reason (CPU-only reference, CLI output)."""
    offenders = []
    for path in [*ROOT.joinpath("vs_vllm").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]:
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if SYNC.search(line) and "# ok-sync" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_kernel_select_benchmark_runs(tmp_path):
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
