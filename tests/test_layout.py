"""The package layout keeps its promises (docs/architecture.md): no import cycles, not even through
lazy imports inside functions; the core (contracts, plugin loading, validation) imports no stage
and no built-in plugin; only the facade and the CLI import the app side."""

from __future__ import annotations

import ast
import subprocess
import sys

from catsdogs.util.imports import PACKAGE_DIR, cycles, import_graph, stage, stage_graph


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


def test_every_module_parses_and_the_api_imports_without_tensorflow():
    for path in PACKAGE_DIR.rglob("*.py"):
        ast.parse(path.read_text(encoding="utf-8"))
    code = ("import sys, catsdogs, catsdogs.cli, catsdogs.engine, catsdogs.tracking; "
            "catsdogs.get_registry(); print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
