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


# Where files are made in the runtime and state directories: only through backend.paths' helpers
# (O_NOFOLLOW relative to a checked directory), never by path string (issue 11, item 2). The
# guest-image builder (backend/guests/linux) writes to its download cache, not to those dirs.
GUARDED = ("backend/daemon", "backend/qemu", "backend/hosts", "backend/store.py", "backend/client.py",
           "backend/cli.py", "tui")
# (file, function): why it may make a file by path -- it is not in mtevm's runtime or state dirs.
OUTSIDE_OUR_DIRS = {
    ("backend/hosts/local.py", "clone_storage"): "copies the user's disk images beside the originals, O_EXCL",
}


def _calls_by_function(tree) -> list[tuple[str, ast.Call]]:
    """Every call with the name of the function it is in ("" at module level)."""
    found = []

    def visit(node, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                found.append((function, child))
            visit(child, inner)
    visit(tree, "")
    return found


def _path_file_creations(path: str) -> list[str]:
    found = []
    rel = os.path.relpath(path, ROOT)
    for function, node in _calls_by_function(ast.parse(open(path).read(), path)):
        if (rel, function) in OUTSIDE_OUR_DIRS:
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
        what = None
        if name == "open" and owner is None:
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+"):
                what = f"open(..., {mode.value!r})"
        elif name in ("makedirs", "mkdir") and owner == "os" or name in ("write_text", "write_bytes", "touch"):
            what = name
        elif name == "open" and owner == "os" and "O_CREAT" in ast.dump(node):
            what = "os.open(O_CREAT)"
        if what:
            found.append(f"{rel}:{node.lineno} {what}")
    return found


def test_files_are_created_only_through_the_private_path_helpers():
    offenders = []
    for part in GUARDED:
        top = os.path.join(ROOT, part)
        files = [top] if top.endswith(".py") else [os.path.join(d, f) for d, _, fs in os.walk(top)
                                                     for f in fs if f.endswith(".py")]
        for path in files:
            offenders += _path_file_creations(path)
    assert offenders == [], ("create files in the runtime/state dirs with backend.paths.open_private_file/"
                             "open_private_path/ensure_private_dir; a file elsewhere (the user's own) goes in "
                             f"OUTSIDE_OUR_DIRS with the reason: {offenders}")
