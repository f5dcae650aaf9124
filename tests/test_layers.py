"""The package's folders are its layers: imports only go down ``ltnet_tf.LAYERS``, with no circle.

Every ``import`` in ``ltnet_tf/`` is read from the source (functions' deferred imports too), so a
circle or an import up the layers fails here before anyone has to untangle it.
"""
import ast
import pathlib

import pytest

import ltnet_tf

PACKAGE = pathlib.Path(ltnet_tf.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path, known: set) -> set:
    """The ltnet_tf modules ``path`` imports (``from pkg import module`` counts as the module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> dict:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) for p in paths}


def layer(module: str) -> int:
    parts = module.split(".")
    return -1 if len(parts) == 1 else ltnet_tf.LAYERS.index(parts[1])


def test_every_module_is_in_a_layer():
    unplaced = [m for m in import_graph() if m != "ltnet_tf" and
                m.split(".")[1] not in ltnet_tf.LAYERS]
    assert not unplaced, f"modules outside ltnet_tf.LAYERS: {unplaced}"


def test_imports_only_go_down_the_layers():
    upward = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
              if m != "ltnet_tf" and layer(d) > layer(m)]
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def find_circle(graph: dict):
    """One import circle as [m1, m2, ..., m1], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                circle = visit(dep)
                if circle:
                    return circle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            circle = visit(module)
            if circle:
                return circle
    return None


def test_every_import_names_a_module_that_exists():
    """Old module names are gone (no aliases): an import of ``ltnet_tf.X`` anywhere in the package,
    the tests or the benchmarks, deferred ones included, names a module or package that is there."""
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    stale = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "tests").glob("*.py"),
                        *(PACKAGE.parent / "bench").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     and not node.level else [])
            stale += [f"{path.name} -> {n}" for n in names
                      if n.split(".")[0] == "ltnet_tf" and n not in known]
    assert not stale, "imports of modules that do not exist:\n" + "\n".join(stale)


def test_no_import_circle():
    graph = {m: {d for d in deps if d != "ltnet_tf"} for m, deps in import_graph().items()}
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_top_level_holds_only_the_shared_facts():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 4 and set(top) <= set(ltnet_tf.LAYERS), top


@pytest.mark.parametrize("package", [p.parent for p in sorted(PACKAGE.glob("*/__init__.py"))],
                         ids=lambda p: p.name)
def test_each_subpackage_says_what_it_holds_and_may_import(package):
    docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    assert len(docstring) > 80 and "May import" in docstring, package.name


def test_modules_and_functions_stay_small():
    """One job per module (<= 400 lines) and per function (<= 60 lines): past that, split it."""
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > 400:
            too_big.append(f"{module_name(path)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    too_big.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert not too_big, "\n".join(too_big)
