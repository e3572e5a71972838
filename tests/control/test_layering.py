"""docs/contracts.md's layering, checked on the real import graph: the app never imports the
command-line module, and no module of mtevm imports itself round a cycle."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("backend", "tui")


def _modules() -> dict[str, str]:
    found = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                    found[rel.removesuffix(".__init__")] = os.path.join(d, f)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the mtevm modules it imports (at any level: late imports count too)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_the_app_does_not_import_the_command_line_module():
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items() if m.startswith("tui") and "backend.cli" in deps)
    assert offenders == [], f"{offenders} import backend.cli (shared helpers belong below both front ends)"


def test_front_ends_and_backend_import_no_cycle_through_the_cli():
    """backend.cli may start the app (it is the `mtevm` entry point), so nothing the app imports may
    lead back to backend.cli."""
    graph = import_graph()
    seen, todo = set(), ["tui.app"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    assert "backend.cli" not in seen
