"""The package layout ARCHITECTURE.md describes, enforced: no import cycles, no hidden imports, no
relative import that climbs out of its folder, every module importable on its own.

The import graph is read from the source (every ``import`` statement, function-local ones
included), with the installed names of the card's folders: ``rules/x.py`` is ``dlbjax.rules.x``,
``importers/x.py`` is ``dlbjax.importers.x``. An edge A -> B means A imports B; ``from P import
n`` is an edge to ``P.n`` when that is a module, else to ``P`` (a package's ``__init__``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"dlbjax": "dlbjax", "rules": "dlbjax.rules", "importers": "dlbjax.importers"}
# function-local imports of dlbjax modules that are allowed, with the reason
LOCAL_IMPORTS_ALLOWED = {
    "dlbjax.__main__": "the command line imports the library only when a command runs (fast --help)",
    "dlbjax.importers": "the torch importer (and torch) loads on first use of its names, so a JAX "
                        "model is explained without importing torch",
}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package] + parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str):
    """(imported module, line, is function-local, relative level) for every import in ``name``."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rsplit(".", 1)[0]
    local_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    local_lines.add(sub.lineno)
    for node in ast.walk(tree):
        local = getattr(node, "lineno", None) in local_lines
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, local, 0
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield (full if full in MODULES else target), node.lineno, local, node.level


def import_graph() -> dict[str, set]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _, _ in _imports(m):
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_the_real_imports():
    g = import_graph()
    assert "dlbjax.lowerings.affine" in g["dlbjax.rules.affine"]
    assert "dlbjax.rules._registry" in g["dlbjax.rules.affine"]
    assert "dlbjax._result" in g["dlbjax._assemble"]
    assert "dlbjax.lowerings" in g["dlbjax.importers._export"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_function_local_imports_of_dlbjax_modules():
    hidden = [f"{m}:{line} imports {target}" for m in MODULES if m not in LOCAL_IMPORTS_ALLOWED
              for target, line, local, _ in _imports(m) if local and target in MODULES]
    assert not hidden, "function-local imports of dlbjax modules:\n" + "\n".join(hidden)


def test_no_relative_import_climbs_out_of_its_folder():
    climbing = [f"{m}:{line}" for m in MODULES for _, line, _, level in _imports(m) if level > 1]
    assert not climbing, "relative imports with '..': " + ", ".join(climbing)


def test_rules_and_importers_use_named_dlbjax_surfaces():
    """rules/ and importers/ reach the engine only through dlbjax.ir, dlbjax.lowerings, the
    error and type modules: never through the explain/engine internals."""
    allowed = ("dlbjax.ir", "dlbjax.lowerings", "dlbjax._errors", "dlbjax._types", "dlbjax._dtypes")
    bad = []
    for m in MODULES:
        folder = m.split(".")[1] if m.count(".") else ""
        if folder not in ("rules", "importers"):
            continue
        for target, line, _, _ in _imports(m):
            if target in MODULES and not target.startswith(f"dlbjax.{folder}") \
                    and not target.startswith(allowed):
                bad.append(f"{m}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_every_module_imports_in_a_fresh_interpreter():
    """Each module first in a fresh process (catches an import order that only works after
    another module was imported)."""
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n")
    names = [m for m in MODULES if m != "dlbjax.__main__"]
    # a handful of processes, each starting from a different module, instead of one per module
    starts = ["dlbjax.rules", "dlbjax.importers", "dlbjax.engine.relevance"]
    for first in starts:
        order = [first] + [n for n in names if n != first]
        r = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
        assert r.returncode == 0, f"importing {first} first failed:\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("folder", ["lowerings", "rules"])
def test_family_folders_mirror_each_other(folder):
    """Every rule family has a lowering family of the same name (lowerings may have more:
    forward-only families such as creation)."""
    import dlbjax.lowerings as L
    import dlbjax.rules as R
    rule_families = set(R.FAMILIES)
    lowering_families = set(L.FAMILIES)
    assert rule_families <= lowering_families, rule_families - lowering_families
    on_disk = {p.stem for p in (ROOT / ("dlbjax/lowerings" if folder == "lowerings" else "rules"))
               .glob("*.py") if not p.stem.startswith("_")}
    declared = lowering_families | {"windows"} if folder == "lowerings" else rule_families
    assert on_disk == declared, on_disk ^ declared
