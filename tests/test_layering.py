"""The three floors (docs/design.md): core <- library <- apps, imports only downward, no import circle.

Read from the source (every import statement, also those inside functions), not from a list of today's imports:
a new module falls on a floor by where it lives, and a new import that goes up or closes a circle fails here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

CORE = {"dpar.config", "dpar.validation", "dpar.errors", "dpar.fileio", "dpar.experiment", "dpar.launch",
        "dpar.visual", "dpar"}
APPS_IN_LIBRARY_FOLDERS = {"dpar.demo", "dpar.patchmap"}  # `python -m dpar.demo` / `python -m dpar.patchmap`
APP_FOLDERS = ("benchmarks", "tools", "evaluations")
SKIPPED = ("tests", "assets", "configs", "docs", ".git", ".venv-ci", "build")


def floor(module: str) -> str:
    """core, library or app: where ``module`` lives decides (see docs/design.md)."""
    if module in CORE:
        return "core"
    if module in APPS_IN_LIBRARY_FOLDERS or module.split(".")[0] in APP_FOLDERS or "." not in module:
        return "app"  # the top-level scripts (and sample_cli.py beside them) are apps
    assert module.split(".")[0] in ("dpar", "tokenizer"), module
    return "library"


def project_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in SKIPPED or parts[0].startswith(".") or parts[-1] == "conftest.py":
            continue
        name = ".".join(parts[:-1] + (() if parts[-1] == "__init__.py" else (parts[-1][:-3],)))
        modules[name] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` (at ``path``) imports, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:  # the longest project module the name starts with
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up a floor, or from tokenizer/ to anything but core."""
    rank = {"core": 0, "library": 1, "app": 2}
    wrong = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if rank[floor(target)] > rank[floor(module)]:
                wrong.append(f"{module} ({floor(module)}) imports {target} ({floor(target)})")
            elif module.startswith("tokenizer") and floor(target) != "core" and not target.startswith("tokenizer"):
                wrong.append(f"{module} (tokenizer/) imports {target}, which is not core")
    return wrong


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_imports_only_go_down_the_floors():
    graph = import_graph(ROOT)
    assert {"dpar.sampling", "dpar.runs", "tokenizer.vq_model", "sample_c2i"} <= set(graph)  # the walk found them
    assert violations(graph) == []


def test_no_import_circle():
    assert circles(import_graph(ROOT)) == []


@pytest.mark.parametrize("module,source,expected", [
    ("dpar/runs.py", "import sample_c2i\n", "dpar.runs (library) imports sample_c2i (app)"),
    ("dpar/models/gpt.py", "def f():\n    from ..demo import build\n", "dpar.models.gpt (library) imports dpar.demo"),
    ("dpar/fileio.py", "from .models import DPAR\n", "dpar.fileio (core) imports dpar.models (library)"),
    ("tokenizer/vq_model.py", "from dpar.patcher import PatcherConfig\n", "not core"),
    ("dpar/sampling.py", "from benchmarks import workloads\n", "imports benchmarks.workloads (app)"),
])
def test_the_check_finds_an_import_that_goes_up(tmp_path, module, source, expected):
    """The checks above can fail: a copy of the project with one upward import added is caught."""
    for name, path in project_modules(ROOT).items():
        copy = tmp_path / path.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text())
    (tmp_path / module).write_text((tmp_path / module).read_text() + source)
    assert any(expected in line for line in violations(import_graph(tmp_path)))


def test_the_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
