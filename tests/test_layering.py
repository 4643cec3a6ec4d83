"""The shape of the tree, checked from the source (no imports run):

- imports inside ``vs_vllm`` form no cycle, lazy ones (inside functions) included: a lazy
  import only hides a circle;
- only ``vs_vllm/vllm_plugin`` imports vLLM; ``vs_vllm/models`` imports neither vLLM nor
  transformers at module level (it names their classes by import path);
- no code outside the adapters (``vs_vllm/models``) names a model family: no identifier or
  string constant mentions Qwen (docstrings and comments may; the tiny test models live in
  ``tiny_models/``, outside the package);
- nothing under ``vs_vllm`` or ``kernels`` imports ``tiny_models`` (not installed) or
  ``benchmarks`` (not installed either).
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
