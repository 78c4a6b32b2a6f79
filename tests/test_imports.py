"""The package's import graph: no cycles (imports inside functions included), layers that depend
only downward (the kernels on nothing above them, the profile on no adapter module), adapters that
know no method and no API and share pieces through one module, no private name imported from
another module, the interfaces module a leaf, the kernels loading without the adapters, an adapter
that touches its own library only for a model of its family, and the tests' helpers
(``vitcompress.testing``) kept out of the library."""
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


def test_kernels_import_only_kernels(graph):
    for m, deps in graph.items():
        if m.startswith("vitcompress.kernels"):
            bad = sorted(d for d in deps if not d.startswith("vitcompress.kernels"))
            assert not bad, f"{m} imports {bad}: the kernels depend on nothing above them"


#: the one module the adapters share pieces through
SHARED_ADAPTER_MODULE = "vitcompress.adapters.common"
#: an adapter composing another family's adapter (its public class): LLaVA runs ViT methods in its CLIP tower
COMPOSED_ADAPTERS = {("vitcompress.adapters.llava", "vitcompress.adapters.hf_clip")}


def test_adapters_share_pieces_through_one_module(graph):
    adapters = [m for m in graph if m.startswith("vitcompress.adapters.")]
    assert SHARED_ADAPTER_MODULE in adapters and len(adapters) > 2
    for m in adapters:
        bad = sorted(d for d in graph[m] if d.startswith("vitcompress.adapters") and d != SHARED_ADAPTER_MODULE
                     and (m, d) not in COMPOSED_ADAPTERS)
        assert not bad, f"{m} imports {bad}: adapters share pieces through {SHARED_ADAPTER_MODULE} only"
    assert all(d in graph[m] for m, d in COMPOSED_ADAPTERS)
    assert set(adapters) - {SHARED_ADAPTER_MODULE} <= graph["vitcompress.adapters"]  # the package lists them all


def test_profile_reads_no_adapter_module(graph):
    # the adapter of a model comes from the package's find_adapter, as for compress; what a family
    # keeps where stays in its adapter module
    for m, deps in graph.items():
        if m.startswith("vitcompress.profile"):
            bad = sorted(d for d in deps if d.startswith("vitcompress.adapters."))
            assert not bad, f"{m} imports {bad}: the profile reads no adapter internals"


def private_imports():
    """(importer, imported module, name) for every ``from <package module> import _name``."""
    found = set()
    for module, (path, is_package) in modules().items():
        package = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").split(".")[0] == "vitcompress":
                base = node.module
            else:
                continue
            found.update((module, base, a.name) for a in node.names
                         if a.name.startswith("_") and not a.name.endswith("__"))
    return found


def test_no_private_name_is_imported_from_another_module():
    found = private_imports()
    assert not found, sorted(found)


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


#: in a fresh process with transformers loaded: compress an open_clip tower (whose adapter comes after
#: the DETR one) and a timm ViT, and ask what a wrapped ViT takes (every adapter looks at the wrapper),
#: then print the transformers families that got imported; then the same with transformers' DETR
#: module broken
FAMILY_CHECK = """
import sys, types
import torch, transformers
import open_clip.transformer
from timm.models.vision_transformer import VisionTransformer
import vitcompress

def compress_both():
    torch.manual_seed(0)
    tower = open_clip.transformer.VisionTransformer(32, 4, 32, 2, 2, 2.0, output_dim=16).eval()
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4).eval()
    for model in (tower, vit):
        vitcompress.compress(model, "tome", r=1)
        model(torch.randn(1, 3, 32, 32))
    return vitcompress.supported(torch.nn.Sequential(vitcompress.restore(vit)))["tome"]

compress_both()
print(sorted(m for m in sys.modules if m.startswith(("transformers.models.detr", "transformers.models.llava",
                                                      "transformers.models.clip"))))

class Broken(types.ModuleType):
    def __getattr__(self, name):
        raise RuntimeError("this DETR module is broken")

sys.modules["transformers.models.detr.modeling_detr"] = Broken("transformers.models.detr.modeling_detr")
print(compress_both())
"""


def test_an_adapter_touches_its_library_only_for_a_model_of_its_family():
    for library in ("transformers", "open_clip", "timm"):
        pytest.importorskip(library)
    out = subprocess.run([sys.executable, "-c", FAMILY_CHECK], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded, wrapped = out.stdout.strip().splitlines()[-2:]
    assert loaded == "[]"
    assert "compress that instead, vitcompress.compress(model[0], ...)" in wrapped


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
