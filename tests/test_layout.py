"""The package's architecture, read from its source: no import circle, no library module importing
the workflow layer or a step, and one module that names model families."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "moefy"
UPPER = ("moefy.steps", "moefy.workflow")  # what the library never imports
FAMILY_NAMES = re.compile(
    r"""["'](bert|roberta|xlm-roberta|electra|camembert|distilbert|t5|gpt2|llama|mistral|qwen2|mixtral|qwen2_moe|qwen3_moe|olmoe|switch_transformers)["']"""
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every moefy module `path` imports, at the top or inside a function (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moefy"):
            for alias in node.names:  # `from moefy.x import y`: y may be a module itself
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moefy")}
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_has_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_the_graph_sees_lazy_imports():
    """flops imports the FFN adapter at the top; checkpoints imports the SMoE adapter inside a function."""
    graph = import_graph()
    assert "moefy.adapters.ffn" in graph["moefy.measure.flops"]
    assert "moefy.adapters.smoe" in graph["moefy.moe.checkpoints"]


def test_no_library_module_imports_the_workflow_layer_or_a_step():
    up = {
        name: sorted(d for d in deps if d.startswith(UPPER))
        for name, deps in import_graph().items()
        if not name.startswith(UPPER)
    }
    assert {name: deps for name, deps in up.items() if deps} == {}


def test_every_library_module_lives_in_a_subpackage():
    """The top level holds only what every layer shares: errors, config, files, dist, and the public export API."""
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {"__init__", "errors", "config", "files", "dist", "export"}


def test_only_the_family_registry_names_model_families():
    naming = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if FAMILY_NAMES.search(p.read_text()) and p.name != "families.py"
    ]
    assert naming == []


@pytest.mark.parametrize("loader", ["load_moe", "load_sparse_moe", "load_smoe"])
def test_the_public_loaders_stay_importable_from_moefy_export(loader):
    import moefy.export
    from moefy.moe import checkpoints

    assert getattr(moefy.export, loader) is getattr(checkpoints, loader)
