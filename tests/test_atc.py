"""ATC: the batched clustering against a direct agglomerative clustering written here (cluster
distances from their definitions, no Lance-Williams), the plan, and the method in a model (counts per
layer, special tokens, restore, batch 1, bf16, the FLOPs budget; compile in test_compile.py). The official code's
(scikit-learn's) clusters are checked in tests/test_official_ppt_atc.py."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import vitcompress
from conftest import count_at_budget
from vitcompress.engine.tokens import TokenState, apply_plan
from vitcompress.methods.atc import agglomerative_clustering, clustering_plan, cosine_distances, token_clustering
from vitcompress.testing import tiny_vit

LINKS = {"average": lambda ds: sum(ds) / len(ds), "complete": max, "single": min}


def direct_clustering(d, clusters, linkage):
    """Greedy agglomerative clustering of ``d[T, T]`` into ``clusters`` groups, each step joining the
    pair of groups whose linkage (over all member pairs) is smallest."""
    groups = [[i] for i in range(len(d))]
    while len(groups) > clusters:
        a, b = min(itertools.combinations(range(len(groups)), 2),
                   key=lambda ab: LINKS[linkage]([float(d[i, j]) for i in groups[ab[0]] for j in groups[ab[1]]]))
        groups[a] += groups.pop(b)
    return {frozenset(g) for g in groups}


def partition(label):
    groups = {}
    for i, lab in enumerate(label.tolist()):
        groups.setdefault(lab, set()).add(i)
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
@pytest.mark.parametrize("T,r", [(9, 4), (16, 11), (12, 1)])
def test_clustering_equals_a_direct_computation(linkage, T, r):
    metric = torch.randn(3, T, 6, generator=torch.Generator().manual_seed(T + r))
    d = cosine_distances(metric)
    label, alive = agglomerative_clustering(d, r, linkage)
    assert alive.sum(1).tolist() == [T - r] * 3
    for b in range(3):
        assert partition(label[b]) == direct_clustering(d[b], T - r, linkage)
        # each cluster is named by its lowest member, which is the one alive
        for group in partition(label[b]):
            assert {int(label[b, i]) for i in group} == {min(group)} and bool(alive[b, min(group)])


def test_the_linkages_differ():
    metric = torch.randn(2, 24, 6, generator=torch.Generator().manual_seed(0))
    d = cosine_distances(metric)
    found = [partition(agglomerative_clustering(d, 16, link)[0][0]) for link in LINKS]
    assert len({frozenset(p) for p in found}) == 3


def test_plan_keeps_representatives_in_order_and_merges_clusters_size_weighted():
    g = torch.Generator().manual_seed(1)
    metric = torch.randn(2, 10, 4, generator=g)
    x = torch.randn(2, 11, 3, generator=g)
    plan = token_clustering(metric, 6, "average")
    label, alive = agglomerative_clustering(cosine_distances(metric), 6, "average")
    state = TokenState.start(x, num_prefix=1)
    state.size = torch.randint(1, 4, (2, 11, 1), generator=g).float()
    size = state.size.clone()
    out = apply_plan(x, state, plan)
    for b in range(2):
        reps = alive[b].nonzero()[:, 0]
        assert plan.keep[b].tolist() == reps.tolist()
        torch.testing.assert_close(out[b, 0], x[b, 0])  # the class token stays itself
        for k, rep in enumerate(reps.tolist()):
            members = (label[b] == rep).nonzero()[:, 0] + 1
            w = size[b, members]
            torch.testing.assert_close(out[b, 1 + k], (w * x[b, members]).sum(0) / w.sum())
            assert float(state.size[b, 1 + k]) == float(w.sum())


def test_clustering_plan_maps_sources_to_their_representatives():
    label = torch.tensor([[0, 0, 2, 2, 0, 5]])
    alive = torch.tensor([[True, False, True, False, False, True]])
    plan = clustering_plan(label, alive, 3)
    assert plan.keep.tolist() == [[0, 2, 5]]
    assert plan.merge_src.tolist() == [[1, 3, 4]] and plan.merge_dst.tolist() == [[0, 1, 0]]


# --------------------------------------------------------------------------- in a model


@pytest.mark.parametrize("kwargs", [{}, dict(reg_tokens=2), dict(class_token=False, global_pool="avg")])
def test_tokens_per_layer_follow_the_schedule_and_special_tokens_survive(kwargs):
    model = tiny_vit(**kwargs)
    p = model.num_prefix_tokens
    vitcompress.compress(model, "atc", flops=0.7, trace_source=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(x)
    st = vitcompress.stats(model)
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"] and all(r > 0 for r in st["schedule"])
    N0 = 64 + p
    source = st["source"]
    for i in range(p):
        assert torch.equal(source[:, i], F.one_hot(torch.tensor(i), N0).float().expand(3, N0))
    assert torch.equal(source.sum(1), torch.ones(3, N0))  # a partition: every patch in one token


def test_layers_restrict_the_reducing_blocks():
    model = vitcompress.compress(tiny_vit(), "atc", keep=0.8, layers=[1, 3])
    assert vitcompress.stats(model)["schedule"] == [0, 13, 0, 11]
    with pytest.raises(ValueError, match="blocks 0..3"):
        vitcompress.compress(tiny_vit(), "atc", keep=0.8, layers=[4])


def test_can_cluster_down_to_one_token():
    model = vitcompress.compress(tiny_vit(), "atc", r=[63, 0, 0, 0])
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert vitcompress.stats(model)["tokens_per_layer"] == [65, 2, 2, 2]


def test_restore_is_bit_exact():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        vitcompress.compress(model, "atc", flops=0.7)
        assert not torch.equal(model(x), before)
        vitcompress.restore(model)
        assert torch.equal(model(x), before)


def test_batch_one_computes_what_a_batch_computes():
    model = vitcompress.compress(tiny_vit(), "atc", flops=0.7)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batch = model(x)
        for i in range(len(x)):
            torch.testing.assert_close(model(x[i:i + 1])[0], batch[i], rtol=1e-5, atol=1e-5)


def test_bfloat16_runs_the_planned_counts():
    model = vitcompress.compress(tiny_vit().to(torch.bfloat16), "atc", flops=0.7)
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    st = vitcompress.stats(model)
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"]


@pytest.mark.parametrize("options", [dict(linkage="ward"), dict(layers=[0.5])])
def test_bad_options_raise_value_error(options):
    with pytest.raises(ValueError, match="atc"):
        vitcompress.compress(tiny_vit(), "atc", keep=0.9, **options)


def test_flops_budget_is_met_as_counted_on_the_tiny_vit():
    c = count_at_budget(tiny_vit(), "atc", torch.randn(1, 3, 32, 32))
    assert abs(c.counted / c.base - 0.7) <= 0.02 * 0.7
    assert c.counted == c.planned


@pytest.mark.slow
def test_flops_budget_is_met_as_counted_on_deit_small(deit_small):
    c = count_at_budget(deit_small, "atc", torch.randn(1, 3, 224, 224))
    assert abs(c.counted / c.base - 0.7) <= 0.02 * 0.7
    assert c.counted == c.planned  # the similarity product is planned exactly as counted


def test_cosine_distances_are_one_minus_the_cosine_in_float64():
    metric = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(7))
    want = 1 - F.cosine_similarity(metric[:, :, None].double(), metric[:, None].double(), dim=-1)
    got = cosine_distances(metric)
    assert got.dtype == torch.float64 and torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("r", [0, 1])
def test_the_smallest_removals_join_the_closest_pair_or_nothing(r):
    metric = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(8))
    plan = token_clustering(metric, r)
    assert plan.keep.shape == (2, 8 - r)
    d = cosine_distances(metric)
    for b in range(2):
        keep = plan.keep[b].tolist()
        groups = {frozenset([k]) for k in keep}
        if r:
            (src,), (dst,) = plan.merge_src[b].tolist(), plan.merge_dst[b].tolist()
            groups = {g for g in groups if keep[dst] not in g} | {frozenset([keep[dst], src])}
        assert groups == direct_clustering(d[b], 8 - r, "average")


def test_atc_clusters_down_to_one_token_and_no_further():
    """``max_remove`` is ``T - 1``: every token in one cluster is the most a block can do."""
    from vitcompress.methods import REGISTRY
    method = REGISTRY["atc"]
    for T in (0, 1, 2, 9):
        assert method.max_remove(T, 0, 4, method.defaults) == max(T - 1, 0)
    plan = token_clustering(torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(3)), 8)
    assert plan.keep.shape == (2, 1) and plan.merge_src.shape == (2, 8)
