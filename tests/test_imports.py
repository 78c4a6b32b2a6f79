"""The package's import graph: no cycles (imports inside functions included), adapters know no
method and no API, the interfaces module is a leaf, the kernels load without the adapters, and the
tests' helpers (``vitcompress.testing``) stay out of the library."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules():
    """Module name -> (path, is_package) for every module of the installed package."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "vitcompress")):
        dirnames[:] = [d for d in dirnames if os.path.exists(os.path.join(dirpath, d, "__init__.py"))]
        prefix = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
        for name in filenames:
            if name.endswith(".py"):
                mod = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                found[mod] = (os.path.join(dirpath, name), name == "__init__.py")
    return found


def imports_of(module, path, is_package, known):
    """The package's modules that ``module`` imports anywhere in its file (functions included)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known and n != module)
    return out


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {m: imports_of(m, path, pkg, known) for m, (path, pkg) in known.items()}


def test_no_import_cycles(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_adapters_import_no_method_and_no_api(graph):
    for m, deps in graph.items():
        if m.startswith("vitcompress.adapters"):
            bad = sorted(d for d in deps if d.startswith("vitcompress.methods") or d == "vitcompress.api")
            assert not bad, f"{m} imports {bad}: adapters map models, methods live in vitcompress.methods"


def test_interfaces_is_a_leaf(graph):
    assert graph["vitcompress.interfaces"] == set()


def test_the_walk_sees_the_package(graph):
    # the graph is the real one: the API reaches the adapters and the methods
    assert "vitcompress.adapters" in graph["vitcompress.api"] and "vitcompress.methods" in graph["vitcompress.api"]
    assert "vitcompress.kernels.dispatch" in graph


def test_kernels_import_without_adapters_or_methods():
    code = ("import sys, vitcompress.kernels; "
            "print(sorted(m for m in sys.modules if m.startswith(('vitcompress.adapters', 'vitcompress.methods', "
            "'vitcompress.api', 'timm', 'transformers', 'open_clip'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_of_the_package_imports_the_testing_module(graph):
    users = sorted(m for m, deps in graph.items() if "vitcompress.testing" in deps)
    assert users == [], f"{users} import vitcompress.testing: it is for the tests and the experiments only"


def test_the_testing_module_imports_no_model_library():
    code = ("import sys, vitcompress.testing; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'transformers', 'open_clip')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_subpackages_are_attributes():
    import vitcompress

    assert callable(vitcompress.methods.zero_tprune.weighted_pagerank)
    assert callable(vitcompress.list_methods) and "tome" in vitcompress.list_methods("vit")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vitcompress.nope
