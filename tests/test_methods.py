"""ToMe and PiToMe as pure functions, checked against direct loop computations, and the apply path."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from vitcompress.methods.pitome import energy_scores, in_first_half, margin_at, pitome_merge
from vitcompress.methods.tome import bipartite_soft_matching
from vitcompress.engine.tokens import Plan, TokenState, apply_plan


def cosine(u, v):
    return float(torch.dot(u, v) / (u.norm() * v.norm()))


def loop_tome(metric, r):
    """ToMe written out token by token: (kept ids, {merged id: destination id})."""
    T = metric.shape[0]
    a, b = list(range(0, T, 2)), list(range(1, T, 2))
    best = {}
    for i in a:
        sims = [cosine(metric[i], metric[j]) for j in b]
        k = max(range(len(b)), key=lambda n: sims[n])
        best[i] = (sims[k], b[k])
    ranked = sorted(a, key=lambda i: -best[i][0])
    merged = {i: best[i][1] for i in ranked[:r]}
    kept = [i for i in a if i not in merged] + b
    return kept, merged


def plan_as_sets(plan, batch):
    keep = plan.keep[batch].tolist()
    merged = {int(s): keep[int(d)] for s, d in zip(plan.merge_src[batch], plan.merge_dst[batch])}
    return keep, merged


@pytest.mark.parametrize("T,r", [(2, 1), (9, 3), (50, 25), (64, 10)])
def test_tome_matches_a_loop(T, r):
    torch.manual_seed(T)
    metric = torch.randn(3, T, 16)
    plan = bipartite_soft_matching(metric, r)
    for b in range(3):
        keep, merged = plan_as_sets(plan, b)
        want_keep, want_merged = loop_tome(metric[b], r)
        assert sorted(keep) == sorted(want_keep)
        assert merged == want_merged


def test_pitome_energy_matches_a_loop():
    torch.manual_seed(1)
    metric = torch.randn(2, 12, 8)
    margin, alpha = 0.3, 1.0
    got = energy_scores(metric, margin, alpha)
    for b in range(2):
        for i in range(12):
            vals = []
            for j in range(12):
                s = cosine(metric[b, i], metric[b, j]) - margin
                vals.append(s if s > 0 else alpha * (torch.exp(torch.tensor(s)).item() - 1.0))
            assert got[b, i].item() == pytest.approx(sum(vals) / 12, abs=1e-5)


def test_pitome_margin_schedule():
    assert margin_at(0, 12, 0.75) == 0.75
    assert margin_at(6, 12, 0.75) == pytest.approx(0.375)
    assert margin_at(11, 12, 0.9) == pytest.approx(0.075)


def test_pitome_first_half_is_ceil_of_half_the_depth():
    """The reference code matches like ToMe in ceil(L / 2) blocks: the middle one of an odd depth too."""
    assert [in_first_half(layer, 5) for layer in range(5)] == [True, True, True, False, False]
    assert [in_first_half(layer, 4) for layer in range(4)] == [True, True, False, False]
    assert sum(in_first_half(layer, 27) for layer in range(27)) == 14


def test_pitome_protects_low_energy_and_merges_a_into_b():
    torch.manual_seed(2)
    metric = torch.randn(2, 20, 8)
    r = 4
    plan = pitome_merge(metric, r, margin=0.2)
    energy = energy_scores(metric, 0.2)
    for b in range(2):
        order = torch.argsort(energy[b], descending=True).tolist()
        mergeable, protected = order[: 2 * r], order[2 * r:]
        a, bset = mergeable[0::2], mergeable[1::2]
        keep, merged = plan_as_sets(plan, b)
        assert sorted(keep) == sorted(protected + bset)
        assert set(merged) == set(a)
        for src, dst in merged.items():
            sims = {j: cosine(metric[b, src], metric[b, j]) for j in bset}
            assert dst == max(sims, key=sims.get)


def test_pitome_bipartite_order_is_tome_on_energy_order():
    torch.manual_seed(3)
    metric = torch.randn(1, 16, 8)
    plan = pitome_merge(metric, 5, margin=0.5, bipartite_order=True)
    order = torch.argsort(energy_scores(metric, 0.5)[0], descending=True)
    want_keep, want_merged = loop_tome(metric[0, order], 5)
    keep, merged = plan_as_sets(plan, 0)
    assert sorted(keep) == sorted(order[want_keep].tolist())
    assert merged == {int(order[s]): int(order[d]) for s, d in want_merged.items()}


def random_plan_state(B, T, C, r, prefix, seed, method):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, prefix + T, C, generator=g, dtype=torch.float64)
    state = TokenState.start(x, prefix)
    state.size = torch.randint(1, 5, (B, prefix + T, 1), generator=g).float()
    state.size[:, :prefix] = 1
    metric = torch.randn(B, T, 8, generator=g)
    plan = bipartite_soft_matching(metric, r) if method == "tome" else pitome_merge(metric, r, margin=0.1)
    return x, state, plan


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(2, 40), C=st.integers(1, 9), prefix=st.integers(0, 3),
       frac=st.floats(0, 1), seed=st.integers(0, 10_000), method=st.sampled_from(["tome", "pitome"]))
def test_merging_preserves_size_weighted_mass(B, T, C, prefix, frac, seed, method):
    r = int(frac * (T // 2))
    x, state, plan = random_plan_state(B, T, C, r, prefix, seed, method)
    mass_before = (x * state.size.double()).sum(dim=1)
    total_before = state.size.sum(dim=(1, 2))
    out = apply_plan(x, state, plan)
    assert out.shape == (B, prefix + T - r, C) and state.size.shape == (B, prefix + T - r, 1)
    torch.testing.assert_close((out * state.size.double()).sum(dim=1), mass_before)
    torch.testing.assert_close(state.size.sum(dim=(1, 2)), total_before)
    assert torch.equal(out[:, :prefix], x[:, :prefix])


def test_pruning_plan_gathers_exactly():
    x = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    state = TokenState.start(x, num_prefix=1, trace_source=True)
    out = apply_plan(x, state, Plan(keep=torch.tensor([[4, 0], [1, 2]])))
    assert torch.equal(out[0], x[0, [0, 5, 1]]) and torch.equal(out[1], x[1, [0, 2, 3]])
    assert torch.equal(state.source[0].argmax(-1), torch.tensor([0, 5, 1]))
    assert not state.merged and torch.equal(state.size, torch.ones(2, 3, 1))


def test_proportional_attention_bias_is_log_size():
    x = torch.randn(1, 4, 2)
    state = TokenState.start(x, 1)
    assert state.attn_bias(torch.float32) is None
    apply_plan(x, state, Plan(keep=torch.tensor([[0, 1]]), merge_src=torch.tensor([[2]]), merge_dst=torch.tensor([[1]])))
    bias = state.attn_bias(torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.flatten(), torch.log(torch.tensor([1.0, 1.0, 2.0])))
