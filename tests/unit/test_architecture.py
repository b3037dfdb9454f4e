"""No import cycles in shardmerge.engine, shardmerge.kernels or shardmerge.jobs, from the source.

The graph is built with `ast`, not by importing: every import statement of a module counts, at module level or
inside a function (a function-local import that only exists to break a cycle at run time is still a cycle).

What an edge is:
- `import a.b.c` depends on `a.b.c`; `from a.b import c` on the submodule `a.b.c` when there is one, else on the
  package `a.b` (its `__init__`); relative imports are resolved against the importing module's package.
- Importing a module also runs its ancestor packages' `__init__` first, so `import a.b.c` depends on `a` and
  `a.b` as well, except on the importer's own ancestors: Python has already started running those before the
  importer's first line, so they add no order to satisfy. A package `__init__` that imports its own submodules
  (a registry collecting them, say) is therefore not a cycle by itself; it becomes one when such a submodule
  imports names back from that `__init__` (`from a.b import register`), which is an explicit edge.
- Registries that discover their modules with importlib at first lookup (shardmerge.engine.methods,
  shardmerge.engine.plan.forms) add no edge: that happens after the registry module has finished initialising,
  and the discovered modules' own import statements are in the graph like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import shardmerge

ROOT = Path(shardmerge.__file__).resolve().parent
CHECKED = ("engine", "kernels", "jobs")  # subpackages of shardmerge whose modules must form an acyclic graph


def modules(root: Path, package: str, subdirs) -> dict[str, Path]:
    """Dotted module name -> file, for `package` (rooted at `root`) and the listed subpackages."""
    out = {package: root / "__init__.py"}
    for sub in subdirs:
        for path in sorted((root / sub).rglob("*.py")):
            parts = (package, *path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def _explicit_targets(node: ast.AST, module: str, mods: dict[str, Path]) -> list[str]:
    """The modules one import statement names (only those in `mods`)."""
    if isinstance(node, ast.Import):
        out = []
        for alias in node.names:
            parts = alias.name.split(".")
            for k in range(len(parts), 0, -1):  # the longest prefix that is a module of ours
                if ".".join(parts[:k]) in mods:
                    out.append(".".join(parts[:k]))
                    break
        return out
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        package = module if _is_package(module, mods) else module.rsplit(".", 1)[0]
        base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in mods:
            out.append(sub)
        elif base in mods:
            out.append(base)
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def import_graph(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {module it depends on: line of the first import statement that makes the edge}."""
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own = set(_ancestors(module))  # already running when `module` starts
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _explicit_targets(node, module, mods):
                implicit = [a for a in _ancestors(target) if a in mods and a not in own]
                for dep in [target, *implicit]:
                    if dep != module:
                        graph[module].setdefault(dep, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a closed path of modules) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm, recursive (the graph has a few hundred nodes)
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_in(graph, set(c), c[0]) for c in sorted(comps)]


def _path_in(graph, comp: set[str], start: str) -> list[str]:
    """A shortest cycle through `start` inside one component (breadth-first)."""
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w in comp and w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")


def describe(graph, cycle: list[str], mods: dict[str, Path], root: Path) -> str:
    hops = [f"{a} ({mods[a].relative_to(root)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join([*hops, cycle[-1]])


def test_no_import_cycles():
    mods = modules(ROOT, "shardmerge", CHECKED)
    graph = import_graph(mods)
    found = cycles(graph)
    assert not found, "import cycles (module (file:line of the import) -> the module it imports):\n" + "\n".join(
        describe(graph, c, mods, ROOT) for c in found
    )


def test_graph_covers_every_module_and_sees_lazy_imports():
    """The graph has every module of the checked packages and the edges a reader sees, function-local ones too."""
    mods = modules(ROOT, "shardmerge", CHECKED)
    on_disk = {p for sub in CHECKED for p in (ROOT / sub).rglob("*.py")}
    assert set(mods.values()) == on_disk | {ROOT / "__init__.py"}
    graph = import_graph(mods)
    assert "shardmerge.engine.plan.model" in graph["shardmerge.engine.plan.build"]
    assert "shardmerge.engine.io.legacy_bin" in graph["shardmerge.engine.io.checkpoint"]  # inside a function


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.mark.parametrize(
    "files, want",
    [
        # a function-local import closing the loop
        (
            {"a/x.py": "from pkg.a import y\n", "a/y.py": "def f():\n    from pkg.a.x import g\n"},
            ["pkg.a.x", "pkg.a.y", "pkg.a.x"],
        ),
        # `from pkg.a import y` names the submodule y; a relative import back closes the loop
        ({"a/x.py": "from pkg.a import y\n", "a/y.py": "from . import x\n"}, ["pkg.a.x", "pkg.a.y", "pkg.a.x"]),
        # a registry __init__ importing its submodule, which imports a name back from the __init__
        (
            {
                "a/__init__.py": "from pkg.a.y import f\ndef register(): pass\n",
                "a/y.py": "from pkg.a import register\n",
            },
            ["pkg.a", "pkg.a.y", "pkg.a"],
        ),
        # importing a submodule runs its package's __init__, which imports the importer
        (
            {"a/__init__.py": "import pkg.b.z\n", "a/y.py": "", "b/z.py": "import pkg.a.y\n"},
            ["pkg.a", "pkg.b.z", "pkg.a"],
        ),
    ],
)
def test_cycles_are_found(tmp_path, files, want):
    root = tmp_path / "pkg"
    _write(root, {"__init__.py": "", "a/__init__.py": "", "b/__init__.py": "", **files})
    mods = modules(root, "pkg", ("a", "b"))
    graph = import_graph(mods)
    assert cycles(graph) == [want]
    assert describe(graph, want, mods, root).startswith(f"{want[0]} (")


def test_registry_init_importing_its_own_submodules_is_not_a_cycle(tmp_path):
    """The package's submodules import each other and other packages' modules; none imports the __init__, and
    nothing the __init__ imports depends on a module that imports the package."""
    root = tmp_path / "pkg"
    _write(
        root,
        {
            "__init__.py": "",
            "a/__init__.py": "from pkg.a.base import Spec\nfrom pkg.a import impl\n",
            "a/base.py": "class Spec: pass\n",
            "a/impl.py": "from pkg.a.base import Spec\nimport pkg.b.util\n",
            "b/__init__.py": "",
            "b/util.py": "X = 1\n",
            "b/other.py": "import pkg.a.base\n",
        },
    )
    graph = import_graph(modules(root, "pkg", ("a", "b")))
    assert "pkg.a" in graph["pkg.b.other"]  # a module outside the package depends on the package's __init__
    assert cycles(graph) == []
