"""A compressed model compiles with torch.compile(fullgraph=True) -- no graph break in the
patched blocks, the plans or the kernel dispatch -- and the compiled model computes what the
eager one does, token counts included."""
import os
import shutil

import pytest
import torch

import vitcompress
from vitcompress.testing import tiny_vit

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
    reason="torch.compile's inductor backend needs a C++ compiler on a CPU")

SETTINGS = [  # tests/test_gpu_path.py compiles zero_tprune with the kernels (custom ops) by default
    ("tome", dict(r=4)),
    pytest.param("zero_tprune", dict(keep=0.9), marks=pytest.mark.slow),
    pytest.param("pitome", dict(keep=0.9), marks=pytest.mark.slow),
    pytest.param("evit", dict(), marks=pytest.mark.slow),
    pytest.param("mctf", dict(r=4, layers=[0, 1]), marks=pytest.mark.slow),  # its default skips block 0
    pytest.param("tofu", dict(r=4), marks=pytest.mark.slow),
    pytest.param("ppt", dict(keep=0.8, threshold=1e-4, layers=[0, 1]), marks=pytest.mark.slow),
    pytest.param("atc", dict(keep=0.9), marks=pytest.mark.slow),
    pytest.param("random", dict(keep=0.9), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("method,budget", SETTINGS)
def test_compiled_model_matches_eager(method, budget):
    torch._dynamo.reset()
    model = vitcompress.compress(tiny_vit(depth=2), method, **budget)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    st = vitcompress.stats(model)
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"] != [65] * 2


@pytest.mark.slow
def test_compiled_model_follows_restore_and_recompress():
    """Dynamo's guards see the patched forwards change: no stale compressed graph after restore."""
    torch._dynamo.reset()
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original = model(x)
        vitcompress.compress(model, "tome", r=4)
        compiled = torch.compile(model)
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
        vitcompress.restore(model)
        assert torch.allclose(compiled(x), original, atol=1e-5)
        vitcompress.compress(model, "zero_tprune", keep=0.8)
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
        assert not torch.allclose(model(x), original, atol=1e-3)
