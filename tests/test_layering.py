"""The shape of the tree, checked from the source (no imports run):

- imports inside ``vs_vllm`` form no cycle, lazy ones (inside functions) included: a lazy
  import only hides a circle;
- only ``vs_vllm/vllm_plugin`` imports vLLM; ``vs_vllm/models`` imports neither vLLM nor
  transformers at module level (it names their classes by import path);
- no code outside the adapters (``vs_vllm/models``) names a model family: no identifier or
  string constant mentions Qwen (docstrings and comments may; the tiny test models live in
  ``tiny_models/``, outside the package), names a multimodal field any adapter declares, or
  calls a private method of a vLLM model class;
- nothing under ``vs_vllm`` or ``kernels`` imports ``tiny_models`` (not installed) or
  ``benchmarks`` (not installed either);
- a test imports no benchmark but its own: ``tests/test_bench_<name>.py`` or
  ``tests/test_<name>.py`` is the smoke test of ``benchmarks/<name>.py`` and may import it and
  the benchmarks' shared helpers (the modules of ``benchmarks/`` with no ``__main__`` block:
  device_name, results_name, ...); any other test, and the test helpers (``conftest.py``,
  ``tests/engine/``), import nothing from ``benchmarks/``. What a test needs from a benchmark
  lives in the product (``vs_vllm.local_server``), ``tiny_models`` or ``tests/``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A model family by name (Qwen2_5_VL..., qwen3_vl, Qwen3.5); "Qwen's chat format" is a data
# format, not a family.
FAMILY = re.compile(r"qwen\d", re.IGNORECASE)
PACKAGE = ROOT / "vs_vllm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def _top_level_imports(tree: ast.Module) -> set[str]:
    """Imports executed at import time (module body, not inside functions; TYPE_CHECKING
    blocks skipped)."""
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else ():
            if isinstance(sub, ast.Import):
                out.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module and not sub.level:
                out.add(sub.module)
                out.update(f"{sub.module}.{a.name}" for a in sub.names)
    return out


def _all_imports(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for sub in ast.walk(tree):
        if isinstance(sub, ast.Import):
            out.update(a.name for a in sub.names)
        elif isinstance(sub, ast.ImportFrom) and sub.module and not sub.level:
            out.add(sub.module)
            out.update(f"{sub.module}.{a.name}" for a in sub.names)
    return out


def test_no_import_cycle_in_vs_vllm():
    modules = _modules()
    graph = {
        name: {dep for dep in _all_imports(tree) if dep in modules and dep != name}
        for name, tree in modules.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep] if dep in stack else [node, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_only_the_plugin_imports_vllm_and_adapters_import_neither():
    for name, tree in _modules().items():
        deps = _top_level_imports(tree)
        if not name.startswith("vs_vllm.vllm_plugin"):
            assert not any(d == "vllm" or d.startswith("vllm.") for d in deps), name
        if name.startswith("vs_vllm.models"):
            assert not any(d.split(".")[0] in ("vllm", "transformers") for d in deps), name


def _code_names(tree: ast.Module) -> list[str]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
        elif isinstance(node, (ast.alias, ast.FunctionDef | ast.ClassDef)):
            names.append(node.name)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            names.append(node.value)
    return names


def test_no_family_named_outside_the_adapters():
    allowed = ("vs_vllm.models",)
    offenders = {}
    for name, tree in _modules().items():
        if name.startswith(allowed):
            continue
        hits = [n for n in _code_names(tree) if FAMILY.search(n)]
        if hits:
            offenders[name] = hits
    assert not offenders, offenders


def _model_private_methods() -> set[str]:
    """The private methods of vLLM's model classes that selection needs (the model entries of
    ``private_surface``), and any other ``_parse_and_validate_*`` / ``_process_*_input``."""
    from vs_vllm.vllm_plugin.private_surface import PRIVATE_SURFACE

    return {u.name for u in PRIVATE_SURFACE if u.role == "model" and u.kind == "method"}


_PRIVATE_MODEL_METHOD = re.compile(r"^_(parse_and_validate_\w+|process_\w+_input)$")


def _field_uses(tree: ast.Module, fields: set[str]) -> list[str]:
    """Where code names one of ``fields``: a string constant (not a docstring), an attribute,
    a keyword argument or a parameter."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    hits = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.JoinedStr):  # f"{modality}_grid_thw": a field by pattern
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if len(text.strip(" _:,.-")) < 3:
                continue
            pattern = "".join(
                re.escape(v.value) if isinstance(v, ast.Constant) else ".*" for v in node.values
            )
            hits += [f"{node.lineno}: f-string {f}" for f in fields if re.fullmatch(pattern, f)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = None if id(node) in docstrings else node.value
        elif isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.keyword | ast.arg):
            name = node.arg
        elif isinstance(node, ast.Name):
            name = node.id
        if name is not None and (name in fields or any(f in name for f in fields if "_" in f)):
            hits.append(f"{getattr(node, 'lineno', '?')}: {name}")
    return hits


def test_no_model_field_or_private_model_method_outside_the_adapters():
    """Every family detail lives in its adapter: no other module of the package names a
    multimodal field of any family (the processor outputs the adapters declare, e.g. pixel
    and grid fields), and none calls a private method of a vLLM model class (those calls go
    through ``ModelAdapter.vllm_media_inputs`` / ``vllm_tower_rows``)."""
    from vs_vllm.models import adapters

    fields = {name for adapter in adapters() for name in adapter.field_names()}
    assert {"pixel_values", "image_grid_thw"} <= fields  # the check sees real field names
    methods = _model_private_methods()
    assert {"_process_image_input", "_parse_and_validate_multimodal_inputs"} <= methods
    offenders = {}
    for name, tree in _modules().items():
        if name.startswith("vs_vllm.models"):
            continue
        hits = _field_uses(tree, fields)
        hits += [
            f"{node.lineno}: calls {node.func.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and (node.func.attr in methods or _PRIVATE_MODEL_METHOD.match(node.func.attr))
        ]
        if hits:
            offenders[name] = hits
    assert not offenders, offenders


def test_the_field_check_catches_each_form():
    fields = {"pixel_values", "image_grid_thw"}
    for source in (
        'x = batch["image_grid_thw"]',
        "x = batch.get(f'{modality}_grid_thw')",
        "f(image_grid_thw=grid)",
        "def g(pixel_values): pass",
        "y = out.pixel_values",
    ):
        assert _field_uses(ast.parse(source), fields), source
    assert not _field_uses(ast.parse('"""image_grid_thw in a docstring"""'), fields)
    call = ast.parse("self._process_video_input(x)").body[0].value
    assert _PRIVATE_MODEL_METHOD.match(call.func.attr)


def test_the_package_imports_nothing_that_is_not_installed():
    """``tiny_models/`` (the tiny random-weight test models), ``benchmarks/`` and ``tests/`` sit
    at the root of the clone and are not installed: product code cannot import them, lazily
    or not."""
    not_installed = ("tiny_models", "benchmarks", "tests")
    offenders = {
        str(path.relative_to(ROOT)): hits
        for path in [*PACKAGE.rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
        if (
            hits := sorted(
                d
                for d in _all_imports(ast.parse(path.read_text()))
                if d.split(".")[0] in not_installed
            )
        )
    }
    assert not offenders, offenders


BENCHMARKS = ROOT / "benchmarks"
#: Tests that may import a benchmark their name does not refer to: {test file: {module: why}}.
#: None today; an entry needs its reason.
BENCHMARK_IMPORT_EXCEPTIONS: dict[str, dict[str, str]] = {}


def _benchmark_modules() -> dict[str, bool]:
    """``benchmarks/<name>.py`` -> whether it is a script (has a ``__main__`` block) rather than
    a helper the scripts share."""
    return {
        path.stem: 'if __name__ == "__main__"' in path.read_text()
        for path in BENCHMARKS.glob("*.py")
        if path.stem != "__init__"
    }


def _subject(test_file: str, modules: dict[str, bool]) -> str | None:
    """The benchmark a test file is named for: ``test_bench_<name>.py`` or ``test_<name>.py``
    -> ``benchmarks/<name>.py`` when that exists."""
    stem = test_file.removesuffix(".py").removeprefix("test_")
    for name in (stem.removeprefix("bench_"), stem):
        if name in modules:
            return name
    return None


def _imported_benchmarks(tree: ast.Module, modules: dict[str, bool]) -> set[str]:
    """The modules of ``benchmarks/`` a file imports (``from benchmarks import x``, ``from
    benchmarks.x import y``, ``import benchmarks.x``, lazily or not); ``*`` for an import by a
    computed name (``__import__`` / ``importlib.import_module``)."""
    out = set()
    for dep in _all_imports(tree):
        parts = dep.split(".")
        if parts[0] == "benchmarks" and len(parts) > 1 and parts[1] in modules:
            out.add(parts[1])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("__import__", "importlib.import_module", "import_module")
            and node.args
            and "benchmarks" in ast.unparse(node.args[0])
        ):
            out.add("*")
    return out


def test_the_benchmark_subject_rule():
    modules = _benchmark_modules()
    assert modules["soak"] and modules["quality"] and not modules["device_name"]
    assert _subject("test_bench_quality.py", modules) == "quality"
    assert _subject("test_soak.py", modules) == "soak"
    assert _subject("test_selection_learning.py", modules) == "selection_learning"
    assert _subject("test_bench_results_name.py", modules) == "results_name"
    assert _subject("test_vllm_server.py", modules) is None
    found = _imported_benchmarks(
        ast.parse(
            "from benchmarks import soak\nimport benchmarks.quality as q\n"
            "def f():\n    from benchmarks.device_name import device_slug\n"
            "    return __import__(f'benchmarks.{x}')\n"
        ),
        modules,
    )
    assert found == {"soak", "quality", "device_name", "*"}


def test_tests_import_no_benchmark_but_their_own():
    modules = _benchmark_modules()
    helpers = {name for name, script in modules.items() if not script}
    offenders = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        imported = _imported_benchmarks(ast.parse(path.read_text()), modules)
        subject = _subject(path.name, modules) if path.name.startswith("test_") else None
        allowed = {subject, *helpers} if subject else set()
        allowed |= set(BENCHMARK_IMPORT_EXCEPTIONS.get(path.name, {}))
        if imported - allowed:
            offenders[str(path.relative_to(ROOT))] = sorted(imported - allowed)
    assert not offenders, offenders
