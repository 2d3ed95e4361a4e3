"""The package layout keeps its promises (docs/architecture.md): no import cycles, not even through
lazy imports inside functions; the core (contracts, plugin loading, validation) imports no stage
and no built-in plugin; only the facade and the CLI import the app side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from catsdogs.util.imports import PACKAGE_DIR, cycles, import_graph, module_name, stage, stage_graph

REPO = PACKAGE_DIR.parent


def test_no_import_cycles_even_through_lazy_imports():
    assert cycles(import_graph(module_level_only=True)) == []
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "catsdogs"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from catsdogs.a import x\n")
    (pkg / "a" / "x.py").write_text("def f():\n    from catsdogs.b import y\n")
    (pkg / "b.py").write_text("from . import a\nif TYPE_CHECKING:\n    import catsdogs.c\n")
    (pkg / "c.py").write_text("import catsdogs.b\n")
    graph = import_graph(pkg)
    assert graph["catsdogs.b"] == {"catsdogs.a"}  # the TYPE_CHECKING import is left out
    assert cycles(graph) == [["catsdogs.a", "catsdogs.a.x", "catsdogs.b"]]
    assert cycles(import_graph(pkg, module_level_only=True)) == []


def test_no_import_cycles_even_through_type_checking_imports(tmp_path):
    """Issue 22 §2: imports under ``if TYPE_CHECKING:`` count too (a type-only cycle still ties the
    modules together: ``runs.runner`` <-> ``tracking`` <-> ``tracking.mlflow_tracker`` was one).
    The finder follows them when asked: the planted ``b`` <-> ``c`` type-only cycle is found."""
    assert cycles(import_graph(skip_type_checking=False)) == []
    pkg = tmp_path / "catsdogs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from catsdogs.c import C\n")
    (pkg / "c.py").write_text("import catsdogs.b\n")
    assert cycles(import_graph(pkg)) == []
    assert cycles(import_graph(pkg, skip_type_checking=False)) == [["catsdogs.b", "catsdogs.c"]]


def test_core_modules_import_no_stage_and_no_builtin_plugin():
    graph = import_graph()
    core = [m for m in graph if stage(m) == "core"]
    assert {"catsdogs.components", "catsdogs.plugins", "catsdogs.validation"} <= set(core)
    for module in core:
        assert {stage(t) for t in graph[module]} <= {"core"}, (module, graph[module])
    for module, targets in graph.items():
        if stage(module) != "builtin":
            assert not any(t.startswith("catsdogs.builtin") for t in targets), module


def test_stages_import_only_earlier_stages_or_shared_ones():
    edges = stage_graph(import_graph())
    assert edges["dataset"] <= {"core", "util"}
    assert edges["features"] <= {"core", "dataset", "util"}
    assert "app" not in edges["runs"] | edges["features"] | edges["audit"]
    assert not edges["util"] - {"core"}
    # metrics and plots: a layer below the runs, the app, the audit and the built-in heads
    assert edges["evaluation"] <= {"core", "util"}
    assert "evaluation" in edges["runs"] & edges["app"] & edges["audit"] & edges["builtin"]
    assert "runs" not in edges["builtin"] | edges["audit"]


def test_every_module_parses_and_the_api_imports_without_tensorflow():
    for path in PACKAGE_DIR.rglob("*.py"):
        ast.parse(path.read_text(encoding="utf-8"))
    code = ("import sys, catsdogs, catsdogs.cli, catsdogs.engine, catsdogs.tracking; "
            "catsdogs.get_registry(); print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ private names stay private
def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(root: Path, packages: tuple[str, ...] = ("catsdogs",)) -> list[str]:
    """Every place a module under ``root`` (a package directory) uses another module's private
    name: ``from P.x import _name`` (relative imports resolved) and ``P.x._name`` attribute
    access through a module bound by ``import P.x [as m]`` or ``from P import x [as m]``, where
    ``P`` is ``root``'s package or one of ``packages``. Dunder names (``__version__``) are not
    private; a module's own names are fine; a public name under a private alias is fine."""
    tops = {root.name, *packages}
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    found = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        bound: dict[str, str] = {}  # local name -> the module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in tops:
                        if a.asname:
                            bound[a.asname] = a.name
                        else:
                            bound[a.name.split(".")[0]] = a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] not in tops:
                    continue
                for a in node.names:
                    if f"{source}.{a.name}" in modules or a.name[:1] != "_":
                        bound[a.asname or a.name] = f"{source}.{a.name}"
                    if _private(a.name) and source != name:
                        found.append(f"{name}:{node.lineno}: from {source} import {a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                dotted = []
                value: ast.expr = node.value
                while isinstance(value, ast.Attribute):
                    dotted.append(value.attr)
                    value = value.value
                if not isinstance(value, ast.Name) or value.id not in bound:
                    continue
                owner = ".".join([bound[value.id], *reversed(dotted)])
                if owner != name and (owner in modules or owner.split(".")[0] in tops):
                    found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(found))


def _package_roots() -> list[Path]:
    roots = [PACKAGE_DIR]
    for project in sorted((REPO / "plugins").glob("*/pyproject.toml")):
        roots += [p.parent for p in sorted(project.parent.glob("*/__init__.py"))
                  if p.parent.name != "tests"]
    return roots


def test_no_module_imports_another_modules_private_name():
    found = [hit for root in _package_roots() for hit in private_imports(root)]
    assert found == [], "make the name public (or move it to the layer both use):\n" + "\n".join(found)


def test_private_import_finder_finds_planted_ones(tmp_path):
    pkg = tmp_path / "catsdogs"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from catsdogs._version import __version__\n")
    (pkg / "_version.py").write_text("__version__ = '1'\n")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("_hidden = 1\nshown = _hidden\n")
    (pkg / "a" / "y.py").write_text(
        "from .x import _hidden\n"  # relative
        "from catsdogs.a.x import shown as _alias\n"  # a public name under a private alias: fine
        "import catsdogs.a.x\n"
        "import catsdogs.a.x as xm\n"
        "from catsdogs.a import x\n"
        "def f():\n"
        "    return catsdogs.a.x._hidden, xm._hidden, x._hidden, xm.__name__\n")
    (pkg / "b.py").write_text("def g():\n    from catsdogs.a.x import _hidden\n")
    assert private_imports(pkg) == [
        "catsdogs.a.y:1: from catsdogs.a.x import _hidden",
        "catsdogs.a.y:7: catsdogs.a.x._hidden",
        "catsdogs.a.y:7: x._hidden",
        "catsdogs.a.y:7: xm._hidden",
        "catsdogs.b:2: from catsdogs.a.x import _hidden",
    ]
