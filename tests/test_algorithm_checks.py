"""Checks that fail when an algorithm computes the wrong thing (issue 32: each closes a mutant that
survived the rest of the suite), every one against an independent computation written out here.

* PiToMe's ``alpha`` reaches the energy (plan vs a loop computation, alpha=0.5 differs from 1.0).
* ToMe's ``(r, inflection)`` ramp is ToMe's ``parse_r`` (``int``, not ``round``).
* A restored transformers ViT has exactly its original hooks and takes a mask again.
* Focus-DETR's ``scorer="attention"`` is the attention received, averaged over heads.
* ONNX export refuses a graph with a mean-reduction scatter.
* Zero-TPrune's variants each give the plan of a direct implementation.
* Proportional attention adds ``+log(size)`` on the keys: weight ~ size * exp(q.k).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vitcompress
from vitcompress.engine import blocks
from vitcompress.engine.schedule import r_per_layer
from vitcompress.engine.tokens import TokenState, apply_plan
from vitcompress.interfaces import Plan, Signals
from vitcompress.methods import get as get_method
from vitcompress.methods.focus_detr import attention_received
from vitcompress.methods.tome import bipartite_soft_matching, tome_matching
from vitcompress.methods.zero_tprune import zero_tprune
from vitcompress.testing import tiny_vit


# --------------------------------------------------------------------------- PiToMe alpha


def loop_energy(metric, margin, alpha):
    """``E_i = mean_j ELU(cos(k_i, k_j) - margin, alpha)``, one pair at a time, float64."""
    B, T, _ = metric.shape
    m = metric.double()
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            total = 0.0
            for j in range(T):
                x = float(F.cosine_similarity(m[b, i], m[b, j], dim=0)) - margin
                total += x if x > 0 else alpha * (math.exp(x) - 1.0)
            out[b, i] = total / T
    return out


def loop_pitome_plan(metric, r, margin, alpha):
    """PiToMe's second-half step from its definition: the 2r highest-energy tokens alternate into
    A and B, each A token merges into its most similar B token, the rest are protected."""
    B, T, _ = metric.shape
    energy = loop_energy(metric, margin, alpha)
    keep, src, dst = [], [], []
    for b in range(B):
        order = sorted(range(T), key=lambda i: -float(energy[b, i]))
        mergeable, protected = order[:2 * r], order[2 * r:]
        a, bb = mergeable[0::2], mergeable[1::2]
        unit = F.normalize(metric[b].double(), dim=-1)
        match = [max(range(len(bb)), key=lambda j: float(unit[i] @ unit[bb[j]])) for i in a]
        keep.append(protected + bb)
        src.append(a)
        dst.append([len(protected) + j for j in match])
    return Plan(torch.tensor(keep), torch.tensor(src), torch.tensor(dst)), energy


def clustered_metric(seed, B=2, T=24, d=8):
    """Tokens around a few centres: some pairs above the margin, some below, so the ELU's negative
    branch (scaled by alpha) and its positive one both count."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, 4, d, generator=g)
    which = torch.randint(0, 4, (B, T), generator=g)
    spread = torch.rand(B, T, 1, generator=g) * 1.5
    return centres.gather(1, which[..., None].expand(B, T, d)) + spread * torch.randn(B, T, d, generator=g)


PITOME = get_method("pitome")


def pitome_plan(metric, layer, num_layers, r, alpha, first_half=True):
    signals = Signals(metric=metric, x=metric, attn=None, num_prefix=1, layer=layer, num_layers=num_layers)
    options = dict(PITOME.defaults, alpha=alpha, bipartite_first_half=first_half)
    return PITOME.plan(signals, r, options)


def test_pitome_alpha_reaches_the_energy_second_half():
    """With alpha=0.5 the method's plan (second half: 2r mergeable tokens) is the one a loop
    computation of the energy with alpha=0.5 gives, and differs from the alpha=1.0 plan."""
    metric, r, layer, L = clustered_metric(3), 6, 3, 4
    margin = 0.75 * (1 - layer / L)
    expected, energy = loop_pitome_plan(metric, r, margin, 0.5)
    got = pitome_plan(metric, layer, L, r, alpha=0.5)
    assert torch.equal(got.keep, expected.keep)
    assert torch.equal(got.merge_src, expected.merge_src)
    assert torch.equal(got.merge_dst, expected.merge_dst)
    other, _ = loop_pitome_plan(metric, r, margin, 1.0)
    assert not torch.equal(other.keep, expected.keep)  # the input separates the two alphas
    assert not torch.equal(pitome_plan(metric, layer, L, r, alpha=1.0).keep, got.keep)


def test_pitome_alpha_reaches_the_energy_first_half():
    """First half: ToMe's matching over the energy order, the order from alpha=0.5."""
    metric, r, layer, L = clustered_metric(5), 5, 0, 4
    energy = loop_energy(metric, 0.75, 0.5)
    order = torch.stack([torch.tensor(sorted(range(metric.shape[1]), key=lambda i: -float(e[i]))) for e in energy])
    expected = bipartite_soft_matching(metric, r, order=order)
    got = pitome_plan(metric, layer, L, r, alpha=0.5)
    assert torch.equal(got.keep, expected.keep) and torch.equal(got.merge_src, expected.merge_src)
    order1 = torch.argsort(loop_energy(metric, 0.75, 1.0), dim=1, descending=True)
    assert not torch.equal(order1, order)
    assert not torch.equal(pitome_plan(metric, layer, L, r, alpha=1.0).keep, got.keep)


# --------------------------------------------------------------------------- ToMe's r schedule


def tome_parse_r(num_layers, r, inflect):
    """ToMe's definition (tome/utils.py ``parse_r``), written out."""
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


RAMPS = [(4, -0.5, 6), (8, -1.0, 12), (5, 0.3, 12), (3, 0.5, 7), (16, -0.25, 12), (7, 0.9, 24), (2, -0.7, 5),
         (13, 0.1, 12), (3, 0.0, 4), (10, 1.0, 12), (9, -0.35, 10)]


@pytest.mark.parametrize("r,inflect,depth", RAMPS)
def test_inflection_ramp_is_tomes_parse_r(r, inflect, depth):
    assert list(r_per_layer((r, inflect), depth)) == tome_parse_r(depth, r, inflect)


def test_ramps_include_cases_where_round_differs():
    def rounded(depth, r, inflect):
        lo = round(r * (1.0 - inflect))
        step = (2 * r - 2 * lo) / (depth - 1)
        return [round(lo + step * i) for i in range(depth)]
    assert sum(rounded(d, r, i) != tome_parse_r(d, r, i) for r, i, d in RAMPS) >= 5


# --------------------------------------------------------------------------- transformers: restore


def _hooks(model):
    return {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks), dict(m._forward_pre_hooks_with_kwargs))
            for name, m in model.named_modules()}


def test_restored_transformers_vit_has_its_hooks_and_takes_a_mask():
    hf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = hf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                          intermediate_size=64, num_labels=3, attn_implementation="sdpa")
    model = hf.ViTForImageClassification(config).eval()
    model.vit.register_forward_hook(lambda m, a, o: None)  # a hook of the user's, kept across compress/restore
    plain = copy.deepcopy(model)
    before = _hooks(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 17)
    mask[:, -3:] = 0
    vitcompress.compress(model, "tome", r=2)
    assert _hooks(model) != before  # compress adds the mask-refusing hook
    with pytest.raises(ValueError, match="attention or head mask"):
        model(x, attention_mask=mask)
    vitcompress.restore(model)
    assert _hooks(model) == before
    with torch.no_grad():
        assert torch.equal(model(x, attention_mask=mask).logits, plain(x, attention_mask=mask).logits)
        assert torch.equal(model(x).logits, plain(x).logits)


# --------------------------------------------------------------------------- Focus-DETR attention scorer


def explicit_received(q, k, valid=None):
    """Per image and head: softmax over the real keys of each real query, summed over the queries;
    then the mean over heads (float64)."""
    B, H, N, d = q.shape
    out = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        real = list(range(N)) if valid is None else [i for i in range(N) if valid[b, i]]
        per_head = torch.zeros(H, N, dtype=torch.float64)
        for h in range(H):
            for i in real:
                logits = torch.tensor([float(q[b, h, i] @ k[b, h, j]) / math.sqrt(d) for j in real], dtype=torch.float64)
                p = torch.softmax(logits, dim=0)
                for jj, j in enumerate(real):
                    per_head[h, j] += p[jj]
        out[b] = per_head.mean(0)
    return out


def _qk(seed, B=2, H=4, N=12, d=8):
    g = torch.Generator().manual_seed(seed)
    temp = torch.tensor([0.3, 1.0, 2.5, 4.0]).view(1, H, 1, 1)
    return torch.randn(B, H, N, d, generator=g) * temp, torch.randn(B, H, N, d, generator=g)


@pytest.mark.parametrize("masked", [False, True])
def test_focus_detr_attention_scorer_is_attention_received_mean_over_heads(masked):
    q, k = _qk(7)
    valid = None
    if masked:
        valid = torch.ones(2, 12, dtype=torch.bool)
        valid[0, -3:] = False
        valid[1, -1:] = False
    expected = explicit_received(q, k, valid)
    got = attention_received(q, k, valid)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # the input separates mean from max over heads: their rankings differ
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1).sum(2)
    assert not torch.equal(probs.mean(1).argsort(-1), probs.amax(1).argsort(-1))


def test_focus_detr_method_ranks_by_attention_received():
    method = get_method("focus_detr")
    q, k = _qk(9)
    x, pos = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    valid = torch.ones(2, 12, dtype=torch.bool)
    options = dict(method.defaults, scorer="attention")
    rank, foreground = method.token_scores(options, None, x, pos, valid, lambda: (q, k))
    expected = explicit_received(q, k)
    assert torch.equal(rank.argsort(-1, descending=True), expected.argsort(-1, descending=True))
    torch.testing.assert_close(foreground.double(), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- export: mean scatters


def _scatter_model(reduction):
    from onnx import TensorProto, helper
    node = helper.make_node("ScatterElements", ["images", "idx", "upd"], ["logits"], axis=1, reduction=reduction)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4]),
                                            helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 2]),
                                            helper.make_tensor_value_info("upd", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("reduction", ["mean", "add"])
def test_export_refuses_a_graph_with_a_mean_scatter(monkeypatch, tmp_path, reduction):
    """The check after conversion: the exporter is made to write a graph holding a
    ``ScatterElements(reduction=...)``; a mean one is refused, an add one passes."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    import importlib
    onnx_export = importlib.import_module("vitcompress.export.onnx_export")
    proto = _scatter_model(reduction)

    class Written:
        def save(self, path):
            onnx.save(proto, path)

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Written())
    path = str(tmp_path / "m.onnx")
    if reduction == "mean":
        with pytest.raises(RuntimeError, match="mean reduction"):
            onnx_export._write(None, path, 18, False)
    else:
        _, reductions = onnx_export._write(None, path, 18, False)
        assert reductions == {("ScatterElements", "add"): 1}


# --------------------------------------------------------------------------- Zero-TPrune variants


def _pagerank(attn, alive, iters, cls_sqrt, num_prefix):
    """WPR on one image's graph restricted to ``alive`` (indices over all N tokens), rows renormalised;
    returns per-head scores over alive [H, n] (float64)."""
    A = attn.double()[:, alive][:, :, alive]
    A = A / A.sum(-1, keepdim=True)
    n = len(alive)
    s = torch.ones(n, dtype=torch.float64)
    if cls_sqrt and num_prefix > 0:
        s[0] = math.sqrt(n)
    s = (s / s.sum()).expand(A.shape[0], n).clone()
    for _ in range(iters):
        s = torch.einsum("hij,hi->hj", A, s)
    return s


def _importance(attn, alive, iters, o, num_prefix):
    s = _pagerank(attn, alive, iters, o["cls_init"] == "sqrt", num_prefix)
    n = s.shape[1]
    if o["head_filter"]:
        var = ((n * s) - (n * s).mean(-1, keepdim=True)).pow(2).mean(-1)
        m = ((var >= o["var_min"]) & (var <= o["var_max"])).double()
        if m.sum() == 0:
            m = torch.ones_like(m)
    else:
        m = torch.ones(s.shape[0], dtype=torch.float64)
    if o["aggregate"] == "rms":
        agg = ((m[:, None] * s ** 2).sum(0) / m.sum()).sqrt()
    else:
        agg = (m[:, None] * s).sum(0) / m.sum()
    return agg[num_prefix:]  # the reducible tokens among alive, alive's order


def _ranked(items, scores):
    return [items[i] for i in sorted(range(len(items)), key=lambda i: (-float(scores[i]), i))]


def _s_stage(metric, tokens, scores, r):
    """Less important half = A; drop the r A tokens with the highest best-match cosine to B."""
    order = _ranked(tokens, scores)
    n_a = len(tokens) // 2
    b, a = order[:len(tokens) - n_a], order[len(tokens) - n_a:]
    unit = F.normalize(metric.double(), dim=-1)
    best = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
    dropped = set(_ranked(a, best)[:r])
    return [t for t in order if t not in dropped]


def direct_zero_tprune(attn, metric, p, r_s, r_i, iters, o):
    """Zero-TPrune for one image from its description: I' -> S -> I (or I -> S)."""
    T = metric.shape[0]
    alive = list(range(T))

    def importance(n_iters, tokens):
        return _importance(attn, list(range(p)) + [p + t for t in tokens], n_iters, o, p)

    if o["order"] == "ISI":
        if r_s > 0:
            alive = _s_stage(metric, alive, importance(o["prerank_iters"], alive), r_s)
            alive = sorted(alive)
        if r_i > 0:
            alive = _ranked(alive, importance(iters, alive))[:len(alive) - r_i]
    else:
        scores = importance(iters, alive)
        if r_i > 0:
            keep = _ranked(list(range(T)), scores)[:T - r_i]
            scores = [scores[t] for t in keep]
            alive = keep
        if r_s > 0:
            alive = _s_stage(metric, alive, scores, r_s)
    return sorted(alive)


def _attn(seed, B=2, H=4, N=25):
    g = torch.Generator().manual_seed(seed)
    temp = torch.tensor([0.2, 1.0, 3.0, 8.0]).view(1, H, 1, 1)
    return torch.softmax(torch.randn(B, H, N, N, generator=g) * temp, dim=-1)


ZT_VARIANTS = [dict(), dict(order="IS"), dict(s_ratio=0.0), dict(s_ratio=0.5), dict(s_ratio=1.0, prerank_iters=3),
               dict(aggregate="mean"), dict(cls_init="uniform", head_filter=False), dict(iters=3),
               dict(var_min=0.0, var_max=0.05), dict(order="IS", s_ratio=0.5, aggregate="mean")]


@pytest.mark.parametrize("variant", ZT_VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
def test_zero_tprune_variant_plan_is_the_direct_computation(variant):
    method = get_method("zero_tprune")
    options = dict(method.defaults, **variant)
    attn, metric = _attn(4), torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(5))
    layer, L, remove = 1, 4, 8
    signals = Signals(metric=metric, x=metric, attn=attn, num_prefix=1, layer=layer, num_layers=L)
    plan = method.plan(signals, remove, options)
    iters = options["iters"] if isinstance(options["iters"], int) else options["iters"][1]  # block 1 of 4: middle
    r_s = math.floor(options["s_ratio"] * remove + 1e-9)
    for b in range(2):
        expected = direct_zero_tprune(attn[b], metric[b], 1, r_s, remove - r_s, iters, options)
        assert plan.keep[b].tolist() == expected
    assert plan.merge_src is None


def test_zero_tprune_inputs_exercise_the_head_filter():
    """The graph above has heads inside and outside [0.01, 0.7], so the filter changes the scores."""
    s = _pagerank(_attn(4)[0], list(range(25)), 5, True, 1)
    var = ((25 * s) - 1).pow(2).mean(-1)
    inside = (var >= 0.01) & (var <= 0.7)
    assert 0 < int(inside.sum()) < 4


# --------------------------------------------------------------------------- proportional attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need_probs", [True, False])
def test_proportional_attention_weights_keys_by_size(dtype, need_probs):
    """After a merge, a token of size s gets attention weight s * exp(q.k * scale) / sum: the bias
    the block adds is +log(size) on the keys (float64 queries take the size path without the
    precomputed float32 log)."""
    g = torch.Generator().manual_seed(0)
    B, N, C, H = 2, 9, 12, 3
    x = torch.randn(B, N, C, generator=g)
    state = TokenState.start(x, num_prefix=1)
    plan = Plan(keep=torch.tensor([[0, 2, 4, 5], [1, 2, 3, 7]]), merge_src=torch.tensor([[1, 3, 6, 7], [0, 4, 5, 6]]),
                merge_dst=torch.tensor([[0, 0, 3, 1], [2, 2, 2, 3]]))
    x = apply_plan(x, state, plan, attn_bias=True)
    size = torch.ones(B, 5, dtype=torch.float64)  # class token + 4 kept; each merge adds one
    for b in range(B):
        for d in plan.merge_dst[b].tolist():
            size[b, 1 + d] += 1
    q = torch.randn(B, H, 5, 4, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, 5, 4, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, 5, 4, generator=g, dtype=torch.float64)
    scale = 0.5
    weights = size[:, None, None, :] * torch.exp(q @ k.transpose(-1, -2) * scale)
    weights = weights / weights.sum(-1, keepdim=True)
    out, probs = blocks.attention(q.to(dtype), k.to(dtype), v.to(dtype), state.attn_bias(dtype), scale, 0.0, need_probs)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), weights @ v, **tol)
    if need_probs:
        torch.testing.assert_close(probs.double(), weights, **tol)


def test_proportional_attention_bias_in_a_compressed_vit_is_log_size(monkeypatch):
    """In a ToMe-compressed ViT every block after the first merge gets a bias whose exp is each
    token's size: positive integers summing to the 65 tokens the image started with."""
    seen = []
    original = blocks.attention

    def spy(q, k, v, bias, *args):
        seen.append(bias)
        return original(q, k, v, bias, *args)

    monkeypatch.setattr(blocks, "attention", spy)
    model = vitcompress.compress(tiny_vit(), "tome", r=8, prop_attn=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert seen[0] is None and len(seen) == 4
    for layer, bias in enumerate(seen[1:], start=1):
        size = bias.exp().squeeze(1).squeeze(1)  # [B, N]
        assert size.shape == (2, 65 - 8 * layer)
        torch.testing.assert_close(size, size.round(), rtol=0, atol=1e-4)
        assert bool((size.round() >= 1).all()) and float(size.max()) > 1.5
        torch.testing.assert_close(size.sum(-1), torch.full((2,), 65.0), rtol=0, atol=1e-3)


# --------------------------------------------------------------------------- ToMe with other prefixes


def loop_tome(metric, r, num_prefix, class_token):
    """ToMe's matching from its definition: the whole sequence (prefix included) alternates A / B by
    position; the reducible token i sits at position num_prefix + i; special tokens take part in no
    matching. The r A tokens with the best cosine match merge; the rest of A stays (in index order
    with a class token, else by score), then all of B."""
    B, T, _ = metric.shape
    unit = F.normalize(metric.double(), dim=-1)
    keep, src, dst = [], [], []
    for b in range(B):
        a = [i for i in range(T) if (num_prefix + i) % 2 == 0]
        bb = [i for i in range(T) if (num_prefix + i) % 2 == 1]
        best = {i: max(range(len(bb)), key=lambda j: (float(unit[b, i] @ unit[b, bb[j]]), -j)) for i in a}
        score = {i: float(unit[b, i] @ unit[b, bb[best[i]]]) for i in a}
        ranked = sorted(a, key=lambda i: (-score[i], a.index(i)))
        merged, kept = ranked[:r], ranked[r:]
        if class_token:
            kept = sorted(kept)
        keep.append(kept + bb)
        src.append(merged)
        dst.append([len(kept) + best[i] for i in merged])
    return torch.tensor(keep), torch.tensor(src), torch.tensor(dst)


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("class_token", [True, False])
def test_tome_matching_alternates_over_the_whole_sequence(num_prefix, class_token):
    """Prefixes of every parity (DeiT's class + distillation tokens, registers) put the first
    reducible token in A or B as the official alternation over the whole sequence does."""
    metric = torch.randn(2, 15, 8, generator=torch.Generator().manual_seed(num_prefix))
    plan = tome_matching(metric, 4, num_prefix, class_token)
    keep, src, dst = loop_tome(metric, 4, num_prefix, class_token)
    assert torch.equal(plan.keep, keep)
    assert torch.equal(plan.merge_src, src)
    assert torch.equal(plan.merge_dst, dst)


# --------------------------------------------------------------------------- defaults of the merging methods


@pytest.mark.parametrize("method,budget", [("tome", dict(r=6)), ("pitome", dict(keep=0.8))])
def test_merging_methods_default_to_proportional_attention(method, budget):
    """A merging method (kind "merge") runs with proportional attention unless told otherwise: the
    default output is the prop_attn=True output, not the prop_attn=False one."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    outs = {}
    for prop in (None, True, False):
        extra = {} if prop is None else dict(prop_attn=prop)
        model = vitcompress.compress(tiny_vit(), method, **budget, **extra)
        with torch.no_grad():
            outs[prop] = model(x)
    assert torch.equal(outs[None], outs[True])
    assert not torch.allclose(outs[None], outs[False])


def test_tome_refuses_an_r_too_large_unless_clamped():
    """ToMe's default is to refuse an r a block cannot remove (64 patches: 4 blocks of 20 are too
    many); clamp=True removes what each block can, as the official code silently does."""
    with pytest.raises(ValueError, match="can remove at most"):
        vitcompress.compress(tiny_vit(), "tome", r=20)
    model = vitcompress.compress(tiny_vit(), "tome", r=20, clamp=True)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    tokens = vitcompress.stats(model)["tokens_per_layer"]
    assert tokens[0] == 65 and tokens[1] == 65 - 20
    assert all(b >= (a - 1) // 2 + 1 for a, b in zip(tokens, tokens[1:]))  # never more than half of A


@pytest.mark.parametrize("num_prefix,cls_first", [(0, True), (0, False), (1, True), (2, False), (3, True)])
def test_tome_plan_keeps_unmerged_in_index_order_only_behind_a_class_token(num_prefix, cls_first):
    """The method's plan: with a class token first the unmerged A tokens keep their index order (the
    official class_token=True); without one (no prefix, or registers only) they stay in score order."""
    metric = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(10 + num_prefix))
    signals = Signals(metric=metric, x=metric, attn=None, num_prefix=num_prefix, layer=0, num_layers=4,
                      cls_first=cls_first)
    plan = get_method("tome").plan(signals, 5, dict(clamp=False))
    keep, src, dst = loop_tome(metric, 5, num_prefix, class_token=cls_first and num_prefix > 0)
    assert torch.equal(plan.keep, keep) and torch.equal(plan.merge_src, src) and torch.equal(plan.merge_dst, dst)
    other, _, _ = loop_tome(metric, 5, num_prefix, class_token=not (cls_first and num_prefix > 0))
    assert not torch.equal(other, keep)  # the input tells the two orders apart


# --------------------------------------------------------------------------- references on meta tensors


def test_reference_scores_run_on_meta_tensors():
    """Shape-only forwards (meta tensors: no autocast there) get the scores' shapes, no error."""
    from vitcompress.kernels import reference
    a = torch.empty(2, 6, 8, device="meta")
    score, index = reference.bipartite_match(a, a[:, :3])
    assert score.shape == index.shape == (2, 6) and score.device.type == "meta"
    assert reference.energy_score(a, 0.5).shape == (2, 6)


def test_reference_energy_default_alpha_is_one():
    """The reference energy's default alpha is PiToMe's 1.0 (a plain ELU)."""
    from vitcompress.kernels import reference
    metric = clustered_metric(8, T=10)
    torch.testing.assert_close(reference.energy_score(metric, 0.3).double(), loop_energy(metric, 0.3, 1.0),
                               rtol=1e-5, atol=1e-6)


def test_reference_topk_of_none_is_empty():
    """k=0 is a valid request (no token taken): an empty index per row; k < 0 is refused."""
    from vitcompress.kernels import reference
    scores = torch.randn(3, 7)
    assert reference.topk_indices(scores, 0).shape == (3, 0)
    assert torch.equal(reference.topk_indices(scores, 7), torch.argsort(scores, dim=-1, descending=True))
    with pytest.raises(ValueError, match="k=-1"):
        reference.topk_indices(scores, -1)


def test_reference_topk_ties_go_to_the_lower_index():
    from vitcompress.kernels import reference
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (4, 300), generator=g).float()  # long rows of ties
    expected = torch.stack([torch.tensor(sorted(range(300), key=lambda i: (-float(row[i]), i))) for row in scores])
    assert torch.equal(reference.topk_indices(scores, 300), expected)


def test_reference_rank_plan_defaults():
    """By default the kept A tokens stay in score order and come before B (ToMe without a class
    token); the r best-scored A tokens are taken out, best first."""
    from vitcompress.kernels import reference
    score = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2]])
    match = torch.tensor([[2, 0, 1, 1, 0]])
    a_idx, b_idx = torch.tensor([[0, 2, 4, 6, 8]]), torch.tensor([[1, 3, 5]])
    keep, src, dst = reference.rank_plan(score, match, 2, a_idx, b_idx)
    assert keep.tolist() == [[4, 8, 0, 1, 3, 5]]  # kept A by score (0.5, 0.2, 0.1), then B
    assert src.tolist() == [[2, 6]] and dst.tolist() == [[3 + 0, 3 + 1]]


@pytest.mark.parametrize("margin,ok", [(0.0, True), (1.0, True), (-0.01, False), (1.01, False)])
def test_pitome_margin_range_is_closed(margin, ok):
    """margin in [0, 1], both ends included (m0 = 0 is the loosest margin)."""
    if ok:
        vitcompress.compress(tiny_vit(depth=2), "pitome", keep=0.9, margin=margin)
    else:
        with pytest.raises(ValueError, match="margin"):
            vitcompress.compress(tiny_vit(depth=2), "pitome", keep=0.9, margin=margin)


# --------------------------------------------------------------------------- budgets


def test_parse_budget_rules():
    """One budget at most; none gives the method's default; keep / flops lie in (0, 1] and are numbers."""
    from vitcompress.engine.schedule import Budget, parse_budget
    for name in ("tome", "pitome", "zero_tprune"):
        m = get_method(name)
        assert parse_budget(m) == Budget(*next(iter(m.default_budget.items())))
    m = get_method("pitome")
    with pytest.raises(ValueError, match="at most one"):
        parse_budget(m, keep=0.9, r=2)
    assert parse_budget(m, keep=1.0) == Budget("keep", 1.0)
    assert parse_budget(m, flops=1) == Budget("flops", 1.0)
    for bad in (0.0, 1.0000001, 2.0, -0.5):
        with pytest.raises(ValueError, match="outside"):
            parse_budget(m, keep=bad)
    for bad in (True, "0.9", [0.9]):
        with pytest.raises(TypeError):
            parse_budget(m, flops=bad)


@pytest.mark.parametrize("order", ["ISI", "IS"])
@pytest.mark.parametrize("r_s,r_i", [(1, 0), (0, 1), (1, 1), (2, 1), (1, 2)])
def test_zero_tprune_single_removals_are_the_direct_computation(order, r_s, r_i):
    """One token per stage (the variants above remove 8): a stage that removes one token runs."""
    options = dict(get_method("zero_tprune").defaults, order=order)
    attn, metric = _attn(4), torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(5))
    plan = zero_tprune(attn, metric, 1, r_s, r_i, 5, prerank_iters=1, order=order, var_min=0.01, var_max=0.7,
                       head_filter=True, aggregate="rms", cls_init="sqrt")
    for b in range(2):
        assert plan.keep[b].tolist() == direct_zero_tprune(attn[b], metric[b], 1, r_s, r_i, 5, options)
    assert plan.keep.shape == (2, 24 - r_s - r_i)


@pytest.mark.parametrize("alpha,ok", [(1e-3, True), (1.0, True), (0.0, False), (-0.5, False)])
def test_pitome_alpha_must_be_positive(alpha, ok):
    """alpha scales the energy's exponential: positive (0 would flatten every energy to the same value)."""
    method = get_method("pitome")
    options = dict(method.defaults, alpha=alpha)
    if ok:
        method.validate(options)
    else:
        with pytest.raises(ValueError, match="alpha"):
            method.validate(options)


def test_tome_planned_flops_are_counted_with_odd_token_counts():
    """ToMe's matching costs ceil(t / 2) x floor(t / 2) dot products: r=3 leaves odd counts."""
    from vitcompress.profile.flops import count_flops
    model, x = tiny_vit(), torch.randn(1, 3, 32, 32)
    vitcompress.compress(model, "tome", r=3)
    try:
        counted = count_flops(model, x)
        runtime = model._vitcompress
        planned = runtime.adapter.cost().flops(runtime.schedule, runtime.method, runtime.options)
        tokens = runtime.schedule.tokens
    finally:
        vitcompress.restore(model)
    assert counted == planned and any(t % 2 for t in tokens), tokens
