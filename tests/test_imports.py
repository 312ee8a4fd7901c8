"""The package's import graph has no circles: every ``import`` and ``from ... import`` of a minissl
module counts, at module level and inside functions alike (a function-level import only hides a
circle until the function runs)."""
import ast
from pathlib import Path

import minissl

ROOT = Path(minissl.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The minissl modules that ``path`` (module ``name``) imports anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
               for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:
                if f"{source}.{a.name}" in modules:
                    out.add(f"{source}.{a.name}")
                elif source in modules:
                    out.add(source)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` over every ``.py`` file of the package."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: _imports(path, name, set(files)) for name, path in sorted(files.items())}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle ``[a, b, ..., a]`` per strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_shortest_circle(graph, g) for g in groups]


def _shortest_circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest path inside ``group`` that leaves its smallest name and comes back (breadth-first)."""
    start = min(group)
    parent, frontier = {}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(group)


def test_circle_finder_finds_a_planted_circle():
    graph = {"a": {"b", "d"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "b"}}
    assert circles(graph) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_count():
    graph = import_graph()
    assert "minissl.engine" in graph["minissl.cli"]  # imported inside cmd_train only


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)
