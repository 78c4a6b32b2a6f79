"""ToFu (Token Fusion): MLERP against a direct computation, pruning in the early blocks and MLERP
merging in the later ones, token counts, special tokens, restore, batch 1, bf16 and the FLOPs budget."""
import pytest
import torch
import torch.nn.functional as F

import vitcompress
from conftest import count_at_budget
import vitcompress.engine.blocks as blocks
from vitcompress.engine.tokens import TokenState, apply_plan
from vitcompress.interfaces import Plan, Signals
from vitcompress.methods.tofu import ToFu, prunes_at, tofu_plan
from vitcompress.methods.tome import tome_matching
from vitcompress.testing import tiny_vit


def mlerp_by_loop(x, size, plan, p):
    """Each kept token: alone, the size-weighted average of itself (i.e. itself); with merged
    tokens, their size-weighted average rescaled to the largest norm among them."""
    out = []
    B = x.shape[0]
    for b in range(B):
        rows = [x[b, i] for i in range(p)]
        for k, t in enumerate(plan.keep[b].tolist()):
            members = [t] + [s for s, d in zip(plan.merge_src[b].tolist(), plan.merge_dst[b].tolist()) if d == k]
            vecs = torch.stack([x[b, p + m] for m in members]).double()
            w = torch.stack([size[b, p + m] for m in members]).double()
            avg = (vecs * w).sum(0) / w.sum()
            if len(members) > 1:
                avg = avg / avg.norm() * vecs.norm(dim=-1).max()
            rows.append(avg.to(x.dtype))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("p", [0, 1, 3])
def test_mlerp_equals_a_direct_computation(p):
    g = torch.Generator().manual_seed(p)
    B, T, C = 2, 101, 64
    x = torch.randn(B, p + T, C, generator=g) * torch.rand(B, p + T, 1, generator=g) * 3
    size = torch.randint(1, 7, (B, p + T, 1), generator=g).float()  # x * size / size is not always x
    metric = torch.randn(B, T, 4, generator=g)
    plan = tome_matching(metric, 30, p, class_token=p > 0)
    mlerp = Plan(plan.keep, plan.merge_src, plan.merge_dst, merge_norm="max")
    state = TokenState(num_prefix=p, size=size.clone())
    got = apply_plan(x, state, mlerp)
    torch.testing.assert_close(got, mlerp_by_loop(x, size, plan, p), atol=1e-5, rtol=1e-5)
    # sizes as in ToMe's merge; unmerged rows and the prefix exactly the plain merge's
    plain_state = TokenState(num_prefix=p, size=size.clone())
    plain = apply_plan(x, plain_state, plan)
    assert torch.equal(state.size, plain_state.size)
    received = torch.zeros(B, plan.keep.shape[1], dtype=torch.bool).scatter_(1, plan.merge_dst, True)
    untouched = torch.cat([torch.ones(B, p, dtype=torch.bool), ~received], dim=1)
    assert torch.equal(got[untouched], plain[untouched]) and (~untouched).any()
    # MLERP only restores the norm: the merged rows point where the average does, and are longer
    merged = ~untouched
    cos = F.cosine_similarity(got[merged], plain[merged], dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert (got[merged].norm(dim=-1) > plain[merged].norm(dim=-1) * (1 + 1e-4)).all()


def test_mlerp_in_bfloat16_is_the_float32_result_rounded():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1 + 20, 16, generator=g)
    plan = tome_matching(torch.randn(2, 20, 8, generator=g), 7, 1, class_token=True)
    plan = Plan(plan.keep, plan.merge_src, plan.merge_dst, merge_norm="max")
    want = apply_plan(x, TokenState.start(x, 1), plan)
    got = apply_plan(x.bfloat16(), TokenState.start(x, 1), plan)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


def test_unknown_merge_norm_is_refused():
    x = torch.randn(1, 6, 4)
    plan = tome_matching(torch.randn(1, 6, 4), 2, 0, class_token=False)
    with pytest.raises(ValueError, match="merge_norm"):
        apply_plan(x, TokenState.start(x, 0), Plan(plan.keep, plan.merge_src, plan.merge_dst, merge_norm="mean"))


# --------------------------------------------------------------------------- the plan per block


def signals(layer, num_layers=12, T=30, p=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Signals(metric=torch.randn(2, T, 8, generator=g), x=torch.randn(2, T, 16, generator=g), attn=None,
                   num_prefix=p, layer=layer, num_layers=num_layers)


def test_switch_point_is_after_the_first_half_of_the_blocks():
    assert [prunes_at(layer, 12, 0.5) for layer in range(12)] == [True] * 6 + [False] * 6
    assert [prunes_at(layer, 5, 0.5) for layer in range(5)] == [True] * 2 + [False] * 3
    assert not any(prunes_at(layer, 12, 0.0) for layer in range(12))
    assert all(prunes_at(layer, 12, 1.0) for layer in range(12))


@pytest.mark.parametrize("layer", [0, 5, 6, 11])
def test_early_blocks_drop_the_matched_tokens_late_blocks_merge_them_with_mlerp(layer):
    s = signals(layer)
    plan = ToFu().plan(s, 7, dict(ToFu.defaults))
    tome = tome_matching(s.metric, 7, 1, class_token=True)
    assert torch.equal(plan.keep, tome.keep)  # the same matching: the same survivors, in ToMe's order
    if layer < 6:
        assert plan.merge_src is None and plan.merge_norm is None  # pruned: the A tokens are dropped
    else:
        assert torch.equal(plan.merge_src, tome.merge_src) and torch.equal(plan.merge_dst, tome.merge_dst)
        assert plan.merge_norm == "max"
    average = tofu_plan(s.metric, 7, 1, class_token=True, prune=False, mlerp=False)
    assert average.merge_norm is None and torch.equal(average.merge_src, tome.merge_src)
    assert tofu_plan(s.metric, 7, 1, class_token=True, prune=False).merge_norm == "max"  # MLERP unless told


def record_plans(monkeypatch):
    plans = []

    def recording(x, state, plan, attn_bias=False):
        plans.append(plan)
        return apply_plan(x, state, plan, attn_bias)

    monkeypatch.setattr(blocks, "apply_plan", recording)
    return plans


@pytest.mark.parametrize("kwargs", [{}, dict(reg_tokens=2), dict(class_token=False, global_pool="avg")])
def test_in_a_model_tokens_follow_the_schedule_special_tokens_stay_and_sources_add_up(kwargs, monkeypatch):
    plans = record_plans(monkeypatch)
    model = tiny_vit(depth=4, **kwargs)
    p = model.num_prefix_tokens
    vitcompress.compress(model, "tofu", r=6, trace_source=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
    st = vitcompress.stats(model)
    assert st["schedule"] == [6] * 4
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"] == [64 + p - 6 * i for i in range(4)]
    assert [pl.merges for pl in plans] == [False, False, True, True]  # 2 of 4 blocks prune, 2 merge
    assert [pl.merge_norm for pl in plans] == [None, None, "max", "max"]
    source, size = st["source"], st["size"]
    N0 = 64 + p
    assert source.shape == (3, 64 + p - 24, N0)
    assert torch.equal(source[:, :p], torch.eye(N0)[:p].expand(3, p, N0))  # special tokens are themselves
    # pruned patches are gone (12 of them), merged ones are counted once, in their token's size
    assert torch.equal(source.sum(-1, keepdim=True), size)
    assert torch.equal(source.sum((1, 2)), torch.full((3,), float(N0 - 12)))
    assert (source.sum(1) <= 1).all() and size.max() > 1


def test_restore_is_bit_exact_and_batch_1_equals_the_batch():
    model = tiny_vit(depth=4, reg_tokens=1)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
        vitcompress.compress(model, "tofu", keep=0.8)
        out = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
        assert not torch.allclose(out, before, atol=1e-3)
        torch.testing.assert_close(alone, out, atol=1e-5, rtol=1e-5)
        vitcompress.restore(model)
        assert torch.equal(model(x), before)


def test_bfloat16_model_runs_the_same_schedule():
    model = tiny_vit(depth=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    vitcompress.compress(model, "tofu", keep=0.8)
    with torch.no_grad():
        want = model(x)
        planned = vitcompress.stats(model)["tokens_per_layer"]
        model.to(torch.bfloat16)
        got = model(x.bfloat16())
    assert got.dtype == torch.bfloat16 and vitcompress.stats(model)["tokens_per_layer"] == planned
    assert F.cosine_similarity(got.float(), want, dim=-1).min() > 0.98


def test_flops_budget_is_met_as_counted_on_deit_small(deit_small):
    c = count_at_budget(deit_small, "tofu", torch.randn(1, 3, 224, 224))
    assert abs(c.counted / c.base - 0.7) <= 0.02 * 0.7, c.counted / c.base
    assert c.stats["budget"] == "flops=0.7" and sum(c.stats["schedule"]) > 0


@pytest.mark.parametrize("options,error", [(dict(prune_fraction=1.5), ValueError),
                                           (dict(prune_fraction=-0.1), ValueError),
                                           (dict(mlerp="yes"), TypeError), (dict(switch=3), TypeError)])
def test_bad_options_are_refused(options, error):
    with pytest.raises(error):
        vitcompress.compress(tiny_vit(), "tofu", **options)


@pytest.mark.parametrize("fraction,merges", [(0.0, [True] * 4), (1.0, [False] * 4), (0.25, [False, True, True, True])])
def test_prune_fraction_bounds_are_accepted_all_merge_or_all_prune(fraction, merges, monkeypatch):
    """``prune_fraction`` is a number in [0, 1], both ends included: 0 merges in every block, 1 prunes in every one."""
    plans = record_plans(monkeypatch)
    model = vitcompress.compress(tiny_vit(depth=4), "tofu", r=4, prune_fraction=fraction)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    assert [pl.merges for pl in plans] == merges


def test_validate_refuses_a_bool_fraction_itself():
    """``compress`` refuses a bool before the method sees it; ``ToFu.validate`` does too, for direct callers."""
    with pytest.raises(ValueError, match="prune_fraction=True"):
        ToFu().validate(dict(ToFu.defaults, prune_fraction=True))


@pytest.mark.parametrize("num_prefix,cls_first", [(0, True), (0, False), (1, True), (2, False), (3, True)])
def test_unmerged_tokens_keep_index_order_only_behind_a_class_token(num_prefix, cls_first):
    """ToMe's rule (tests/test_algorithm_checks.py checks it against a loop): the unmerged A tokens keep
    their index order when a class token comes first; otherwise (no prefix, registers only) score order."""
    metric = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(10 + num_prefix))
    s = Signals(metric=metric, x=metric, attn=None, num_prefix=num_prefix, layer=3, num_layers=4, cls_first=cls_first)
    for layer in (0, 3):  # a pruning and a merging block
        s.layer = layer
        plan = ToFu().plan(s, 5, dict(ToFu.defaults))
        behind_cls = cls_first and num_prefix > 0
        assert torch.equal(plan.keep, tome_matching(metric, 5, num_prefix, class_token=behind_cls).keep)
        assert not torch.equal(plan.keep, tome_matching(metric, 5, num_prefix, class_token=not behind_cls).keep)
