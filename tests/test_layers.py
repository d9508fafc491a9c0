"""The package's layers import one way: read from the source (ast), imports inside functions included.

docs/architecture.md draws the layers: entry points (api, cli) over designs (cohort runs) over the
test families over the data (stores, cohorts) and the math; graph.py under priors.py under kernel.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spatialscale"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The package module that ``name`` is, or the nearest one that holds it (``a.b.func`` -> ``a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its source (functions and TYPE_CHECKING blocks too).

    ``from spatialscale.x import y`` counts as an import of ``spatialscale.x.y`` when that is a module,
    else of ``spatialscale.x``; the parent packages that Python runs first are not counted (every module
    would then depend on ``spatialscale/__init__``, which imports the API).
    """
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_owner(a.name) for a in node.names if a.name.split(".")[0] == "spatialscale")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "spatialscale":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else _owner(base))
    found.discard(None)
    found.discard(module)
    return found  # type: ignore[return-value]


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _importers_of(targets: set[str], among: str) -> dict[str, list[str]]:
    return {m: sorted(GRAPH[m] & targets) for m in sorted(GRAPH)
            if (m == among or m.startswith(among + ".")) and GRAPH[m] & targets}


def test_the_import_graph_is_read():
    # the reader sees the imports it must (a guard against a test that passes because it reads nothing)
    assert len(MODULES) > 40
    assert "spatialscale.families.common" in GRAPH["spatialscale.families"]
    assert "spatialscale.graph" in GRAPH["spatialscale.priors"]
    assert {"spatialscale.cohort", "spatialscale.designs"} <= GRAPH["spatialscale.api"]
    assert "spatialscale.families" in GRAPH["spatialscale.designs.cohort_run"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_families_know_no_cohort():
    above = {m for m in MODULES if m == "spatialscale.cohort" or m.split(".")[:2] == ["spatialscale", "designs"]}
    assert _importers_of(above, "spatialscale.families") == {}


def test_the_cohort_data_layer_is_below_the_families_and_designs():
    above = {m for m in MODULES if m.split(".")[:2] in (["spatialscale", "families"], ["spatialscale", "designs"])}
    assert _importers_of(above, "spatialscale.cohort") == {}


def test_priors_and_graph_sit_below_the_kernel():
    assert "spatialscale.kernel" not in GRAPH["spatialscale.priors"]
    assert not GRAPH["spatialscale.graph"] & {"spatialscale.kernel", "spatialscale.priors"}


@pytest.mark.parametrize("layer", ["spatialscale.designs", "spatialscale.families"])
def test_lower_layers_do_not_call_the_entry_points(layer):
    entry = {"spatialscale", "spatialscale.api", "spatialscale.cli"}
    assert _importers_of(entry, layer) == {}


def test_no_import_cycle_among_the_package_modules():
    assert _cycles(GRAPH) == []
