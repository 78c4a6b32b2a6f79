"""The GPU path of a compressed ViT, checked where it can be without a GPU (issue 13):

* few kernel launches per reducing block (``experiments/benchmarks/count_launches.py`` on a small model, the
  Triton kernels forced: one launch each), within the aims (tome / pitome 18, zero_tprune 35, evit 45,
  mctf 100, tofu 32, ppt 40, atc 240);
* no host-device synchronisation in a compressed forward of any ViT method with a static schedule
  (a sync is also what CUDA-graph capture refuses);
* half precision stays half: no float32 copy of the hidden states (or of the attention) in a
  float16 / bfloat16 model's compressed blocks;
* the custom ops (``torch.ops.vitcompress.*``) pass ``torch.library.opcheck`` (schema, fake
  implementation, AOT dispatch), and ``torch.compile(fullgraph=True)`` with the kernels forced
  runs them, equals eager and does not recompile for a second batch.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which must be
set before Triton is first imported: as in ``tests/test_kernels.py``, this file re-runs itself in
a subprocess that has it when it was not (``TRITON_INTERPRET=1 python -m pytest
tests/test_gpu_path.py -k ...`` for selections). With a GPU everything runs on it directly, and the
no-sync test also turns on ``torch.cuda.set_sync_debug_mode("error")``.
"""
import os
import shutil
import sys
from collections import Counter

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # still in time

pytest.importorskip("triton")

import vitcompress  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from vitcompress.kernels import _triton_utils, dispatch  # noqa: E402

from conftest import interpreted_process_runner, load_script  # noqa: E402
from vitcompress.testing import tiny_vit  # noqa: E402

IN_SUBPROCESS = not CUDA and not _triton_utils.interpreter_ready()
DEVICE = "cuda" if CUDA else "cpu"


count_launches = load_script("benchmarks/count_launches.py")

#: the ViT methods with a static schedule, each at a budget that reduces in every block of a 2-block ViT
VIT_SETTINGS = [("tome", dict(r=4)), ("pitome", dict(keep=0.9)), ("zero_tprune", dict(keep=0.9)),
                ("evit", dict(keep=0.9)), ("mctf", dict(r=4, layers=[0, 1])), ("tofu", dict(r=4)),
                ("ppt", dict(keep=0.9)), ("atc", dict(keep=0.9)), ("random", dict(keep=0.9))]
#: blocks these settings reduce in of the 4-block ViT where launches are counted (others: all 4)
REDUCING_OF_FOUR = {"evit": 3, "mctf": 2, "ppt": 3}
#: the methods whose scoring reads the attention probabilities (materialised in their reducing blocks)
READ_ATTENTION = ("zero_tprune", "evit", "mctf", "ppt")


_skipped_here, test_gpu_path_in_an_interpreted_process = interpreted_process_runner(__file__, IN_SUBPROCESS)


@pytest.fixture
def kernels(monkeypatch):
    """Force a kernel backend for the test: ``kernels("triton")`` / ``kernels("torch")``."""
    def use(choice):
        monkeypatch.setenv("VITCOMPRESS_KERNELS", choice)
    return use


def test_vit_settings_cover_every_static_vit_method():
    static = [m for m in vitcompress.list_methods("vit") if not vitcompress.describe(m)["dynamic"]]
    assert sorted(static) == sorted(m for m, _ in VIT_SETTINGS)


# ---------------------------------------------------------------------------- launch counts


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_launch_counts_within_the_aims(kernels, dtype):
    """The count script's own numbers on a small ViT: an uncompressed block is about ten launches,
    a reducing block of tome / pitome at most 18, of zero_tprune at most 35 and of tofu at most 32
    (its MLERP rescale is torch ops after the fused apply; Triton forced)."""
    kernels("triton")
    settings = [f"{m}:" + ",".join(f"{k}={v}" for k, v in b.items()) for m, b in VIT_SETTINGS]
    rows = count_launches.measure("tiny", settings, device=DEVICE, dtype=dtype, batch_size=2)
    assert [r["method"] for r in rows] == [m for m, _ in VIT_SETTINGS]
    for r in rows:
        assert 8 <= r["plain"] <= 12, r
        assert len(r["reducing"]) == REDUCING_OF_FOUR.get(r["method"], 4), r
        assert r["max"] <= count_launches.AIMS[r["method"]], (r["setting"], r["per_block"], r["ops"])
        assert r["max"] > r["plain"]
        assert r["syncs"] == []
        first = r["ops"]["block 1"]
        assert any(name.startswith("triton:") for name in first), first  # the kernels did run


def test_launch_counter_counts_what_it_should():
    """Views and allocations are free; an aten kernel, a Triton launch and a custom op count one
    each (the op's inside, not its dispatcher call); syncs are recorded."""
    x = torch.randn(4, 6, device=DEVICE)
    with count_launches.counting() as c:
        y = x.view(24)[:5].unsqueeze(0).expand(3, 5).t()  # views
        torch.empty(3, device=DEVICE)
        z = x * 2 + 1  # two kernels
    assert c.launches["other"] == 2  # mul, add
    with count_launches.counting() as c:
        from vitcompress.kernels import topk_triton
        topk_triton.topk_indices(z, 2)
        torch.ops.vitcompress.topk_indices(z, 2)
    assert c.ops["other"]["triton:_topk_kernel"] == 2 and c.launches["other"] == 2
    with count_launches.counting() as c:
        y.sum().item()
        torch.nonzero(x > 0)
        bool(x[0, 0] > 0)
    assert {what for _, what in c.syncs} >= {"aten::_local_scalar_dense", "aten::nonzero", "Tensor.item",
                                             "Tensor.__bool__"}


# ---------------------------------------------------------------------------- no host-device sync


class _NoSync(TorchDispatchMode):
    """Fails at the first op that waits for the device or whose output shape depends on values."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = count_launches._name(func)
        if name in count_launches.SYNC_OPS and count_launches._Launches.depth == 0:
            raise AssertionError(f"host-device sync in a compressed forward: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method,budget,backend", [
    *((m, b, k) for m, b in VIT_SETTINGS for k in ("triton", "torch")),
    ("zero_tprune", dict(keep=0.85, order="IS"), "triton"), ("tome", dict(r=3, trace_source=True), "triton"),
    *(pytest.param(m, b, "torch", marks=pytest.mark.slow)
      for m, b in (("zero_tprune", dict(keep=0.85, order="IS")), ("tome", dict(r=3, trace_source=True))))])
def test_compressed_forward_never_syncs(method, budget, backend, kernels):
    """Every ViT method with a static schedule, on the kernels (the GPU path) and on the torch
    references (which "auto" still picks on a GPU for a few shapes): no op that waits for the
    device, no host read of a tensor value."""
    kernels(backend)
    model = vitcompress.compress(tiny_vit(depth=2, reg_tokens=2).to(DEVICE), method, **budget)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        if CUDA:
            model(x)  # warm-up: Triton compiles on the first launch on a GPU
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with count_launches.counting(model) as c, _NoSync():
                model(x)
        finally:
            if CUDA:
                torch.cuda.set_sync_debug_mode(0)
    assert c.syncs == [], c.syncs  # Tensor.item / tolist / bool and the syncing aten ops
    st = vitcompress.stats(model)
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"] and st["tokens_per_layer"][-1] < 67


# ---------------------------------------------------------------------------- half precision


class _Dtypes(TorchDispatchMode):
    """Records ``(op, dtype, shape)`` of every floating tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if count_launches._Launches.depth == 0:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.seen.append((count_launches._name(func), t.dtype, tuple(t.shape)))
        return out


HALF_CASES = [
    *((m, b, torch.float16, "triton") for m, b in VIT_SETTINGS),
    *((m, b, torch.bfloat16, "torch") for m, b in VIT_SETTINGS),
    *(pytest.param(m, b, d, k, marks=pytest.mark.slow)
      for m, b in VIT_SETTINGS for d, k in ((torch.bfloat16, "triton"), (torch.float16, "torch")))]


@pytest.mark.parametrize("method,budget,dtype,backend", HALF_CASES)
def test_half_precision_stays_half(method, budget, dtype, backend, kernels):
    """A half-precision model's compressed blocks keep the hidden states in that dtype: no op
    returns a float32 tensor as wide as the hidden states (``[B, N, C]``, nor their ``[B * N, C]``
    / ``[B, N, 3C]`` / ``[B, N, 4C]`` forms in the projections and the MLP), and the attention
    probabilities ``[B, H, N, N]`` stay half. Sizes ``[B, N, 1]`` and scores ``[B, N]`` may be
    float32, as may the keys' similarity (``[B, N, C / H]``). With the kernels (the GPU path)
    nothing as large as the hidden states is float32 at all; the torch reference of PageRank
    (the CPU's, and the GPU's for graphs above 256 tokens) reads the attention in float32."""
    kernels(backend)
    C = 72  # wider than any token count here, so [B, N, C] is not mistaken for a [B, T, T] score matrix
    model = vitcompress.compress(tiny_vit(embed_dim=C, depth=2).to(DEVICE, dtype), method, **budget)
    x = torch.randn(2, 3, 32, 32, device=DEVICE, dtype=dtype)
    with torch.no_grad(), _Dtypes() as rec:
        out = model(x)
    assert out.dtype == dtype
    assert vitcompress.stats(model)["tokens_per_layer"][-1] < 65
    hidden = [(op, dt, shape) for op, dt, shape in rec.seen if shape and shape[-1] in (C, 3 * C, 4 * C)]
    assert len(hidden) > 10 and all(dt == dtype for _, dt, _ in hidden), [h for h in hidden if h[1] != dtype]
    attention = [(op, dt, s) for op, dt, s in rec.seen if len(s) == 4 and s[-1] == s[-2] > 1 and s[1] == 3]
    assert bool(attention) == (method in READ_ATTENTION)  # only they materialise it
    assert all(dt == dtype for _, dt, _ in attention), attention
    if backend == "triton":
        big = 2 * 65 * C // 4
        wide = [(op, dt, s) for op, dt, s in rec.seen if dt == torch.float32 and torch.Size(s).numel() >= big]
        assert wide == [], wide


def test_autocast_keeps_attention_probabilities_half():
    """Under autocast the materialised attention (Zero-TPrune's pruning layers) stays in the
    autocast dtype: softmax would otherwise give float32 ``[B, H, N, N]`` probabilities."""
    from vitcompress.engine.attention import softmax_attention
    q, k, v = (torch.randn(2, 3, 17, 8, device=DEVICE) for _ in range(3))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, probs = softmax_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=0.3)
    assert probs.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    want = ((q.bfloat16().float() * 0.3) @ k.bfloat16().float().transpose(-1, -2)).softmax(-1)
    torch.testing.assert_close(probs.float(), want, atol=1e-2, rtol=0)


# ---------------------------------------------------------------------------- torch.compile

needs_compiler = pytest.mark.skipif(
    not CUDA and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
    reason="torch.compile's inductor backend needs a C++ compiler on a CPU")


def _compile_and_compare(model, backend_name, batches):
    """Compile with ``fullgraph=True``; returns the vitcompress ops in the graph and the largest
    difference to eager over ``batches`` (all one shape; a recompile would raise)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "vitcompress" in str(n.target))
        if backend_name == "inductor":
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    worst = 0.0
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for x in batches:
            want = model(x)
            tokens = vitcompress.stats(model)["tokens_per_layer"]
            got = compiled(x)
            assert vitcompress.stats(model)["tokens_per_layer"] == tokens
            worst = max(worst, (got - want).abs().max().item())
    return sorted(set(seen)), worst


EXPECTED_OPS = {
    "tome": {"vitcompress.bipartite_match.default", "vitcompress.rank_plan.default", "vitcompress.apply_plan.default"},
    "pitome": {"vitcompress.energy_score.default", "vitcompress.topk_indices.default",
               "vitcompress.bipartite_match.default", "vitcompress.rank_plan.default", "vitcompress.apply_plan.default"},
    "zero_tprune": {"vitcompress.pagerank_scores.default", "vitcompress.topk_indices.default",
                    "vitcompress.bipartite_match.default", "vitcompress.rank_plan.default",
                    "vitcompress.apply_plan.default"},
    "ppt": {"vitcompress.bipartite_match.default", "vitcompress.rank_plan.default",
            "vitcompress.apply_plan.default"},
    "atc": {"vitcompress.apply_plan.default"},
    # their weighted merges run the torch reference: only the scoring's top-k is a kernel
    "evit": {"vitcompress.topk_indices.default"},
    "mctf": {"vitcompress.topk_indices.default"},
}


def _batches(n=2):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 3, 32, 32, generator=g).to(DEVICE) for _ in range(n)]


@pytest.mark.slow  # the default run compiles zero_tprune with inductor below, and opchecks every op
@pytest.mark.parametrize("method,budget", VIT_SETTINGS)
def test_compiled_graph_calls_the_kernels(method, budget, kernels):
    """Traced (AOT autograd, no code generation), the graph holds the kernels' custom ops, runs
    them, equals eager and is reused for a second batch of the same shape."""
    kernels("triton")
    model = vitcompress.compress(tiny_vit(depth=2).to(DEVICE), method, **budget)
    ops, worst = _compile_and_compare(model, "aot_eager", _batches())
    assert set(ops) == EXPECTED_OPS[method]
    assert worst <= 1e-5


@pytest.mark.slow
def test_compiled_graph_with_references_has_no_custom_ops(kernels):
    kernels("torch")
    model = vitcompress.compress(tiny_vit(depth=2).to(DEVICE), "pitome", keep=0.9)
    ops, worst = _compile_and_compare(model, "aot_eager", _batches(1))
    assert ops == [] and worst <= 1e-5


@needs_compiler
@pytest.mark.parametrize("method,budget", [
    ("zero_tprune", dict(keep=0.9)),
    pytest.param("tome", dict(r=4, trace_source=True), marks=pytest.mark.slow),
    pytest.param("pitome", dict(keep=0.9), marks=pytest.mark.slow)])
def test_inductor_compiled_model_with_kernels_matches_eager(method, budget, kernels):
    """``torch.compile(fullgraph=True)`` (inductor) of a compressed ViT with the kernels forced:
    the kernels run as custom ops inside the compiled code, the result equals eager, and a second
    batch of the same shape reuses the graph."""
    kernels("triton")
    model = vitcompress.compress(tiny_vit(depth=2).to(DEVICE), method, **budget)
    ops, worst = _compile_and_compare(model, "inductor", _batches())
    assert EXPECTED_OPS[method] <= set(ops)
    assert worst <= 1e-5


def _op_samples():
    """Small arguments for every custom op, with and without their optional inputs."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 11, 12, generator=g).to(DEVICE)
    idx = torch.stack([torch.randperm(10, generator=g) for _ in range(2)]).to(DEVICE)
    a_idx, b_idx = idx[:, :4], idx[:, 4:]
    score = torch.randn(2, 4, generator=g).to(DEVICE)
    match = torch.randint(0, 6, (2, 4), generator=g).to(DEVICE)
    attn = torch.randn(2, 3, 11, 11, generator=g).softmax(-1).to(DEVICE)
    size = torch.randint(1, 4, (2, 11, 1), generator=g).float().to(DEVICE)
    ops = torch.ops.vitcompress
    return [
        (ops.bipartite_match, (x, x, None, None)), (ops.bipartite_match, (x, x[:, 1:], a_idx, b_idx)),
        (ops.energy_score, (x, 0.5, 1.0)), (ops.topk_indices, (score, 3)),
        (ops.rank_plan, (score, match, 2, a_idx, b_idx, True, False)),
        (ops.rank_plan, (score, None, 1, a_idx, b_idx, False, True)),
        (ops.pagerank_steps, (attn[0], torch.full((3, 11), 1 / 11, device=DEVICE), 3, None)),
        (ops.pagerank_scores, (attn, 5, 1, True, None, 0.01, 0.7, True, "rms")),
        (ops.pagerank_scores, (attn, 2, 1, False, a_idx, 0.0, 1e9, True, "mean")),
        (ops.apply_plan, (x, size, b_idx, a_idx[:, :2], torch.tensor([[0, 3], [5, 5]], device=DEVICE), 1, True)),
        (ops.apply_plan, (x, size, idx, None, None, 1, False)),
        (ops.apply_plan_sum, (x, b_idx, a_idx, torch.zeros_like(a_idx), 1)),
    ]


def test_custom_ops_pass_opcheck():
    """Every ``torch.ops.vitcompress`` op: its schema holds (fresh outputs, nothing mutated), its
    fake implementation gives the real outputs' shapes, strides and dtypes, and it runs the same
    under AOT dispatch with dynamic shapes -- what torch.compile (and CUDA graphs through it) rely on."""
    samples = _op_samples()
    assert {str(op).split(".")[-1] for op, _ in samples} == set(dispatch.ops.NAMES) | {"apply_plan_sum"}
    for op, args in samples:
        torch.library.opcheck(op, args)


class _Merge(torch.nn.Module):
    """One ToMe step and its apply, outside any model."""

    def forward(self, x):
        from vitcompress.methods.tome import tome_matching
        from vitcompress.engine.tokens import TokenState, apply_plan
        plan = tome_matching(x[:, 1:], 5, 1, class_token=True)
        return apply_plan(x, TokenState.start(x, 1), plan, attn_bias=True)


def test_export_keeps_standard_ops(kernels, monkeypatch):
    """torch.export (and ONNX through it) keeps the torch references, so an exported program needs
    no vitcompress ops to run; torch.compile gets the ops."""
    kernels("triton")
    x = torch.randn(2, 30, 24, device=DEVICE)
    with torch.no_grad():
        exported = torch.export.export(_Merge(), (x,), strict=False)
        targets = Counter(str(n.target) for n in exported.graph.nodes if n.op == "call_function")
        assert not any("vitcompress" in t for t in targets), targets
        torch.testing.assert_close(exported.module()(x), _Merge()(x), atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch._pick("apply_plan", x) is dispatch.ops.OPS["apply_plan"]
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert dispatch._pick("apply_plan", x) is dispatch.reference.apply_plan
