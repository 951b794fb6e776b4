"""The import layering of ARCHITECTURE.md, checked: no module imports a layer above its own, no import loops.

The one exception to "no loops": a package's __init__ importing its own members (a registry that
imports the modules that register into it, or a package re-exporting its parts).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "expertkit"

# bottom to top: a module may import its own layer and the layers below it
LAYERS = [
    ["expertkit", "errors", "registry", "quiet", "progress", "fsutil", "plots", "demo_data"],
    ["config"],
    ["base", "library", "encoding", "data", "optim", "replay", "proxy_loss", "build", "gguf_export", "gguf_import", "models"],
    ["runtime"],
    ["routing"],
    ["compose"],
    ["scoring", "evaluate", "executors", "merging", "train", "tasks", "porting", "federated", "distill", "companion_init"],
    ["serve"],
    ["workflow", "demo", "cli"],
]


def module_files(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = ["expertkit", *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the expertkit modules it imports anywhere (function-level imports too)."""
    modules = module_files(root)
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                    node.module.split(".")[0] == "expertkit":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "expertkit")
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "expertkit"
    for i, names in enumerate(LAYERS):
        if key in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py; add it where ARCHITECTURE.md says")


def package_member(importer: str, imported: str, root: Path) -> bool:
    """`importer` is a package __init__ and `imported` one of its own members."""
    return module_files(root)[importer].name == "__init__.py" and imported.startswith(importer + ".")


def upward_imports(root: Path) -> list[str]:
    graph = import_graph(root)
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


def import_loops(root: Path) -> list[list[str]]:
    """Every loop of the import graph (one per strongly connected set), package-member edges left out."""
    graph = {a: {b for b in deps if not package_member(a, b, root)} for a, deps in import_graph(root).items()}
    index, low, stack, on_stack, loops = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                loops.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


def test_every_module_has_a_layer():
    for module in module_files(PACKAGE):
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(PACKAGE) == []


def test_no_import_loops_outside_package_members():
    assert import_loops(PACKAGE) == []


def test_the_check_catches_an_upward_import_and_a_loop(tmp_path):
    root = tmp_path / "expertkit"
    (root / "runtime").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "runtime" / "__init__.py").write_text("from expertkit.runtime import pool\n")
    (root / "runtime" / "pool.py").write_text("from expertkit.compose import helper\n")
    (root / "compose").mkdir()
    (root / "compose" / "__init__.py").write_text("")
    (root / "compose" / "helper.py").write_text("def f():\n    from expertkit.compose import other\n")
    (root / "compose" / "other.py").write_text("from expertkit.compose.helper import f\n")
    assert upward_imports(root) == ["expertkit.runtime.pool -> expertkit.compose.helper"]
    assert import_loops(root) == [["expertkit.compose.helper", "expertkit.compose.other"]]
