"""The import layers of speclora/, read from the source (ast): which part may import which.

    tasks, checks, backbone, devices, ...   the ground floor
    metrics → model → data / spectral → methods → submission → cli → bench

Data and model meet only in the CLI (neither imports the other); model/ defines what a method is to the
LightningModule (speclora.model.method) and imports nothing of methods/; no two parts import each other,
directly or around a longer circle. Imports under ``if TYPE_CHECKING:`` are type hints, not dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "speclora"


def _part(module: str) -> str | None:
    """``speclora.model.lora`` -> ``model``; ``speclora.checks`` -> ``checks``; anything else -> None."""
    names = module.split(".")
    return names[1] if names[0] == "speclora" and len(names) > 1 else None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                hidden.update(id(n) for n in ast.walk(child))
    return hidden


def imports_of(path: Path) -> set[str]:
    """The speclora modules a file imports (at any depth of the file, type-checking imports left out)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    hidden = _type_checking_nodes(tree)
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, level - 1 packages up
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "speclora"}


def part_graph() -> dict[str, set[str]]:
    """part -> the other parts its files import (a part: a subpackage or a top-level module of speclora)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        part = rel.parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        deps = {_part(m) for m in imports_of(path)} - {None, part, "__init__"}
        graph.setdefault(part, set()).update(d for d in deps if (PACKAGE / d).exists() or (PACKAGE / f"{d}.py").exists())
    return graph


def test_the_reader_sees_every_import():
    # the reader is what the other tests trust: it must find plain, from- and relative imports
    graph = part_graph()
    assert "model" in graph["methods"]  # methods build on model (LoRA layers, the Method interface)
    assert {"data", "model"} <= graph["cli"]
    assert "tasks" in graph["data"]


def test_data_does_not_import_model():
    assert "model" not in part_graph()["data"]
    assert "data" not in part_graph()["model"]


def test_model_does_not_import_methods():
    # the module is handed its method (speclora.model.method.Method); methods build on model, never back
    graph = part_graph()
    assert "methods" not in graph["model"]
    assert "methods" not in graph["spectral"] and "methods" not in graph["data"]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports between parts (as a path a → … → a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_parts():
    assert _cycle(part_graph()) is None


MAX_LINES = 450  # STYLE.md: files of one concept, roughly 100-400 lines


def test_no_file_of_the_package_is_over_the_limit():
    long = {str(p.relative_to(PACKAGE)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these files into files of one concept (at most {MAX_LINES} lines): {long}"
