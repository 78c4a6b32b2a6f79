"""A checkout runs its own tests in a fresh environment: ``vitcompress`` is the only importable package
at the repository root, so nothing the project ships shadows an installed package of the same name
(current transformers imports Hugging Face's ``kernels``; PyPI's ``adapters`` is AdapterHub), even for
``python -m pytest`` / ``python -c`` started at the root, which put the root first on ``sys.path``."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_only_vitcompress_is_importable_from_the_root():
    packages = sorted(d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py")))
    modules = sorted(f for f in os.listdir(ROOT) if f.endswith(".py") and f != "setup.py")
    assert packages == ["vitcompress"] and modules == []


def test_the_root_shadows_no_installed_package():
    pytest.importorskip("transformers")
    code = """
import importlib, importlib.util, os, sys
root = os.getcwd()
for name in ("kernels", "adapters"):
    spec = importlib.util.find_spec(name)
    if spec is not None:  # installed (transformers brings kernels): it must be the installed one
        module = importlib.import_module(name)
        assert not os.path.abspath(module.__file__).startswith(root + os.sep), (name, module.__file__)
        print(name, "installed")
import torch
from transformers import ViTConfig, ViTModel
config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   image_size=32, patch_size=8)
print(tuple(ViTModel(config).eval()(torch.randn(1, 3, 32, 32)).last_hidden_state.shape))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "(1, 17, 32)"


def test_the_version_is_the_changelogs():
    import vitcompress

    heading = re.search(r"^## (\S+)", open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8").read(), re.M)
    unreleased = "(unreleased)" in heading.string[heading.end():heading.string.index("\n", heading.end())]
    assert vitcompress.__version__ == heading.group(1) + (".dev0" if unreleased else "")


def test_every_module_path_the_docs_show_resolves():
    """Every ``vitcompress.x.y`` the README and the site's pages (docs/**/*.md) show is importable."""
    import glob
    import importlib

    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    names = {}
    for page in pages:
        text = open(page, encoding="utf-8").read()
        for name in re.findall(r"\bvitcompress(?:\.[A-Za-z_]\w*)+", text):
            names.setdefault(name, os.path.relpath(page, ROOT))
    assert len(names) > 10 and any(page == "README.md" for page in names.values())
    for name, page in sorted(names.items()):
        parts = name.split(".")
        obj = importlib.import_module(parts[0])
        for part in parts[1:]:
            try:
                obj = getattr(obj, part)
            except AttributeError:
                try:
                    obj = importlib.import_module(f"{obj.__name__}.{part}")
                except (ModuleNotFoundError, AttributeError):
                    raise AssertionError(f"{page} shows {name}, which does not resolve") from None
        assert obj is not None, name
