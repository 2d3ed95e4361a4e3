"""The package's own import graph, read from the source (``ast``; nothing is imported).

Used by ``tests/test_layout.py`` (no cycles; core modules never import :mod:`catsdogs.builtin`)
and by ``python -m catsdogs.util.imports`` (the stage-level graph printed, and drawn as a PNG
with ``--png PATH``) for ``docs/architecture.md``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent

#: pipeline stages in data-path order, then the shared layers (``util``; ``evaluation``: metrics
#: and plots, below the runs, the app and the audit); ``api`` is the package facade
#: (``catsdogs``), ``__main__`` and the CLI; the other modules outside a sub-package (contracts,
#: plugin loading, validation, errors, layers, conformance checks) form the ``core``
STAGES = ("core", "dataset", "features", "experiment", "runs", "engine", "tracking", "app",
          "audit", "builtin", "util", "evaluation", "api")
API_MODULES = ("catsdogs", "catsdogs.__main__", "catsdogs.cli")


def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = PACKAGE_DIR, *, module_level_only: bool = False,
                 skip_type_checking: bool = True) -> dict[str, set[str]]:
    """``{module: {catsdogs modules it imports}}``. ``module_level_only``: leave out imports inside
    functions (the lazy ones); imports under ``if TYPE_CHECKING:`` are left out by default."""
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        found = _imports(tree, name, path.name == "__init__.py", set(modules), False,
                         module_level_only, skip_type_checking)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _imports(node: ast.AST, name: str, is_package: bool, modules: set[str], in_function: bool,
             module_level_only: bool, skip_type_checking: bool) -> set[str]:
    found: set[str] = set()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and skip_type_checking and \
                "TYPE_CHECKING" in ast.unparse(child.test):
            for orelse in child.orelse:
                found |= _imports(orelse, name, is_package, modules, in_function,
                                  module_level_only, skip_type_checking)
            continue
        counted = not (module_level_only and in_function)
        if isinstance(child, ast.Import) and counted:
            found.update(a.name for a in child.names)
        elif isinstance(child, ast.ImportFrom) and counted:
            base = _resolve(name, is_package, child)
            for alias in child.names:  # `from pkg import module` imports the module
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                  ast.Lambda))
        found |= _imports(child, name, is_package, modules, inner, module_level_only,
                          skip_type_checking)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def stage(module: str) -> str:
    if module in API_MODULES:
        return "api"
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] in STAGES:
        return parts[1]
    if len(parts) == 2 and parts[1] in STAGES:  # a stage's package __init__
        return parts[1]
    return "core"


def stage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between stages (a stage importing itself is left out)."""
    out: dict[str, set[str]] = {s: set() for s in STAGES}
    for a, targets in graph.items():
        for b in targets:
            if stage(a) != stage(b):
                out[stage(a)].add(stage(b))
    return out


def draw(edges: dict[str, set[str]], path: Path, title: str) -> Path:
    """The stage graph as a PNG, layered: each stage drawn above every stage it imports (the
    core at the bottom), an arrow per imported stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s for s in STAGES if s in edges]
    level: dict[str, int] = {}

    def depth(s: str, seen: tuple[str, ...] = ()) -> int:  # longest import chain down to core
        if s not in level:
            level[s] = 1 + max((depth(t, seen + (s,)) for t in edges[s] if t not in seen),
                               default=-1)
        return level[s]

    rows: dict[int, list[str]] = {}
    for s in names:
        rows.setdefault(depth(s), []).append(s)
    pos = {s: ((i + 1) / (len(row) + 1) * 2 - 1, -1 + 2 * lv / max(1, max(rows)))
           for lv, row in rows.items() for i, s in enumerate(row)}
    fig, ax = plt.subplots(figsize=(10, 7))
    for a, targets in edges.items():
        for b in targets:
            ax.annotate("", xy=pos[b], xytext=pos[a], arrowprops={
                "arrowstyle": "-|>", "color": "#4a6fa5", "alpha": 0.55, "shrinkA": 22,
                "shrinkB": 22, "connectionstyle": "arc3,rad=0.12"})
    for s, (x, y) in pos.items():
        ax.text(x, y, s, ha="center", va="center", fontsize=12, bbox={
            "boxstyle": "round,pad=0.5", "fc": "#fdf6e3", "ec": "#555"})
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    ax.axis("off")
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: Iterable[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m catsdogs.util.imports",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--png", type=Path, help="draw the stage graph here")
    args = parser.parse_args(list(argv) if argv is not None else None)
    graph = import_graph()
    lazy = import_graph(module_level_only=False)
    eager = import_graph(module_level_only=True)
    print(f"{len(graph)} modules, {sum(map(len, eager.values()))} module-level imports, "
          f"{sum(map(len, lazy.values()))} with the lazy ones (inside functions)")
    for label, g in (("module-level", eager), ("all, lazy included", lazy)):
        found = cycles(g)
        print(f"cycles ({label}): " + ("none" if not found else
                                      "; ".join(" <-> ".join(c) for c in found)))
    edges = stage_graph(lazy)
    for s in STAGES:
        print(f"  {s:<10} -> {', '.join(t for t in STAGES if t in edges[s]) or '-'}")
    if args.png:
        print("wrote", draw(edges, args.png, "catsdogs: imports between pipeline stages"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
