"""No import cycle among project modules (issue 13), read from the source with ``ast``.

A module imports another when a statement names it: top-level imports, including those under a
module-level ``try``/``if``/``with`` or in a class body, and imports inside functions (they run
lazily, on first call, but a lazy import pointing back is still a circle of responsibilities:
``jobs.screen`` ↔ ``jobs.model_set`` and ``review.pacs_export`` ↔ ``review.pacs_documents`` were
two, issue 24). Imports under ``if TYPE_CHECKING:`` never run and are not counted.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_PROJECT = {"tests", "docs"}


def project_packages(root: Path) -> list[str]:
    """Top-level folders of ``root`` that hold Python code (``tests`` and hidden ones aside)."""
    return sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir()
        and not d.name.startswith((".", "_"))
        and d.name not in NOT_PROJECT
        and any(d.rglob("*.py"))
    )


def module_files(root: Path, packages: list[str]) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under ``packages`` (``__init__`` → package)."""
    out: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _blocks(node: ast.stmt) -> list[list[ast.stmt]]:
    """Statement lists nested in a compound statement (if, try, with, for, while, class, match)."""
    blocks = [getattr(node, field, None) or [] for field in ("body", "orelse", "finalbody")]
    blocks += [handler.body for handler in getattr(node, "handlers", [])]
    blocks += [case.body for case in getattr(node, "cases", [])]
    return blocks


def import_nodes(body: list[ast.stmt], lazy: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements of ``body`` that run at import time (``lazy``: in functions too)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if lazy:
                found += import_nodes(node.body, lazy)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            found += import_nodes(node.orelse, lazy)
        else:
            for block in _blocks(node):
                found += import_nodes(block, lazy)
    return found


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` (a dotted import target) starts with."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement loads (``from a import b`` → ``a.b`` and ``a``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph(root: Path, packages: list[str], lazy: bool = False) -> dict[str, set[str]]:
    """Module → project modules it imports (at import time; with ``lazy``, in functions too)."""
    files = module_files(root, packages)
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in import_nodes(ast.parse(path.read_text(), str(path)).body, lazy):
            targets = _targets(node, module, is_package)
            if isinstance(node, ast.ImportFrom):  # the submodule if one is named, else the base
                submodules = [t for t in targets[:-1] if t in known]
                targets = submodules or targets[-1:]
            edges |= {r for t in targets if (r := _resolve(t, known)) and r != module}
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``) of ``graph``, or None when it is acyclic."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_project_packages_are_found() -> None:
    packages = project_packages(REPO)
    assert {"model", "pdd_batch", "jobs", "tools"} <= set(packages)
    assert "tests" not in packages


def test_no_import_cycle_among_project_modules() -> None:
    graph = import_graph(REPO, project_packages(REPO), lazy=True)
    assert len(graph) > 50  # every module was read
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_no_import_cycle_in_model_even_through_lazy_imports() -> None:
    graph = import_graph(REPO, ["model"], lazy=True)
    assert {"model.config", "model.rd4ad", "model.teachers"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.mark.parametrize(
    ("a_text", "cyclic"),
    [
        ("from pkg import b\n", True),
        ("from . import b\n", True),
        ("import pkg.b as b\n", True),
        ("try:\n    from pkg.b import X\nexcept ImportError:\n    X = None\n", True),
        ("class A:\n    from pkg import b\n", True),
        ("def f():\n    from pkg import b\n", False),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import X\n", False),
        ("import typing\nif typing.TYPE_CHECKING:\n    from pkg import b\n", False),
        ("from pkg.c import X\n", False),
    ],
)
def test_cycle_detector_sees_what_runs_at_import(tmp_path: Path, a_text: str, cyclic: bool) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": a_text,
            "pkg/b.py": "from pkg.a import A\n",
            "pkg/c.py": "import os\n",
        },
    )
    graph = import_graph(tmp_path, ["pkg"])
    cycle = find_cycle(graph)
    assert (cycle is not None) == cyclic, graph
    if cyclic:
        assert {"pkg.a", "pkg.b"} <= set(cycle)


def test_lazy_imports_count_when_asked(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "def f():\n    from pkg import b\n",
            "pkg/b.py": "from pkg.a import f\n",
        },
    )
    assert find_cycle(import_graph(tmp_path, ["pkg"])) is None
    assert find_cycle(import_graph(tmp_path, ["pkg"], lazy=True)) is not None
