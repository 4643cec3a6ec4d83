"""The README's code blocks are real: every command's program exists, every flag it passes is
one the program's ``--help`` lists, every Python block compiles and its ``vs_vllm`` imports
import, every linked doc exists, and the README stays short (at most 300 lines).

Nothing here starts a server, trains or downloads: a command is checked through its program's
``--help`` (run once per program and cached). ``vllm`` itself does not run on the CPU build of
vLLM, so ``vllm serve`` flags are checked against ``vs-vllm serve``'s help, which is vLLM's own
serve parser with the plugin's flags. The same checks cover the fenced blocks of ``docs/*.md``,
where the README's details moved.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BIN = Path(sys.executable).parent
MAX_LINES = 300

SHELL_LANGS = {"bash", "sh", "console", "shell"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
OPERATORS = {"&&", "||", ";", "|", "&"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FLAG = re.compile(r"--[A-Za-z0-9](?:[\w-]*[A-Za-z0-9])?")
# `scripts/run.sh ARGS` hands ARGS to `vs-vllm quickstart`; `scripts/test.sh ARGS` to pytest.
SCRIPT_ARGS_GO_TO = {"scripts/run.sh": ("quickstart",)}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(path: Path, langs: set[str]) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(path.read_text()) if m.group(1) in langs]


def _logical_lines(block: str, console: bool) -> list[str]:
    """One string per command line: backslash continuations joined; in a console block only
    the ``$ `` lines (their output is not a command)."""
    joined = re.sub(r"\\\n", " ", block)
    lines = []
    for line in joined.splitlines():
        line = line.strip()
        if console:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at ``&&``, ``;``, ``|`` ...), comments
    dropped and leading ``VAR=value`` assignments removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token in OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    out = []
    for argv in commands:
        while argv and ASSIGNMENT.match(argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def _checked(argv: list[str]) -> bool:
    """Whether the command is one this module checks (the project's own programs)."""
    prog = argv[0]
    if prog in ("vs-vllm", "vllm") or prog.startswith("scripts/"):
        return True
    return prog in ("python", "python3") and len(argv) > 1 and argv[1].startswith("benchmarks/")


def _shell_commands(paths: list[Path]) -> list[tuple[str, list[str]]]:
    found = []
    for path in paths:
        for lang in SHELL_LANGS:
            for block in _blocks(path, {lang}):
                for line in _logical_lines(block, console=lang == "console"):
                    for argv in _commands(line):
                        if _checked(argv):
                            found.append((_rel(path), argv))
    return found


README_COMMANDS = _shell_commands([README])
DOC_COMMANDS = _shell_commands(DOCS)
PYTHON_BLOCKS = [
    (_rel(path), i, block)
    for path in [README, *DOCS]
    for i, block in enumerate(_blocks(path, {"python"}))
]


def _id(item: tuple[str, list[str]]) -> str:
    where, argv = item
    return f"{where}:{' '.join(argv)[:60]}"


def _run(argv: list[str], cwd: Path = ROOT) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@functools.cache
def _vs_vllm_help(*subcommand: str) -> str:
    """``vs-vllm SUBCOMMAND --help`` (run once per subcommand)."""
    return _run([str(BIN / "vs-vllm"), *subcommand, "--help"])


@functools.cache
def _benchmark_help(script: str) -> str:
    return _run([sys.executable, script, "--help"])


@pytest.fixture(scope="module")
def serve_help() -> str:
    """vLLM's serve parser with the plugin's flags, as ``vs-vllm serve`` builds it. A model
    argument comes first: the serve subcommand passes everything after it to vLLM's parser."""
    return _vs_vllm_help("serve", "MODEL")


def _flags(args: list[str]) -> list[str]:
    return sorted({m.group(0) for arg in args for m in FLAG.finditer(arg.split("=", 1)[0])})


def _missing_flags(args: list[str], help_text: str) -> list[str]:
    return [
        f for f in _flags(args) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text)
    ]


def _check_command(argv: list[str], serve_help: str) -> None:
    prog, args = argv[0], argv[1:]
    if prog == "vllm":
        assert (BIN / "vllm").exists(), f"no vllm executable next to {sys.executable}"
        assert args and args[0] == "serve", f"only `vllm serve` is checked here: {argv}"
        help_text = serve_help
    elif prog == "vs-vllm":
        assert (BIN / "vs-vllm").exists(), f"no vs-vllm executable next to {sys.executable}"
        assert args, "vs-vllm needs a subcommand"
        if args[0] == "serve":
            help_text = serve_help
        elif args[0] == "bench":
            assert len(args) > 1, "vs-vllm bench needs a subcommand"
            help_text = _vs_vllm_help("bench", args[1])
        else:
            assert args[0] in _vs_vllm_help(), f"unknown vs-vllm subcommand {args[0]}"
            help_text = _vs_vllm_help(args[0])
    elif prog.startswith("scripts/"):
        script = ROOT / prog
        assert script.is_file(), f"{prog} does not exist"
        assert script.stat().st_mode & 0o111, f"{prog} is not executable"
        if script.suffix == ".sh":
            # Never run: each one sets up environments, starts servers or runs the suite.
            _run(["bash", "-n", str(script)])
        elif script.suffix == ".py":
            _run([sys.executable, "-m", "py_compile", str(script)])
        if prog not in SCRIPT_ARGS_GO_TO:
            return
        help_text = _vs_vllm_help(*SCRIPT_ARGS_GO_TO[prog])
    else:  # python benchmarks/<x>.py
        script = argv[1]
        assert (ROOT / script).is_file(), f"{script} does not exist"
        args = argv[2:]
        help_text = _benchmark_help(script)
    missing = _missing_flags(args, help_text)
    assert not missing, f"{' '.join(argv)}: flags not in its --help: {missing}"


def test_readme_has_commands_to_check():
    """The README's own commands are found (a broken block parser would check nothing)."""
    programs = {argv[0] for _, argv in README_COMMANDS}
    assert {"vllm", "vs-vllm", "scripts/run.sh", "scripts/test.sh"} <= programs, programs
    assert any(a[:2] == ["vllm", "serve"] for _, a in README_COMMANDS)
    assert any(a[0] == "python" for _, a in README_COMMANDS)


@pytest.mark.parametrize("item", README_COMMANDS, ids=_id)
def test_readme_command(item, serve_help):
    _check_command(item[1], serve_help)


@pytest.mark.parametrize("item", DOC_COMMANDS, ids=_id)
def test_docs_command(item, serve_help):
    _check_command(item[1], serve_help)


def test_readme_serve_flags_are_the_plugins(serve_help):
    """Every selection flag the README names anywhere (prose included) is in the serve help,
    and the plugin's flags are all documented in the README."""
    text = README.read_text()
    named = {f for f in FLAG.findall(text) if f.startswith(("--vision-", "--video-"))}
    assert named, "the README names no --vision-* / --video-* flag"
    assert not _missing_flags(sorted(named), serve_help)
    from vs_vllm.vllm_plugin.patches.cli_args import FLAGS

    plugin_flags = {"--" + name.replace("_", "-") for name in FLAGS}
    assert not _missing_flags(sorted(plugin_flags), serve_help)
    assert plugin_flags <= named, f"not in the README: {sorted(plugin_flags - named)}"
    assert "--trust-request-mm-kwargs" in text and "--trust-request-mm-kwargs" in serve_help


def test_readme_request_kwargs_are_the_plugins():
    """The ``mm_processor_kwargs`` keys the README shows are the ones the plugin reads."""
    from vs_vllm.vllm_plugin.settings import REQUEST_KWARG, REQUEST_VIDEO_KWARG

    text = README.read_text()
    keys = set(re.findall(r'"mm_processor_kwargs": \{"(\w+)"', text))
    keys |= set(re.findall(r'or `"(\w+)"`', text))
    assert keys and keys <= {REQUEST_KWARG, REQUEST_VIDEO_KWARG}, keys


@pytest.mark.parametrize("item", PYTHON_BLOCKS, ids=lambda item: f"{item[0]}#{item[1]}")
def test_python_block(item):
    """Compiles; every ``vs_vllm`` import imports (names included); every
    ``hf_overrides={"vision_selector": {...}}`` literal is settings the plugin accepts."""
    where, index, block = item
    name = f"{where} python block {index}"
    tree = compile(block, name, "exec", ast.PyCF_ONLY_AST)
    compile(tree, name, "exec")  # the checks only a full compile makes (e.g. a stray return)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vs_vllm":
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vs_vllm":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.keyword) and node.arg == "hf_overrides":
            from vs_vllm.vllm_plugin.settings import HF_CONFIG_KEY, SelectorSettings

            overrides = ast.literal_eval(node.value)
            SelectorSettings.from_mapping(overrides[HF_CONFIG_KEY])


def test_linked_docs_exist():
    """Every relative link of the README exists (the docs/ pages and benchmarks/README.md
    among them), and so does every relative link of those pages."""
    pages = [README, *DOCS, ROOT / "benchmarks" / "README.md"]
    readme_links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    assert "benchmarks/README.md" in readme_links
    assert {f"docs/{p.name}" for p in DOCS} <= set(readme_links) | _linked_from_docs(), (
        "a docs/ page nobody links to"
    )
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            assert (page.parent / target).exists(), f"{_rel(page)} links to missing {target}"


def _linked_from_docs() -> set[str]:
    links = set()
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"^[a-z]+:", target):
                links.add(_rel((page.parent / target).resolve()))
    return links


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines (at most {MAX_LINES})"
