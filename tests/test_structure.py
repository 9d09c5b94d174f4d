"""The project's modules import one way: the commands on top, the stages below them, the shared
ground at the bottom (README, "Architecture").

Every import counts, including those inside functions (a lazy import still ties two modules
together), so the graph has no cycle at all, and no module imports a package of its own layer or
of a layer above it (only its own package, or a package of a layer below).
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bottom to top; packages of one layer do not import each other (stages talk through the stem
# store and run folders)
LAYERS = (("core",), ("separators",), ("cache", "mixer"), ("reports",), ("pipeline",))
PACKAGES = tuple(p for layer in LAYERS for p in layer)
LAYER_OF = {p: i for i, layer in enumerate(LAYERS) for p in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                # the deepest project module the name refers to
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != mod and name not in PACKAGES:
                    graph[mod].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and graph["pipeline.cli"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a.x -> b.y' for every import of another package that is not in a lower layer."""
    bad = []
    for mod, deps in sorted(graph.items()):
        mine = mod.split(".")[0]
        for dep in sorted(deps):
            theirs = dep.split(".")[0]
            if theirs != mine and LAYER_OF[theirs] >= LAYER_OF[mine]:
                bad.append(f"{mod} -> {dep}")
    return bad


def test_every_import_points_down():
    graph = import_graph()
    assert {m.split(".")[0] for m in graph} == set(PACKAGES)
    bad = upward_imports(graph)
    assert not bad, "imports of a layer not below the importer's: " + "; ".join(bad)


def test_layer_check_finds_an_upward_import():
    assert upward_imports({"core.store": {"mixer.apply"}, "mixer.apply": set()}) == \
        ["core.store -> mixer.apply"]
    assert upward_imports({"cache.run": {"mixer.apply"}, "mixer.apply": set()}) == \
        ["cache.run -> mixer.apply"]   # one layer: neither imports the other
    assert upward_imports({"reports.evaluate": {"mixer.apply", "core.store"}}) == []
