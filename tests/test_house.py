"""The house rules of the layout, checked on the source so they stay true (issue 11).

Each rule reads the tree with `ast` (nothing is imported): no import cycle among the project's
modules (function-level imports count too: a lazy import hides a cycle, it does not remove it), no
module over 400 lines, at most a handful of modules directly in `worker/` and `orchestrator/`,
every package says what it holds, the environment is read in one module, the engine never imports
Ray, and library code logs instead of printing.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("worker", "orchestrator")
MAX_LINES = 400
MAX_TOP_LEVEL = 11


def modules() -> dict[str, Path]:
    """Dotted module name → file, for cli.py and every module of the packages."""
    out = {"cli": ROOT / "cli.py"}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in the file (`from pkg import mod` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # importing a package runs its __init__ only: edges to a package are edges to its __init__ module
    return {m: {d for d in imports_of(p, known) if d != m} for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a → b → ... → a, or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " → ".join(find_cycle(import_graph()))


def test_no_module_over_400_lines():
    big = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, big


def test_few_modules_at_the_top_of_each_package():
    for pkg in PACKAGES:
        top = [p.name for p in (ROOT / pkg).glob("*.py") if p.name != "__init__.py"]
        assert len(top) <= MAX_TOP_LEVEL, (pkg, sorted(top))


def test_every_package_maps_its_modules():
    for pkg in PACKAGES:
        for init in (ROOT / pkg).rglob("__init__.py"):
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and len(doc) > 40, f"{init.relative_to(ROOT)} has no docstring mapping its modules"
            mods = [p.stem for p in init.parent.glob("*.py") if p.name != "__init__.py"]
            missing = [m for m in mods if f"`{m}`" not in doc]
            assert not missing, f"{init.relative_to(ROOT)} does not mention {missing}"


def _calls(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                and node.attr in ("environ", "getenv", "putenv", "unsetenv"):
            out.append(f"os.{node.attr}")
    return out


def test_environment_read_in_one_module():
    readers = {m for m, p in modules().items() if _calls(ast.parse(p.read_text()))}
    assert readers == {"worker.envs"}, readers


def test_the_engine_never_imports_ray():
    for m, p in modules().items():
        if m.startswith("worker"):
            tree = ast.parse(p.read_text())
            names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert "ray" not in names, m


def test_library_code_logs_instead_of_printing():
    for m, p in modules().items():
        if m == "cli":
            continue
        tree = ast.parse(p.read_text())
        prints = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                  and n.func.id == "print"]
        assert not prints, (m, prints)
