"""The import-layer check: hwdiff's packages form a stack, and a module imports only from its own layer or
below — counting imports inside functions, which run later but still tie the modules together. Also: no
import cycle between modules at all. Exit 1 with one line per violation. Run by `make test` (docs/design.md,
"Layer order and package layout").

usage: python tools/check_layers.py [--graph]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# Bottom to top. A module belongs to the first entry that equals its name or is a package above it.
LAYERS: list[tuple[str, ...]] = [
    ("hwdiff.errors", "hwdiff._version"),
    ("hwdiff.common",),
    ("hwdiff.structure",),
    ("hwdiff.store",),
    ("hwdiff.capturing",),
    ("hwdiff.compare",),
    ("hwdiff.calibration",),
    ("hwdiff.aqn", "hwdiff.vllm"),
    ("hwdiff.measure",),
    ("hwdiff.reporting",),
    ("hwdiff.cli", "hwdiff.demo", "hwdiff.__main__"),
]
# The package root only re-exports by name (importlib at first use) and installs the old-path aliases.
UNLAYERED = ("hwdiff", "hwdiff._moved")

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, modules: set[str]) -> set[tuple[str, int]]:
    """(imported hwdiff module, line) for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [
                f"{stem}.{alias.name}"
                if f"{stem}.{alias.name}" in modules
                else f"{stem}.{LAZY[stem][alias.name]}"
                if alias.name in LAZY.get(stem, {})
                else stem
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("hwdiff") and target != name:
                found.add((target, node.lineno))
    return found


LAZY: dict[
    str, dict[str, str]
] = {}  # package -> {name: submodule} of a package that re-exports lazily


def lazy_exports(path: Path) -> dict[str, str]:
    """A package's ``_EXPORTS`` table (name -> submodule), read without importing it: ``from pkg import
    name`` is then an import of the submodule that holds the name."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", "") == "_EXPORTS" for t in node.targets
        ):
            return eval(
                compile(ast.Expression(node.value), str(path), "eval"),
                {"__builtins__": {"dict": dict}},
            )
    return {}


def layer_of(name: str) -> int | None:
    for index, members in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return index
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    paths = {module_name(p): p for p in sorted((ROOT / "hwdiff").rglob("*.py"))}
    modules = set(paths)
    for name, path in paths.items():
        if path.name == "__init__.py" and name != "hwdiff":
            LAZY[name] = lazy_exports(path)
    found = {name: imports(path, name, modules) for name, path in paths.items()}
    graph = {name: {target for target, _ in edges} for name, edges in found.items()}
    problems = []
    for name, path in paths.items():
        mine = layer_of(name)
        if mine is None:
            if name not in UNLAYERED:
                problems.append(f"{path.relative_to(ROOT)}: module {name} is in no declared layer")
            continue
        for target, line in sorted(found[name]):
            theirs = layer_of(target)
            if target in UNLAYERED and target != "hwdiff":
                problems.append(
                    f"{path.relative_to(ROOT)}:{line}: imports {target}, which nothing may import"
                )
            elif theirs is not None and theirs > mine:
                problems.append(
                    f"{path.relative_to(ROOT)}:{line}: {name} (layer {LAYERS[mine][0]}) imports "
                    f"{target} from a higher layer ({LAYERS[theirs][0]})"
                )
    # the package root is imported implicitly by every submodule: its edges are by name only
    graph.pop("hwdiff", None)
    for component in cycles({k: v - {"hwdiff"} for k, v in graph.items()}):
        problems.append(f"import cycle: {' <-> '.join(component)}")
    for problem in problems:
        print(problem)
    if "--graph" in sys.argv:
        for name in sorted(graph):
            print(name, "->", " ".join(sorted(graph[name])))
    print(
        f"import layers: {len(paths)} modules, {sum(map(len, graph.values()))} imports, "
        f"{len(problems)} problem(s)",
        file=sys.stderr,
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
