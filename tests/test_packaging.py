"""The package layout: ``kernels/`` is installed as ``vs_vllm.kernels`` (editable and normal
installs), the console script exists, and product code has no host-device syncs."""

from __future__ import annotations

import ast
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


def _copy_source(tmp_path: Path) -> Path:
    """What ``pip install`` of the package needs (setup.py, README, the two packages), and the
    tiny test models' folder as a clone has it next to them (it must not be installed)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("vs_vllm", "kernels", "tiny_models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    return src


@pytest.mark.slow
def test_normal_install_has_vs_vllm_kernels(tmp_path):
    src = _copy_source(tmp_path)
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
    # the tiny random-weight test models stay in the source tree (tests and benchmarks only)
    assert not (target / "tiny_models").exists()
    assert not [p for p in target.rglob("tiny_qwen*")], list(target.rglob("tiny_qwen*"))
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


def test_tiny_models_are_not_a_package_of_the_distribution():
    """setup.py's packages are vs_vllm and its subpackages: the tiny test models' folder at the
    root of the clone is not among them (the normal install above checks the installed tree)."""
    from setuptools import find_packages

    assert (ROOT / "tiny_models" / "tiny_qwen.py").is_file()
    (call,) = [
        n
        for n in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "find_packages"
    ]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    packages = find_packages(str(ROOT), **kwargs)
    assert "vs_vllm" in packages
    assert not [p for p in packages if "tiny" in p or "testing" in p], packages


def test_console_script_installed():
    script = Path(sys.executable).with_name("vs-vllm")
    assert script.is_file()
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout


SYNC = re.compile(
    r"\.item\(\)|\.tolist\(\)|\.nonzero\(|\.cpu\(\)|torch\.nonzero\("
    r"|\.to\(\s*(device\s*=\s*)?(torch\.device\()?[\"']cpu[\"']"
)
#: ``int(t)`` / ``float(t)`` / ``bool(t)`` of what is likely a tensor: an element
#: (``t[i]``, not ``t.shape[i]``), a reduction or a ``torch.*`` call, a field's ``.data``.
_REDUCTIONS = {
    "sum", "max", "min", "mean", "norm", "any", "all", "argmax", "argmin", "prod", "amax",
    "amin", "count_nonzero", "dot", "std", "var", "median",
}  # fmt: skip


def _scalar_of_tensor(node: ast.AST) -> bool:
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("int", "float", "bool")
        and len(node.args) == 1
    ):
        return False
    arg = node.args[0]
    if isinstance(arg, ast.Subscript):
        return not (isinstance(arg.value, ast.Attribute) and arg.value.attr == "shape")
    if isinstance(arg, ast.Attribute):
        return arg.attr == "data"
    if isinstance(arg, ast.Call):
        root = arg.func
        if isinstance(root, ast.Attribute) and root.attr in _REDUCTIONS:
            return True
        while isinstance(root, ast.Attribute):
            root = root.value
        return isinstance(root, ast.Name) and root.id == "torch"
    return False


def host_syncs(source: str) -> list[tuple[int, str]]:
    """Lines of ``source`` that may wait for the device, unless the statement holding them
    says ``# ok-sync`` (with a reason): ``.item()``, ``.tolist()``, ``.cpu()``,
    ``.to("cpu")``, ``.to(device="cpu")``, nonzero, and ``int()`` / ``float()`` / ``bool()``
    of a tensor."""
    lines = source.splitlines()
    tree = ast.parse(source)
    spans = [
        (n.lineno, n.end_lineno or n.lineno) for n in ast.walk(tree) if isinstance(n, ast.stmt)
    ]
    hits = {no for no, line in enumerate(lines, 1) if SYNC.search(line.split("#")[0])}
    hits |= {n.lineno for n in ast.walk(tree) if _scalar_of_tensor(n)}
    offenders = []
    for no in sorted(hits):
        first, last = min((s for s in spans if s[0] <= no <= s[1]), key=lambda s: s[1] - s[0])
        if not any("# ok-sync" in lines[i - 1] for i in range(first, last + 1)):
            offenders.append((no, lines[no - 1].strip()))
    return offenders


def test_no_host_device_sync_in_product_code():
    """The selection path must not stall the GPU: any sync in product code is marked
    ``# ok-sync`` with a reason (CPU-only reference, CLI output)."""
    offenders = [
        f"{path.relative_to(ROOT)}:{no}: {line}"
        for path in [
            *ROOT.joinpath("vs_vllm").rglob("*.py"),
            *ROOT.joinpath("kernels").rglob("*.py"),
        ]
        for no, line in host_syncs(path.read_text())
    ]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    "line",
    [
        "n = x.sum().item()",
        "v = t.tolist()",
        "h = t.cpu()",
        'h = t.to("cpu")',
        "h = t.to('cpu', non_blocking=True)",
        'h = t.to(device="cpu")',
        'h = t.to(torch.device("cpu"))',
        "n = int(cu[-1])",
        "f = float(scores.max())",
        "b = bool((ids == 3).any())",
        "n = int(torch.count_nonzero(mask))",
        "r = float(field.data)",
        "i = t.nonzero()",
    ],
)
def test_the_sync_lint_finds_each_form(line):
    assert host_syncs(f"{line}\n") == [(1, line)]
    assert host_syncs(f"{line}  # ok-sync: a reason\n") == []
    assert host_syncs(f"x = f(\n    {line.split('= ', 1)[1]},\n)  # ok-sync: a reason\n") == []


def test_the_sync_lint_leaves_host_ints_alone():
    source = "n = int(x.shape[0])\nk = int(n * 0.3)\nr = float(text)\nd = t.to(x.device)\n"
    assert host_syncs(source) == []


def _declared_closure(name: str) -> set[str]:
    """Normalized names of ``name``'s requirements (no extras), transitively, as installed."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        try:
            reqs = requires(current) or []
        except PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


@pytest.mark.slow
def test_train_runs_with_only_the_declared_dependencies(
    tiny_training_set, tiny_model_dir, tmp_path
):
    """A fresh virtual environment holding vs-vllm (no extras) and exactly the distributions its
    ``install_requires`` pull in, transitively (linked from this environment: no download; the
    CUDA torch wheel PyPI would give is several GB), runs a 2-step ``vs-vllm train`` on the
    tiny model. An import of anything undeclared (matplotlib, triton, vllm, ...) fails it."""
    from importlib.metadata import distributions

    from packaging.utils import canonicalize_name

    wanted = _declared_closure("vs-vllm")
    assert {"torch", "transformers", "pillow", "safetensors", "numpy", "tqdm"} <= wanted
    deps = tmp_path / "deps"
    deps.mkdir()
    linked = set()
    for dist in distributions():
        if canonicalize_name(dist.metadata["Name"]) not in wanted:
            continue
        for file in dist.files or ():
            top = file.parts[0]
            if top in ("..", "bin", "__pycache__") or top in linked:
                continue
            source = Path(dist.locate_file(top))
            if source.exists():
                (deps / top).symlink_to(source)
                linked.add(top)
    src = _copy_source(tmp_path)
    package = tmp_path / "package"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(package), str(src)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "deps.pth").write_text(f"{package}\n{deps}\n")
    code = (
        "import sys\n"
        "from vs_vllm.cli import main\n"
        "main(sys.argv[1:])\n"
        "print('IMPORTED', ' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = tmp_path / "out"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(tiny_training_set)]
    args += ["--image-root", str(tiny_training_set.parent), "--out", str(out)]
    args += ["--max-steps", "2", "--global-batch", "2", "--micro-batch", "1", "--no-progress"]
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every module the run imported belongs to the standard library, vs-vllm or a declared
    # distribution (so nothing was found by accident outside the links)
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("IMPORTED ")]
    undeclared = {
        module: owners[module]
        for module in line.split()[1:]
        if module in owners
        and module != "vs_vllm"
        and not {canonicalize_name(d) for d in owners[module]} & wanted
    }
    assert not undeclared, undeclared
    assert "matplotlib" not in line.split() and "vllm" not in line.split()
    assert "note: matplotlib is not installed" in proc.stdout
    assert (out / "vision_selector.safetensors").is_file()
    assert (out / "vision_selector.json").is_file()
