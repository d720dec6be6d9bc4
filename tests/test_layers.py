"""The package's import graph is the layering the README describes: no import circle, the reference path
(`simple`) used only by tests, parity, bench and eval, and each layer importing only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import moonbase

ROOT = Path(moonbase.__file__).parent

# Top-level modules and packages, lowest first; a module may import only from its own layer or lower ones.
# (Imports inside functions are deferred on purpose, e.g. the CLI's, and are not import-time edges.)
LAYERS = [
    {"errors", "atomic", "device", "config", "metrics", "jsonl"},
    {"tokenizer", "image", "weights"},
    {"model"},
    {"data", "skills"},
    {"simple", "engine", "train", "hub"},
    {"api", "draw", "eval", "jobs"},
    {"finetune", "bench"},
    {"server"},
    {"cli", "__main__", "__init__"},
]
REFERENCE_USERS = {"eval", "bench"}  # besides tests: parity, the benchmark and the eval suite may run `simple`


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of this package imported when `path` is imported (top-level statements only)."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try, ast.If)) else ():
            if isinstance(sub, ast.Import):
                out |= {a.name for a in sub.names if a.name.startswith("moonbase")}
            elif isinstance(sub, ast.ImportFrom):
                base = package.split(".")
                base = base[: len(base) - sub.level + 1] if sub.level else []
                target = ".".join(base + ([sub.module] if sub.module else []))
                if target.startswith("moonbase"):
                    out |= {f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in sub.names}
    return {m for m in out if m in MODULES}


MODULES = {_module(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m) :] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if n != m and not (m.startswith(n + ".") and MODULES[n].name == "__init__.py"):  # a package's own __init__
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(GRAPH):
        visit(m, [])


def test_each_layer_imports_only_lower_layers():
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    bad = [f"{m} -> {n}" for m, deps in GRAPH.items() for n in deps if level[_top(n)] > level[_top(m)]]
    assert bad == [] and set(level) >= {_top(m) for m in MODULES}


def test_the_reference_path_is_imported_only_by_tests_parity_bench_and_eval():
    users = {m for m, deps in GRAPH.items() if "moonbase.simple" in deps}
    assert {_top(m) for m in users} <= REFERENCE_USERS, users
    assert {_top(n) for n in GRAPH["moonbase.simple"]} <= {"skills", "model", "errors"}
