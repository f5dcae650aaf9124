"""The benchmarks under bench/ are scripts run by hand (never as tests: they take minutes to hours
on real data), so a name they take from another bench module or from the package can go missing
without any test importing them. This reads their source and checks every such name exists."""
import ast
import importlib
import os

import pytest

from helpers import REPO

BENCH = os.path.join(REPO, "bench")
SCRIPTS = sorted(name for name in os.listdir(BENCH) if name.endswith(".py"))


def _defined(module_name: str) -> set:
    """Top-level names of a bench module (definitions, assignments, imports), from its source."""
    tree = ast.parse(open(os.path.join(BENCH, module_name + ".py")).read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _bench_modules() -> set:
    return {name[:-3] for name in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_names_taken_from_bench_modules_exist(script):
    tree = ast.parse(open(os.path.join(BENCH, script)).read())
    modules = _bench_modules()
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "bench":
            for alias in node.names:
                assert alias.name in modules, f"bench/{script}: no module bench/{alias.name}.py"
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bench."):
            module = node.module.split(".", 1)[1]
            assert module in modules, f"bench/{script}: no module bench/{module}.py"
            missing = {a.name for a in node.names} - _defined(module)
            assert not missing, f"bench/{script}: bench/{module}.py has no {sorted(missing)}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            module = aliases[node.value.id]
            assert node.attr.startswith("__") or node.attr in _defined(module), \
                f"bench/{script}: bench/{module}.py has no {node.attr}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_names_taken_from_the_package_exist(script):
    """``from ltnet_tf.x import y`` in a benchmark: the module imports and has ``y``."""
    tree = ast.parse(open(os.path.join(BENCH, script)).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ltnet_tf"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(
                    f"{node.module}.{alias.name}") is not None, \
                    f"bench/{script}: {node.module} has no {alias.name}"
