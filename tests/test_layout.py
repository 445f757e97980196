"""Repository layout and the package's import graph: properties/ at the top level, registry.py at the bottom of
the graph, no import cycle among recbole_mm modules (module-level and function-level imports alike)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "recbole_mm"


def _module_files() -> dict:
    """module name -> file, for every .py of the package."""
    out = {}
    base = os.path.join(ROOT, PACKAGE)
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


def _resolve(module: str, is_package: bool, node: ast.AST, modules: set) -> set:
    """recbole_mm modules an import statement imports (the package itself for a name defined in it)."""
    found = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                found.add(alias.name)
        return found
    if node.level:  # relative: from . import x / from ..data import y
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base != PACKAGE and not base.startswith(PACKAGE + "."):
        return found
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.add(sub if sub in modules else base)  # a submodule, or a name defined in module `base`
    return found


def import_graph() -> dict:
    """module -> set of recbole_mm modules it imports anywhere in its body (functions included)."""
    files = _module_files()
    graph = {}
    for module, path in files.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
        is_package = path.endswith("__init__.py")
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _resolve(module, is_package, node, set(files))
        graph[module] = {e for e in edges if e != module}
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_graph_parser_sees_function_level_and_relative_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    modules = {"recbole_mm", "recbole_mm.data", "recbole_mm.data.utils", "recbole_mm.registry"}
    rel = ast.parse("from ..registry import get_model").body[0]
    assert _resolve("recbole_mm.data.utils", False, rel, modules) == {"recbole_mm.registry"}
    name = ast.parse("from recbole_mm import __version__").body[0]
    assert _resolve("recbole_mm.data.utils", False, name, modules) == {"recbole_mm"}
    graph = import_graph()
    assert "recbole_mm.config" in graph["recbole_mm.patch"]  # imported inside install(), a function
    assert "recbole_mm.registry" in graph["recbole_mm.data.utils"]


def test_no_import_cycle_among_recbole_mm_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_registry_is_the_bottom_of_the_graph():
    graph = import_graph()
    assert graph["recbole_mm.registry"] == set(), graph["recbole_mm.registry"]
    for light in ("recbole_mm.paths", "recbole_mm._version"):
        assert graph[light] == set()
    # the lookups that need data / trainer classes live with them, not in the registry
    import recbole_mm.registry as registry

    for name in ("get_trainer", "get_dataset_class", "install"):
        assert not hasattr(registry, name)


def test_properties_folder_is_top_level():
    top = os.path.join(ROOT, "properties")
    for rel in ("overall_mm.yaml", os.path.join("model", "MoRec.yaml"), os.path.join("dataset", "ml-100k-mm.yaml")):
        assert os.path.isfile(os.path.join(top, rel)), rel
    # a leftover recbole_mm/properties/ would be a second, ignored copy (yaml edited there would not load)
    assert not os.path.exists(os.path.join(ROOT, PACKAGE, "properties"))
    from recbole_mm import config, paths

    assert os.path.samefile(paths.properties_dir(), top)
    assert os.path.samefile(config.PROPERTIES_DIR, top)


@pytest.mark.parametrize("subdir", ["dataset_converters", "properties"])
def test_top_level_folders_beside_the_package(subdir):
    assert os.path.isdir(os.path.join(ROOT, subdir)) and os.path.isdir(os.path.join(ROOT, PACKAGE))
