"""PPT: the importance scores and the per-image choice against direct computations, the plan, and the
method in a model (counts per layer, special tokens, restore, batch 1, bf16, the FLOPs budget; compile in
test_compile.py).
The official code's outputs are checked in tests/test_official_ppt_atc.py."""
import pytest
import torch
import torch.nn.functional as F

import vitcompress
from conftest import count_at_budget
import vitcompress.engine.blocks as blocks
from vitcompress.engine.tokens import TokenState, apply_plan
from vitcompress.methods.ppt import PPT, default_layers, importance_scores, pool_images, pruning_and_pooling
from vitcompress.methods.tome import tome_matching
from vitcompress.testing import tiny_vit


def test_importance_is_cls_attention_times_value_norm_normalised():
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 3, 7, 7, generator=g).softmax(-1)
    v = torch.randn(2, 3, 7, 4, generator=g)
    for p in (1, 2):
        got = importance_scores(attn, v, p)
        for b in range(2):
            raw = [sum(float(attn[b, h, 0, j]) for h in range(3)) * float(v[b, :, j].flatten().norm())
                   for j in range(p, 7)]
            want = torch.tensor(raw) / sum(raw)
            torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-7)


def test_an_image_pools_when_its_scores_vary_less_than_the_threshold():
    flat = torch.full((1, 10), 0.1)
    peaked = torch.tensor([[0.91] + [0.01] * 9])
    scores = torch.cat([flat, peaked])
    var = float(peaked.var())  # unbiased, as torch.var in the official code
    assert pool_images(scores, var * 1.01).tolist() == [True, True]
    assert pool_images(scores, var).tolist() == [True, False]  # strictly below pools
    assert pool_images(scores, 0.0).tolist() == [False, False]


def test_plan_prunes_by_importance_in_score_order_or_pools_as_tome_per_image():
    g = torch.Generator().manual_seed(1)
    metric = torch.randn(2, 12, 8, generator=g)
    scores = torch.tensor([[1.0] * 12, list(range(12))]).float()
    scores = scores / scores.sum(1, keepdim=True)  # image 0: flat (pools), image 1: peaked (prunes)
    plan = pruning_and_pooling(metric, scores, r=4, num_prefix=1, threshold=1e-3)
    tome = tome_matching(metric, 4, 1, class_token=True)
    assert torch.equal(plan.keep[0], tome.keep[0]) and torch.equal(plan.merge_src[0], tome.merge_src[0])
    assert torch.equal(plan.merge_dst[0], tome.merge_dst[0])
    assert plan.keep[1].tolist() == list(range(11, 3, -1))  # most important first
    assert sorted(plan.merge_src[1].tolist()) == [0, 1, 2, 3]
    assert plan.merge_mask.tolist() == [[True] * 4, [False] * 4]


def test_a_masked_merge_prunes_exactly():
    """The apply path with ``merge_mask``: a pooling image is merged size-weighted, a pruning image
    keeps its tokens untouched (sizes and source rows included)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 5, generator=g)
    metric = torch.randn(2, 6, 4, generator=g)
    scores = torch.tensor([[1.0] * 6, [6.0, 5, 4, 3, 2, 1]])
    plan = pruning_and_pooling(metric, scores / scores.sum(1, keepdim=True), r=2, num_prefix=1, threshold=1e-3)
    state = TokenState.start(x, num_prefix=1, trace_source=True)
    out = apply_plan(x, state, plan)
    want_pruned = torch.cat([x[1, :1], x[1, 1:][plan.keep[1]]])
    assert torch.equal(out[1], want_pruned) and torch.equal(state.size[1], torch.ones(5, 1))
    assert torch.equal(state.source[1], torch.eye(7)[[0] + (plan.keep[1] + 1).tolist()])
    tome = tome_matching(metric, 2, 1, class_token=True)
    ref = TokenState.start(x, num_prefix=1, trace_source=True)
    want_pooled = apply_plan(x, ref, tome)
    assert torch.equal(out[0], want_pooled[0]) and torch.equal(state.size[0], ref.size[0])
    assert torch.equal(state.source[0], ref.source[0])


def test_default_layers_are_quarters_of_the_depth():
    assert default_layers(12) == [3, 6, 9]
    assert default_layers(6) == [1, 3, 4]
    assert default_layers(2) == [0, 1]


# --------------------------------------------------------------------------- in a model


@pytest.mark.parametrize("kwargs", [{}, dict(reg_tokens=2)])
def test_tokens_per_layer_follow_the_schedule_and_special_tokens_survive(kwargs):
    model = tiny_vit(**kwargs)
    p = model.num_prefix_tokens
    vitcompress.compress(model, "ppt", flops=0.7, trace_source=True)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(x)
    st = vitcompress.stats(model)
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"]
    assert [i for i, r in enumerate(st["schedule"]) if r] == [1, 2, 3]  # quarters of 4 blocks
    N0 = 64 + p
    source = st["source"]
    for i in range(p):
        assert torch.equal(source[:, i], F.one_hot(torch.tensor(i), N0).float().expand(6, N0))
    assert torch.equal(source.sum((1, 2)), torch.full((6,), float(N0)) - (source.sum(1) == 0).sum(1))


@pytest.mark.parametrize("kwargs", [dict(class_token=False, global_pool="avg"),
                                    dict(class_token=False, reg_tokens=2, global_pool="avg")])
def test_a_model_without_a_class_token_is_refused_at_compress_time(kwargs):
    model = tiny_vit(**kwargs)
    with pytest.raises(ValueError, match="no class token; use a method that needs none: tome, pitome"):
        vitcompress.compress(model, "ppt", keep=0.8)
    assert "no class token" in vitcompress.supported(model)["ppt"]
    with pytest.raises(ValueError, match="no class token"):  # no special token, even if the first were called one
        PPT().check_model(0, True)
    PPT().check_model(1, True)


def test_attention_is_materialised_only_in_reducing_blocks(monkeypatch):
    seen = []
    real = blocks.attention

    def spy(q, k, v, bias, scale, dropout, need_probs):
        seen.append(need_probs)
        return real(q, k, v, bias, scale, dropout, need_probs)

    monkeypatch.setattr(blocks, "attention", spy)
    model = vitcompress.compress(tiny_vit(), "ppt", keep=0.8, layers=[2])
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen == [False, False, True, False]


def test_restore_is_bit_exact():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        vitcompress.compress(model, "ppt", flops=0.7)
        assert not torch.equal(model(x), before)
        vitcompress.restore(model)
        assert torch.equal(model(x), before)


IMAGES = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def first_block_variances(monkeypatch):
    """The variances of the importance scores of IMAGES in the first reducing block of the tiny model."""
    import vitcompress.methods.ppt as ppt
    seen = []
    real = ppt.pool_images

    def spy(scores, threshold):
        seen.append(scores.var(dim=1))
        return real(scores, threshold)

    monkeypatch.setattr(ppt, "pool_images", spy)
    with torch.no_grad():
        vitcompress.compress(tiny_vit(), "ppt", flops=0.7)(IMAGES)
    monkeypatch.setattr(ppt, "pool_images", real)
    return seen[0]


@pytest.mark.parametrize("choice", ["prune", "mixed", "pool"])
def test_each_image_gets_what_it_gets_alone(monkeypatch, choice):
    """The choice is per image: a batch computes, row by row, what batch 1 computes (batches that
    prune, pool, and mixed ones: half way between the two middle variances of the first block)."""
    variances = first_block_variances(monkeypatch).sort().values
    threshold = {"prune": 0.0, "pool": 1.0, "mixed": float(variances[3:5].mean())}[choice]
    if choice == "mixed":
        assert int((variances < threshold).sum()) == 4
    model = vitcompress.compress(tiny_vit(), "ppt", flops=0.7, threshold=threshold)
    with torch.no_grad():
        batch = model(IMAGES)
        for i in range(len(IMAGES)):
            torch.testing.assert_close(model(IMAGES[i:i + 1])[0], batch[i], rtol=1e-5, atol=1e-5)


def test_pooling_everywhere_is_tome_at_the_same_schedule():
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ppt_model = vitcompress.compress(tiny_vit(), "ppt", flops=0.7, threshold=1.0)
    with torch.no_grad():
        got = ppt_model(x)
    schedule = vitcompress.stats(ppt_model)["schedule"]
    tome_model = vitcompress.compress(tiny_vit(), "tome", r=schedule)
    with torch.no_grad():
        want = tome_model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_runs_the_planned_counts():
    model = vitcompress.compress(tiny_vit().to(torch.bfloat16), "ppt", flops=0.7)
    x = torch.randn(4, 3, 32, 32).to(torch.bfloat16)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    st = vitcompress.stats(model)
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"]


def test_default_budget_is_the_official_deit_s_setting():
    model = vitcompress.compress(tiny_vit(), "ppt")
    assert vitcompress.stats(model)["budget"] == "flops=0.64"


@pytest.mark.parametrize("options", [dict(threshold=-1.0), dict(threshold=float("nan")), dict(layers=[1.5]),
                                     dict(layers=3)])
def test_bad_options_raise_value_error(options):
    with pytest.raises(ValueError, match="ppt"):
        vitcompress.compress(tiny_vit(), "ppt", keep=0.9, **options)
    with pytest.raises(TypeError, match="ppt threshold"):
        vitcompress.compress(tiny_vit(), "ppt", keep=0.9, threshold="x")


def test_layers_beyond_the_model_are_refused():
    with pytest.raises(ValueError, match="blocks 0..3"):
        vitcompress.compress(tiny_vit(), "ppt", keep=0.9, layers=[4])


def test_flops_budget_is_met_as_counted_on_the_tiny_vit():
    c = count_at_budget(tiny_vit(), "ppt", torch.randn(1, 3, 32, 32))
    assert abs(c.counted / c.base - 0.7) <= 0.02 * 0.7
    assert c.counted == c.planned


@pytest.mark.slow
def test_flops_budget_is_met_as_counted_on_deit_small(deit_small):
    c = count_at_budget(deit_small, "ppt", torch.randn(1, 3, 224, 224))
    assert abs(c.counted / c.base - 0.7) <= 0.02 * 0.7
    assert c.counted == c.planned
    assert [i for i, r in enumerate(c.stats["schedule"]) if r] == [3, 6, 9]


@pytest.mark.parametrize("r", [0, 1])
def test_a_pruning_image_keeps_its_top_tokens_in_score_order_for_any_r(r):
    """The smallest removals too: with ``r = 1`` a peaked image prunes its least important token
    (the rest in descending importance) while a flat one pools; ``r = 0`` changes nothing."""
    metric = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(4))
    scores = torch.tensor([[1.0] * 12, [3.0, 7, 1, 12, 5, 2, 9, 4, 11, 6, 8, 10]])
    scores = scores / scores.sum(1, keepdim=True)
    plan = pruning_and_pooling(metric, scores, r=r, num_prefix=1, threshold=1e-3)
    by_score = sorted(range(12), key=lambda i: -float(scores[1, i]))
    tome = tome_matching(metric, r, 1, class_token=True)
    assert torch.equal(plan.keep[0], tome.keep[0])
    if r == 0:
        assert torch.equal(plan.keep, tome.keep) and torch.equal(tome.keep[0], torch.arange(12))
    else:
        assert plan.keep[1].tolist() == by_score[:12 - r] and plan.merge_src[1].tolist() == by_score[12 - r:]
        assert plan.merge_mask.tolist() == [[True] * r, [False] * r]


def test_validate_refuses_a_bool_threshold_itself():
    """``compress`` refuses a bool before the method sees it; ``PPT.validate`` does too, for direct callers."""
    for bad in (True, "1e-4"):
        with pytest.raises(ValueError, match="ppt threshold="):
            PPT().validate(dict(PPT.defaults, threshold=bad))
