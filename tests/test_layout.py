"""The package's layout stays as designed (issue 17): imports go downward only, no import cycles, no module imports
another's private names, no module is longer than about 400 lines, and every module opens with a docstring."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "greedymm"
MAX_LINES = 450
# From the bottom up; a module belongs to the layer of its longest listed prefix. A module may import its own layer
# (without cycles) and the layers below, never one above.
LAYERS = [
    ["greedymm", "greedymm.registry", "greedymm.io"],
    ["greedymm.config"],
    ["greedymm.runtime"],
    ["greedymm.data"],
    ["greedymm.models"],
    ["greedymm.measures"],
    ["greedymm.methods"],
    ["greedymm.training"],
    ["greedymm.experiment", "greedymm.experiment.runs", "greedymm.experiment.table", "greedymm.plots"],
    ["greedymm.study"],
    ["greedymm.experiment.params", "greedymm.experiment.pipeline"],
    ["greedymm.__main__"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    assert level is not None, f"{module} is in no layer of tests/test_layout.py"
    return level


def imports(module: str) -> List[tuple]:
    """(imported greedymm module, names imported from it) of every import statement in a module, nested ones too."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "greedymm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "greedymm":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(m, []) for m in submodules]  # `from . import cache` imports a module
            out.append((target, [n for n in names if f"{target}.{n}" not in MODULES]))
    return out


GRAPH: Dict[str, Set[str]] = {m: {t for t, _ in imports(m) if t in MODULES and t != m} for m in MODULES}


def test_imports_go_downward_only():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})" for m, targets in GRAPH.items()
              for t in targets if layer(t) > layer(m) and not m.startswith(t + ".")]
    assert upward == []


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(m: str, stack: List[str]) -> None:
        state[m] = "open"
        for t in sorted(GRAPH[m]):
            if m.startswith(t + "."):  # a module's own package (its __init__ ran first)
                continue
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_private_names_imported_from_another_module():
    private = [f"{m} imports {n} from {t}" for m in MODULES for t, names in imports(m) for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_modules_are_short_and_open_with_a_docstring():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
    for m, p in MODULES.items():
        doc = ast.get_docstring(ast.parse(p.read_text()))
        assert doc and len(doc.strip().splitlines()) <= 3, f"{m} must open with a docstring of 1-3 lines"
        if not m.endswith("__init__") and m != "greedymm":
            assert "SPEC" in doc or "paper" in doc or "issue" in doc.lower(), f"{m}'s docstring names no section"


@pytest.mark.parametrize("planted, message", [
    ({"greedymm.config": {"greedymm.methods"}}, "upward"),
    ({"greedymm.data.cache": {"greedymm.data.loader"}, "greedymm.data.loader": {"greedymm.data.cache"}}, "cycle"),
])
def test_the_checks_catch_planted_faults(planted, message, monkeypatch):
    for m, targets in planted.items():
        monkeypatch.setitem(GRAPH, m, GRAPH[m] | targets)
    check = test_imports_go_downward_only if message == "upward" else test_no_import_cycles
    with pytest.raises(AssertionError):
        check()
