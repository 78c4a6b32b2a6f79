"""Checks written for the mutants of the mutation check (docs/contributing.md) that no other test
noticed: each asserts the method's definition on a case where the mutant differs, computed here."""
import math

import pytest
import torch

import vitcompress
from vitcompress.interfaces import Signals
from vitcompress.methods import focus_detr, quota, tokencorr
from vitcompress.methods.random_prune import RandomPrune, random_keep
from vitcompress.testing import ramp_scorer, tiny_vit

# ---------------------------------------------------------------- QuoTA


def test_quota_grid_shape_on_extreme_aspects_and_empty_shares():
    """h' = round(sqrt(n h / w)) clamped to [1, n], w' = n // h'; nothing at all for n <= 0."""
    for h, w, n in [(1, 40, 20), (40, 1, 20), (7, 5, 35), (3, 4, 1), (2, 30, 3), (24, 24, 100)]:
        rows = min(n, max(1, round(math.sqrt(n * h / w))))
        assert quota.grid_shape(h, w, n) == (rows, n // rows), (h, w, n)
    assert quota.grid_shape(1, 40, 20) == (1, 20) and quota.grid_shape(40, 1, 20) == (20, 1)
    assert quota.grid_shape(4, 4, 0) == (0, 0) and quota.grid_shape(4, 4, -3) == (0, 0)


def test_quota_reduce_video_on_non_square_frames_is_the_formula():
    """The budget is keep x the video's h*w tokens; each frame's grid keeps its own h:w aspect."""
    grids = [torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    frames = torch.zeros(3, 3, 8, 8)
    tokens, report = quota.QuoTA().reduce_video(frames, grids, 0.5, "q?", {"scorer": ramp_scorer, "tokenizer": None})
    budget = int(0.5 * 3 * 6 * 4)
    assert report["budget"] == budget == 36
    probs = [0.1, 0.55, 1.0]
    squares = [(100 * p) ** 2 for p in probs]
    alloc = [int(budget * s / sum(squares)) for s in squares]
    assert report["allocation"] == alloc
    shapes = []
    for n in alloc:
        rows = min(n, max(1, round(math.sqrt(n * 6 / 4)))) if n > 0 else 0
        shapes.append((rows, n // rows) if n > 0 else (0, 0))
    assert [tuple(s) for s in report["grid"]] == shapes
    assert report["frame_tokens"] == [h * w for h, w in shapes]
    for t, g, (h, w) in zip(tokens, grids, shapes):
        want = torch.nn.functional.interpolate(g.permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                                               align_corners=False)[0].permute(1, 2, 0).reshape(-1, 3) \
            if h else g[:0, 0]
        torch.testing.assert_close(t, want)


# ---------------------------------------------------------------- tokencorr


def basis_keys():
    """Keys with exact similarities (0 or 1): three copies of e0, two of e1, one of e2, at different
    norms, in 4 dimensions (N=6 != d)."""
    e = torch.eye(4)
    return torch.stack([2 * e[0], 3 * e[0], 0.5 * e[0], 4 * e[1], 0.25 * e[1], e[2]])


def test_tokencorr_redundancy_counts_strictly_more_than_c_strictly_similar_others():
    keys = basis_keys()
    # c=1: each e0 copy has 2 identical others (> 1: redundant), each e1 copy 1 (not), e2 none
    assert tokencorr.redundant_patches(keys, 0.5, 1).tolist() == [True, True, True, False, False, False]
    assert tokencorr.redundant_patches(keys, 0.5, 0).tolist() == [True] * 5 + [False]
    assert not bool(tokencorr.redundant_patches(keys, 1.0, 0).any())  # similarity 1 is not > tau=1
    assert not bool(tokencorr.redundant_patches(keys, 0.0, 0)[5])  # orthogonal: 0 is not > tau=0
    assert tokencorr.information_density(keys, 0.5, 1) == 0.5
    assert tokencorr.crop_budget(keys, 0.5, 1) == 3
    assert tokencorr.crop_budget(keys[:3], 0.5, 0) == 0  # the formula's default: no floor
    assert tokencorr.crop_budget(keys[:3], 0.5, 0, min_tokens=1) == 1
    assert tokencorr.crop_budget(keys, 0.5, 1, min_tokens=99) == 6  # at most N (N=6, d=4)


def test_tokencorr_patch_keys_and_cls_attention_are_their_definitions():
    g = torch.Generator().manual_seed(0)
    B, N, H, d = 2, 5, 3, 4
    q, k = torch.randn(B, N, H * d, generator=g), torch.randn(B, N, H * d, generator=g)
    want = torch.stack([torch.stack([k[b, n].reshape(H, d).mean(0) for n in range(1, N)]) for b in range(B)])
    torch.testing.assert_close(tokencorr.patch_keys(k, H), want)
    scale = 0.3
    rows = []
    for b in range(B):
        per_head = [torch.softmax(torch.stack([q[b, 0, h * d:(h + 1) * d] @ k[b, n, h * d:(h + 1) * d] * scale
                                               for n in range(N)]), 0) for h in range(H)]
        rows.append(torch.stack(per_head).mean(0)[1:])
    torch.testing.assert_close(tokencorr.cls_attention(q, k, H, scale), torch.stack(rows))


def test_tokencorr_outliers_are_strictly_above_q3_plus_1_5_iqr():
    # Q1 = 1, Q3 = 3 (linear interpolation of 5 values), the fence at 3 + 1.5 * 2 = 6
    assert tokencorr.iqr_outliers(torch.tensor([1.0, 1.0, 3.0, 3.0, 6.0])).tolist() == [False] * 5
    assert tokencorr.iqr_outliers(torch.tensor([1.0, 1.0, 3.0, 3.0, 6.5])).tolist() == [False] * 4 + [True]


def test_tokencorr_sampling_draws_distinct_patches_and_fills_the_budget_with_outliers_alone():
    shallow = torch.full((20,), 1e-9)
    shallow[7] = 1e9  # one patch takes nearly all the probability: drawing with replacement would repeat it
    deep = torch.zeros(20)
    picked = tokencorr.sample_tokens(deep, shallow, 6, torch.Generator().manual_seed(0))
    assert picked.unique().numel() == 6 and 7 in picked.tolist()
    deep[[2, 11]] = 5.0  # exactly as many outliers as the budget: those two
    assert tokencorr.sample_tokens(deep, shallow, 2, torch.Generator().manual_seed(0)).tolist() == [2, 11]


def test_tokencorr_plan_merges_only_when_asked_and_something_is_dropped():
    keys = basis_keys()
    deep, shallow = torch.rand(6, generator=torch.Generator().manual_seed(1)), torch.ones(6)
    plan, budget = tokencorr.tokencorr_plan(keys, deep, shallow, tau=0.5, c=1, merge=False)
    assert budget == 3 and plan.merge_src is None and plan.keep.shape == (1, 3)
    plan, budget = tokencorr.tokencorr_plan(keys[:3], deep[:3], shallow[:3], tau=0.5, c=0, merge=True)
    assert budget == 0 and plan.keep.shape == (1, 0) and plan.merge_src is None  # nothing to merge into
    plan, budget = tokencorr.tokencorr_plan(keys[:3], deep[:3], shallow[:3], tau=0.5, c=0, merge=True, min_tokens=1)
    kept = plan.keep[0].tolist()
    assert budget == 1 and len(kept) == 1  # the other two copies fold into the one kept
    assert sorted(plan.merge_src[0].tolist()) == [i for i in range(3) if i not in kept]
    assert plan.merge_dst[0].tolist() == [0, 0]
    plan, budget = tokencorr.tokencorr_plan(keys, deep, shallow, tau=0.5, c=1, merge=True)
    dropped = plan.merge_src[0].tolist()
    assert budget == 3 and sorted(dropped + plan.keep[0].tolist()) == list(range(6))
    unit = torch.nn.functional.normalize(keys, dim=-1)
    for src, dst in zip(dropped, plan.merge_dst[0].tolist()):  # into the most similar kept patch
        assert dst == int((unit[src] @ unit[plan.keep[0]].T).argmax())
    e = torch.eye(4)  # N=6 patches of d=4, two copies of e0: 4 kept (= d, not N), the other copy merged
    keys = torch.stack([2 * e[0], 3 * e[0], e[1], e[2], e[3], -e[1]])
    plan, budget = tokencorr.tokencorr_plan(keys, deep, shallow, tau=0.5, c=0, merge=True)
    assert budget == 4 and plan.merge_src is not None and plan.merge_src.shape == (1, 2)


# ---------------------------------------------------------------- Focus-DETR


def test_focus_detr_cascade_stretches_the_papers_ratios_linearly():
    import numpy as np

    paper = [1.0, 0.8, 0.6, 0.6, 0.4, 0.2]
    for depth in (2, 3, 4, 6, 11):
        t = np.arange(depth) * 5 / (depth - 1)
        assert focus_detr.cascade_for_depth(depth) == tuple(round(float(v), 6) for v in np.interp(t, range(6), paper))
    assert focus_detr.cascade_for_depth(1) == (1.0,)
    assert focus_detr.cascade_for_depth(3) == (1.0, 0.6, 0.2)
    assert focus_detr.cascade_for_depth(2, [0.5, 0.25]) == (0.5, 0.25)


def test_focus_detr_layer_counts_floor_keep_then_each_ratio_at_least_one():
    assert focus_detr.layer_token_counts(100, 0.5, [1.0, 0.8, 0.6]) == [50, 40, 30]
    assert focus_detr.layer_token_counts(100, 0.29, [1.0]) == [29]  # 100 * 0.29 = 28.999999999999996
    assert focus_detr.layer_token_counts(10, 0.7, [0.3]) == [2]  # floor(7 * 0.3 = 2.1)
    assert focus_detr.layer_token_counts(3, 0.1, [1.0, 0.5]) == [1, 1]  # never an empty layer


def test_focus_detr_layer_sets_rank_each_images_real_tokens():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.2], [0.8, 0.1, 0.6, 0.9, 0.0, 0.0]])
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    sets = focus_detr.select_layer_tokens(scores, valid, 1.0, [1.0, 0.5])
    (index0, slots0, counts0), (index1, slots1, counts1) = sets
    assert counts0 == [6, 4] and counts1 == [3, 2]
    assert index0[0].tolist() == [1, 3, 2, 4, 5, 0] and index0[1, :4].tolist() == [3, 0, 2, 1]
    assert slots0.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    assert index1.tolist() == [[1, 3, 2], [3, 0, 2]] and slots1.tolist() == [[True] * 3, [True, True, False]]


def test_focus_detr_dual_attention_takes_the_best_class_times_foreground_among_valid_slots():
    fg = torch.tensor([[0.9, 0.8, 0.15, 0.7]])
    cls = torch.tensor([[0.2, 0.9, 1.0, 0.5]])  # products 0.18, 0.72, 0.15 (sums would rank slot 2 second), 0.35
    slots = torch.tensor([[True, True, True, False]])
    idx, ok = focus_detr.dual_attention_tokens(fg, cls, slots, 2)
    assert idx.tolist() == [[1, 0]] and ok.tolist() == [[True, True]]
    idx, ok = focus_detr.dual_attention_tokens(fg, None, slots, 9)  # D = min(k, K); the invalid slot last
    assert idx.tolist() == [[0, 1, 2, 3]] and ok.tolist() == [[True, True, True, False]]


def test_focus_detr_token_norm_and_scorer_mean_over_real_tokens():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(focus_detr.token_norm(x), torch.linalg.vector_norm(x, dim=-1))
    torch.manual_seed(0)
    scorer = focus_detr.FocusScorer(8, hidden=8).eval()
    valid = torch.tensor([[True, True, True, False, False], [True] * 5])
    with torch.no_grad():
        got = scorer(x, valid)
        for b in range(2):
            n = int(valid[b].sum())
            alone = scorer(x[b:b + 1, :n])  # the padded tokens change nothing of the real ones
            torch.testing.assert_close(got[b, :n], alone[0], rtol=1e-5, atol=1e-6)


def test_focus_detr_scorer_shape_checks_and_modulation_weights(tmp_path):
    import pytest

    scorer = focus_detr.FocusScorer(8)  # hidden defaults to dim, one level: no modulation weight
    assert scorer.config == {"dim": 8, "hidden": 8, "num_levels": 1} and scorer.alpha.shape == (0,)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    assert scorer(x).shape == (2, 5)  # one logit per token
    for hidden in (0, 6, -4):
        with pytest.raises(ValueError, match="positive multiple of 4"):
            focus_detr.FocusScorer(8, hidden=hidden)
    with pytest.raises(ValueError, match="at least 1"):
        focus_detr.FocusScorer(8, num_levels=0)
    torch.manual_seed(0)
    levels = focus_detr.FocusScorer(8, num_levels=64)
    alpha = levels.alpha.detach()
    assert alpha.shape == (63,) and -0.3 <= float(alpha.min()) < 0 < float(alpha.max()) <= 0.3
    two = focus_detr.FocusScorer(8, num_levels=2).eval()
    feats = [torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)]
    path = str(tmp_path / "scorer.pt")
    focus_detr.save_scorer(two, path)
    with torch.no_grad():
        for a, b in zip(focus_detr.foreground_logits(two, feats), focus_detr.foreground_logits(
                focus_detr.load_scorer(path), feats)):
            assert torch.equal(a, b)


def test_every_method_documents_its_kind_and_what_keep_means_in_its_range_error():
    """``describe`` says whether each method merges or prunes and what ``keep=`` means for it, and an
    out-of-range ``keep`` names that meaning."""
    for method in vitcompress.list_methods("vit"):
        assert vitcompress.describe(method)["kind"] in ("merge", "prune"), method
        keep_means = vitcompress.describe(method)["keep_means"]
        assert isinstance(keep_means, str) and keep_means, method
        with pytest.raises(ValueError) as err:
            vitcompress.compress(tiny_vit(), method, keep=1.5)
        assert keep_means in str(err.value), method


# ---------------------------------------------------------------- the layers option (methods/block_options.py)

LAYERED = ("evit", "ppt", "mctf", "atc")


def test_layers_must_be_non_negative_int_block_indices_of_the_model():
    vit = tiny_vit()  # every refusal leaves it as it was
    for method in LAYERED:
        for bad in ([1.5], [True], [-1], ["1"], (1, None), 2):
            with pytest.raises(ValueError, match=rf"{method} layers=.*: give None \("):
                vitcompress.compress(vit, method, layers=bad)
        with pytest.raises(ValueError, match=rf"{method} layers=\[1, 4\]: the model has blocks 0..3"):
            vitcompress.compress(vit, method, r=[0, 4, 0, 0], layers=[1, 4])
        model = vitcompress.compress(tiny_vit(), method, r=[0, 4, 0, 4], layers=(1, 3))  # a tuple is a list here
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert vitcompress.stats(model)["tokens_per_layer"] == [65, 65, 61, 61], method


def test_an_empty_layers_list_reduces_nowhere_except_for_evit_which_refuses_it():
    for method in ("mctf", "atc"):
        model = vitcompress.compress(tiny_vit(), method, layers=[])
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert vitcompress.stats(model)["tokens_per_layer"] == [65] * 4, method
    with pytest.raises(ValueError, match=r"evit layers=\[\]: give None"):
        vitcompress.compress(tiny_vit(), "evit", layers=[])


# ---------------------------------------------------------------- random pruning


def test_random_keep_is_a_sorted_uniform_subset_drawn_per_seed_and_block():
    draws = {(seed, layer): random_keep(64, 24, seed, layer) for seed in range(3) for layer in range(12)}
    for d in draws.values():
        assert d == sorted(set(d)) and len(d) == 40 and d[0] >= 0 and d[-1] < 64
    assert len({tuple(d) for d in draws.values()}) == len(draws)  # every (seed, block) has its own draw
    assert random_keep(64, 24, 1, 5) == draws[(1, 5)]
    counts = torch.zeros(64)
    for seed in range(400):
        counts[random_keep(64, 24, seed, 0)] += 1
    assert ((counts / 400 - 40 / 64).abs() < 0.1).all()  # each token kept 40/64 of the time (4 sigma)


def test_random_plan_is_the_draw_for_its_seed_block_and_counts_for_every_image():
    method = RandomPrune()  # one instance: its cache must tell the cases apart
    first = {}
    for T, r, seed, layer in [(20, 7, 5, 2), (20, 6, 5, 2), (18, 7, 5, 2), (20, 7, 6, 2), (20, 7, 5, 3), (20, 7, 5, 2)]:
        metric = torch.randn(3, T, 8)
        s = Signals(metric=metric, x=metric, attn=None, num_prefix=1, layer=layer, num_layers=4)
        plan = method.plan(s, r, {"seed": seed})
        assert plan.keep.tolist() == [random_keep(T, r, seed, layer)] * 3 and plan.merge_src is None
        # drawn once and kept: a repeated call reuses the tensor (no host-to-device copy in a CUDA graph)
        assert first.setdefault((T, r, seed, layer), plan.keep.data_ptr()) == plan.keep.data_ptr()
    assert len(first) == 5
    with pytest.raises(ValueError, match="seed=-1 must be >= 0"):
        vitcompress.compress(tiny_vit(), "random", r=4, seed=-1)
    model = vitcompress.compress(tiny_vit(), "random", r=[63, 0, 0, 0])  # down to one patch token
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert vitcompress.stats(model)["tokens_per_layer"] == [65, 2, 2, 2]
    with pytest.raises(ValueError, match="can remove at most 63"):
        vitcompress.compress(tiny_vit(), "random", r=[64, 0, 0, 0])


def test_every_default_budget_is_one_a_user_could_give_and_plans_the_same():
    """A method's default budget passes the checks an explicit one does (e.g. ``keep`` in (0, 1]) and
    plans the same tokens per block as giving it explicitly."""
    for method in vitcompress.list_methods("vit"):
        (kind, value), = vitcompress.describe(method)["default_budget"].items()
        default = vitcompress.stats(vitcompress.compress(tiny_vit(), method))
        explicit = vitcompress.stats(vitcompress.compress(tiny_vit(), method, **{kind: value}))
        assert default["planned_tokens_per_layer"] == explicit["planned_tokens_per_layer"], method
        assert default["budget"] == explicit["budget"] == f"{kind}={value}", method


# ---------------------------------------------------------------- the kernels' torch reference (plan execution)


def loop_apply(x, size, keep, src, dst, p):
    """A plan executed row by row: special rows, then each kept row with the rows merged into it,
    size-weighted (plainly summed without sizes)."""
    out, sizes = [], []
    for b in range(x.shape[0]):
        rows, ss = [x[b, i] for i in range(p)], [size[b, i] if size is not None else None for i in range(p)]
        for j, k in enumerate(keep[b].tolist()):
            members = [k] + ([s for s, d in zip(src[b].tolist(), dst[b].tolist()) if d == j] if src is not None else [])
            w = [size[b, p + m] if size is not None else torch.ones(1) for m in members]
            total = sum(w)
            rows.append(sum(wi * x[b, p + m] for wi, m in zip(w, members)) / (total if size is not None else 1))
            ss.append(total if size is not None else None)
        out.append(torch.stack(rows))
        sizes.append(torch.stack(ss) if size is not None else None)
    return torch.stack(out), (torch.stack(sizes) if size is not None else None)


def test_reference_apply_plan_is_the_row_by_row_execution():
    from vitcompress.kernels import reference
    g = torch.Generator().manual_seed(12)
    B, p, T, C = 2, 1, 9, 4
    x = torch.randn(B, p + T, C, generator=g)
    size = torch.randint(1, 4, (B, p + T, 1), generator=g).float()
    keep = torch.stack([torch.randperm(T, generator=g)[:6] for _ in range(B)])
    rest = torch.stack([torch.tensor(sorted(set(range(T)) - set(k.tolist()))) for k in keep])
    dst = torch.randint(0, 6, (B, 3), generator=g)
    for s in (size, None):
        for src, d in ((None, None), (rest[:, :0], dst[:, :0]), (rest, dst)):  # pruning, no merge, merges
            want_x, want_size = loop_apply(x, s, keep, src, d, p)
            got_x, got_size, log = reference.apply_plan(x, s, keep, src, d, p, log_size=True)
            if src is None or src.shape[1] == 0:  # without merges it is a gather, bit for bit
                gathered = x[:, p:].gather(1, keep[..., None].expand(-1, -1, C))
                assert torch.equal(got_x, torch.cat([x[:, :p], gathered], 1))
            assert torch.allclose(got_x, want_x, atol=1e-6)
            assert (got_size is None) == (s is None) and (s is None or torch.equal(got_size, want_size))
            assert (log is None) == (s is None) and (s is None or torch.allclose(log, want_size.log()))
    got = reference.apply_plan(x[:, p:], size[:, p:], keep)  # no special rows, no log unless asked
    assert torch.equal(got[0], x[:, p:].gather(1, keep[..., None].expand(-1, -1, C))) and got[2] is None
    weight = torch.rand(B, T, generator=g)  # the weighted plan: plain sums of weight x row, no special rows
    got_x, got_size, _ = reference.apply_weighted_plan(x[:, p:], size[:, p:], keep, rest, dst, weight)
    want_x, _ = loop_apply(x[:, p:] * weight[..., None], None, keep, rest, dst, 0)
    assert torch.allclose(got_x, want_x, atol=1e-6)
    assert torch.equal(got_size, loop_apply(size[:, p:], None, keep, rest, dst, 0)[0])


@pytest.mark.parametrize("b_first,sort_unmerged", [(True, False), (False, True), (False, False)])
def test_reference_rank_plan_is_the_ranking_by_hand(b_first, sort_unmerged):
    from vitcompress.kernels import reference
    g = torch.Generator().manual_seed(13)
    B, Na, Nb, r = 2, 7, 5, 3
    score = torch.rand(B, Na, generator=g)
    match = torch.randint(0, Nb, (B, Na), generator=g)
    a_idx, b_idx = torch.randperm(12, generator=g)[:Na].expand(B, -1), torch.arange(20, 20 + Nb).expand(B, -1)
    keep, src, dst = reference.rank_plan(score, match, r, a_idx, b_idx, sort_unmerged=sort_unmerged, b_first=b_first)
    for b in range(B):
        ranked = sorted(range(Na), key=lambda i: -float(score[b, i]))
        unmerged = sorted(ranked[r:]) if sort_unmerged else ranked[r:]
        kept_a = [int(a_idx[b, i]) for i in unmerged]
        assert keep[b].tolist() == (b_idx[b].tolist() + kept_a if b_first else kept_a + b_idx[b].tolist())
        assert src[b].tolist() == [int(a_idx[b, i]) for i in ranked[:r]]
        assert dst[b].tolist() == [int(match[b, i]) + (0 if b_first else Na - r) for i in ranked[:r]]
    assert reference.rank_plan(score, None, r, a_idx, b_idx, b_first=b_first)[2] is None  # no match: no dst


def test_reference_merged_norms_without_special_rows_take_the_largest_member_norm():
    from vitcompress.kernels import reference
    g = torch.Generator().manual_seed(14)
    x, size = torch.randn(2, 8, 4, generator=g), torch.ones(2, 8, 1)
    keep, src = torch.tensor([[0, 2, 4, 6]] * 2), torch.tensor([[1, 3, 5]] * 2)
    dst = torch.tensor([[0, 0, 2], [1, 3, 3]])
    merged = reference.apply_plan(x, size, keep, src, dst)[0]
    out = reference.merged_norms(x, merged, keep, src, dst)
    for b in range(2):
        for j, k in enumerate(keep[b].tolist()):
            members = [k] + [s for s, d in zip(src[b].tolist(), dst[b].tolist()) if d == j]
            if len(members) == 1:
                assert torch.equal(out[b, j], merged[b, j])
            else:
                assert torch.allclose(out[b, j].norm(), max(x[b, m].norm() for m in members), atol=1e-5)


# ---------------------------------------------------------------- QuoTA's CLIP scorer (fourth run)


def test_quota_clip_probabilities_resize_frames_to_the_models_input_without_a_graph():
    """Frames of another size are resized bilinearly (corners not aligned) to the CLIP input, then
    ``softmax(logit_scale * cos)``, computed here; an object with only half of a CLIP interface is a plain scorer."""
    transformers = pytest.importorskip("transformers")
    import torch.nn.functional as F

    from vitcompress.testing import LLAVA_VISION
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(vision_config=dict(LLAVA_VISION), text_config={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 100, "max_position_embeddings": 16}, projection_dim=16)).eval()

    def tokenizer(texts):
        return torch.tensor([[2 + ord(ch) % 90 for ch in t[:7]] + [99] for t in texts])

    def pooled(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    frames = torch.randn(3, 3, 40, 48, generator=torch.Generator().manual_seed(2))
    probs = quota.clip_probabilities(clip, tokenizer, frames, "a red car")
    assert not probs.requires_grad
    with torch.no_grad():
        image = pooled(clip.get_image_features(pixel_values=F.interpolate(frames, size=(32, 32), mode="bilinear",
                                                                          align_corners=False)))
        text = pooled(clip.get_text_features(input_ids=tokenizer(["a red car"])))
        cos = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1)[0]
    torch.testing.assert_close(probs, (clip.logit_scale.exp() * cos).softmax(0), rtol=1e-5, atol=1e-6)

    class HalfClip:
        def get_image_features(self, pixel_values):
            raise AssertionError("not a CLIP model")

        def encode_image(self, frames):
            raise AssertionError("not a CLIP model")

        def __call__(self, frames, question):
            return [0.25] * frames.shape[0]

    assert quota.frame_probabilities(HalfClip(), None, frames, "a red car") == [0.25] * 3


# --------------------------------------------------------------- Focus-DETR's learned scorer (fifth mutation run)


def _bilinear_align_corners(image, H, W):
    """``image[h, w]`` upsampled to ``[H, W]`` with corner pixels aligned, written out: output ``i`` reads
    source row ``i (h - 1) / (H - 1)``, blended between its two neighbours."""
    h, w = image.shape
    out = torch.empty(H, W, dtype=image.dtype)
    for i in range(H):
        y = i * (h - 1) / (H - 1) if H > 1 else 0.0
        y0 = min(int(math.floor(y)), h - 1)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(W):
            x = j * (w - 1) / (W - 1) if W > 1 else 0.0
            x0 = min(int(math.floor(x)), w - 1)
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def _scorer_logits(scorer, tokens, valid=None):
    """The head written out for one image ``tokens[T, dim]``: embed, half local and half replaced by its
    mean over the real tokens (``valid[T]``), then the MLP."""
    z = scorer.embed(tokens)
    local, pooled = z.chunk(2, dim=-1)
    real = pooled if valid is None else pooled[valid]
    mean = real.mean(dim=0, keepdim=True).expand_as(pooled)
    return scorer.mlp(torch.cat([local, mean], dim=-1)).squeeze(-1)


def test_focus_scorer_top_down_modulation_is_the_papers_formula():
    """Two levels: the coarse one scored as it is, the fine one as ``x + x * up(s_coarse) * alpha``,
    ``up`` bilinear with aligned corners (written out here), with a non-zero alpha. The modulation scales
    each token by ``1 + alpha up``, which the head's LayerNorm cancels up to its sign and the norm's eps
    (as in the official head): the fine features are small (std 1e-4, eps 1e-5) so that the scale shows."""
    torch.manual_seed(0)
    scorer = focus_detr.FocusScorer(dim=8, hidden=8, num_levels=2).eval()
    with torch.no_grad():
        scorer.alpha.fill_(0.7)
        scorer.mlp[-1].weight.mul_(100)  # coarse scores that vary, so the upsampling's grid shows
        fine, coarse = 1e-4 * torch.randn(1, 8, 5, 7), torch.randn(1, 8, 3, 4)
        got = focus_detr.foreground_logits(scorer, [fine, coarse])
        s_coarse = _scorer_logits(scorer, coarse[0].flatten(1).t()).reshape(3, 4)
        up = _bilinear_align_corners(s_coarse, 5, 7)
        modulated = fine[0] + fine[0] * up * 0.7
        s_fine = _scorer_logits(scorer, modulated.flatten(1).t()).reshape(5, 7)
    torch.testing.assert_close(got[1][0], s_coarse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0][0], s_fine, rtol=1e-5, atol=1e-6)


def test_focus_scorer_pools_over_the_real_tokens_of_each_level():
    """With padding masks the pooled half is the mean over the real tokens only (one real token: its own
    features), so the real tokens' logits equal the head run on the unpadded image."""
    torch.manual_seed(1)
    scorer = focus_detr.FocusScorer(dim=8, hidden=8, num_levels=1).eval()
    x = torch.randn(2, 8, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, :2, :3] = True  # 6 real tokens
    mask[1, 0, 0] = True  # a single real token
    with torch.no_grad():
        (got,) = focus_detr.foreground_logits(scorer, [x], [mask])
        for b in range(2):
            valid = mask[b].flatten()
            want = _scorer_logits(scorer, x[b].flatten(1).t(), valid)
            torch.testing.assert_close(got[b].flatten()[valid], want[valid], rtol=1e-5, atol=1e-6)


def test_focus_scorer_file_must_hold_config_and_weights_only(tmp_path):
    """load_scorer refuses a dict missing 'config' and, loading with weights_only, a file holding any
    pickled object beyond tensors and plain containers."""
    scorer = focus_detr.FocusScorer(dim=8, hidden=8)
    missing = tmp_path / "missing.pt"
    torch.save({"state_dict": scorer.state_dict()}, missing)
    with pytest.raises(ValueError, match="is not a Focus-DETR scorer file"):
        focus_detr.load_scorer(str(missing))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"config": dict(scorer.config), "state_dict": scorer.state_dict(), "meta": {"obj": _Pickled()}}, unsafe)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        focus_detr.load_scorer(str(unsafe))


class _Pickled:
    """An arbitrary object: a weights-only load refuses to unpickle it."""


# --------------------------------------------------------------- tokencorr's crops and cells (fifth mutation run)


def test_tokencorr_pool_to_cells_concatenates_keys_and_sums_attention_per_token():
    """InternVL's tokens of G patches: a token's key is its patches' keys concatenated in the cell's
    order, its deep and shallow [CLS] attention their sums (M = 8 tokens of G = 2 patches, batch 2)."""
    g = torch.Generator().manual_seed(0)
    keys, deep, shallow = torch.randn(2, 16, 3, generator=g), torch.rand(2, 16, generator=g), torch.rand(2, 16, generator=g)
    cells = torch.randperm(16, generator=g).reshape(8, 2)
    got_keys, got_deep, got_shallow = tokencorr.pool_to_cells(cells, keys, deep, shallow)
    assert got_keys.shape == (2, 8, 6) and got_deep.shape == got_shallow.shape == (2, 8)
    for b in range(2):
        for m, patches in enumerate(cells.tolist()):
            assert torch.equal(got_keys[b, m], torch.cat([keys[b, p] for p in patches]))
            assert torch.isclose(got_deep[b, m], deep[b, patches].sum())
            assert torch.isclose(got_shallow[b, m], shallow[b, patches].sum())


def test_tokencorr_reduce_crops_keeps_cls_and_every_patch_when_none_is_redundant():
    """tau above every cosine: no patch is redundant, so each crop keeps all of its patches -- patch 0 of
    crop 0 included -- and the [CLS] entry (-2) stays: the features come back unchanged."""
    g = torch.Generator().manual_seed(1)
    N = 9
    layout = torch.cat([torch.tensor([-2]), torch.arange(2 * N)])
    features = torch.randn(layout.numel(), 5, generator=g)
    keys, deep, shallow = torch.randn(2, N, 4, generator=g), torch.rand(2, N, generator=g), torch.rand(2, N, generator=g)
    out, report = tokencorr.reduce_crops(features, layout, keys, deep, shallow, tau=1.5, c=0, merge=True,
                                         generator_of=lambda crop: torch.Generator().manual_seed(crop))
    assert torch.equal(out, features)
    assert report["cls_tokens"] == 1 and [sorted(c["kept"]) for c in report["crops"]] == [list(range(N))] * 2


def test_tokencorr_merges_each_dropped_patch_into_its_most_similar_kept_one():
    """Each dropped patch's destination is the kept patch of highest cosine similarity of the keys,
    computed here patch by patch."""
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(12, 6, generator=g)
    keys[6:9] = keys[:3] + 0.05 * torch.randn(3, 6, generator=g)  # three near pairs: 6 redundant patches
    keys = keys * torch.logspace(-1, 1, 12)[torch.randperm(12, generator=g), None]  # norms 0.1..10: cosine ignores them
    deep, shallow = torch.rand(12, generator=g), torch.rand(12, generator=g)
    plan, budget = tokencorr.tokencorr_plan(keys, deep, shallow, tau=0.9, c=0, merge=True,
                                            generator=torch.Generator().manual_seed(0))
    kept = plan.keep[0].tolist()
    assert 0 < budget < 12 and plan.merges
    cos = torch.nn.functional.cosine_similarity
    for src, dst in zip(plan.merge_src[0].tolist(), plan.merge_dst[0].tolist()):
        sims = [float(cos(keys[src], keys[k], dim=0)) for k in kept]
        assert dst == max(range(len(kept)), key=lambda i: sims[i])


def test_focus_detr_descriptor_states_its_defaults_help_and_keep():
    """describe('focus_detr'): dual attention on 300 tokens per layer as the docs state, a help line for
    every option, and what keep= means (rho); a path given with a non-learned scorer is named in the error."""
    info = vitcompress.describe("focus_detr")
    assert info["options"]["dual_k"]["default"] == 300 and info["options"]["scorer"]["default"] == "norm"
    assert all(isinstance(o["help"], str) and o["help"] for o in info["options"].values())
    assert isinstance(info["keep_means"], str) and "rho" in info["keep_means"]
    spec = focus_detr.FocusDETR()
    options = dict(spec.defaults, scorer_module=focus_detr.FocusScorer(dim=8, hidden=8))
    with pytest.raises(ValueError, match="focus_detr got scorer_module= with scorer='norm'"):
        spec.validate(options)


# --------------------------------------------------------------- MLERP with prefix tokens, mctf's bounds (sixth run)


def test_mlerp_keeps_the_prefix_and_rescales_the_body_as_without_it():
    """merged_norms with a class token: the prefix row is returned as it is and the body equals the
    same plan applied without the prefix (the plan's indices count the reducible tokens only)."""
    from vitcompress.kernels import reference
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1 + 6, 4, generator=g)
    keep = torch.tensor([[0, 2, 4], [1, 3, 5]])
    src, dst = torch.tensor([[1, 3, 5], [0, 2, 4]]), torch.tensor([[0, 1, 2], [2, 0, 1]])
    merged = torch.randn(2, 1 + 3, 4, generator=g)
    with_prefix = reference.merged_norms(x, merged, keep, src, dst, num_prefix=1)
    without = reference.merged_norms(x[:, 1:], merged[:, 1:], keep, src, dst)
    assert torch.equal(with_prefix[:, :1], merged[:, :1]) and torch.equal(with_prefix[:, 1:], without)


def test_mctf_bounds_and_overhead_are_whole_token_counts():
    """max_remove floors half of an odd count; without the similarity criterion (tau_sim=0) the
    overhead is the fusion weights' scatter alone, one per removed token."""
    spec = vitcompress.methods.get("mctf")
    options = dict(spec.defaults)
    assert spec.max_remove(101, 0, 12, options) == 50 and isinstance(spec.max_remove(101, 0, 12, options), int)
    assert spec.overhead_flops(101, 1, 7, 6, 64, 0, 12, dict(options, tau_sim=0)) == 7


def test_pagerank_initial_scores_weight_only_a_real_class_token_by_the_alive_count():
    """Zero-TPrune's "sqrt" start: the class token (a prefix) starts at sqrt(n) times a patch, n the
    alive tokens of its row; without a prefix every alive token starts equal; dead tokens start at 0."""
    from vitcompress.kernels import reference
    alive = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    s = reference.initial_scores(5, 1, "sqrt", alive=alive)
    for row, a in zip(s, alive):
        n = float(a.sum())
        want = a.clone()
        want[0] *= math.sqrt(n)
        torch.testing.assert_close(row, want / want.sum())
    plain = reference.initial_scores(5, 0, "sqrt", alive=alive)
    torch.testing.assert_close(plain, alive / alive.sum(dim=-1, keepdim=True))


# ------------------------------------------- focus_detr options, QuoTA's CLIP inputs, tokencorr crops (eighth run)


@pytest.mark.parametrize("cascade", [["0.5"], [1.0, True], [None]])
def test_focus_detr_cascade_of_strings_bools_or_none_is_refused_by_type(cascade):
    """A cascade entry that is no number (a string, None) or a bool is refused with the type error that names it."""
    spec = focus_detr.FocusDETR()
    with pytest.raises(TypeError, match="must be a sequence of numbers"):
        spec.validate(dict(spec.defaults, cascade=cascade))


@pytest.mark.parametrize("cascade", [[1.0, 0.0], [1.5, 1.0], [0.5, 1.0], [1.0, 0.5, 0.6], [1.0, 1.0, 0.5, 0.4, 0.45]])
def test_focus_detr_cascade_outside_0_1_or_rising_anywhere_is_refused(cascade):
    """Ratios must lie in (0, 1] (0.0 and 1.5 refused) and never rise, also between neighbours only:
    [1.0, 0.5, 0.6] rises from 0.5 to 0.6 though 1.0 -> 0.6, two apart, does not; an in-range rise is refused."""
    spec = focus_detr.FocusDETR()
    with pytest.raises(ValueError, match=r"must be non-increasing ratios in \(0, 1\]"):
        spec.validate(dict(spec.defaults, cascade=cascade))
    spec.validate(dict(spec.defaults, cascade=[1.0, 1.0, 0.5, 0.5, 0.25]))


def test_focus_detr_scorer_path_loads_that_head_and_scores_tokens_plus_position_embeddings(tmp_path):
    """scorer_path= loads the saved head (its weights, not a default one), and the learned scores are that
    head applied to ``x + pos`` (DETR's sine position embeddings, nonzero), written out here."""
    pytest.importorskip("transformers")
    from vitcompress.adapters.detr import encoder_inputs, encoder_position_embeddings
    from vitcompress.interfaces import runtime_of
    from vitcompress.testing import random_scorer_head, tiny_detr
    head = random_scorer_head(seed=3)
    path = tmp_path / "head.pt"
    focus_detr.save_scorer(head, str(path))
    model = tiny_detr()
    vitcompress.compress(model, "focus_detr", scorer="learned", scorer_path=str(path))
    rt = runtime_of(model)
    assert all(torch.equal(p, q) for p, q in zip(rt.prepared.state_dict().values(), head.state_dict().values()))
    inputs = encoder_inputs(model, torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0)))
    x, pos = inputs["inputs_embeds"], encoder_position_embeddings(inputs)
    assert pos.abs().amax() > 0.5
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        rank, foreground = rt.method.token_scores(rt.options, rt.prepared, x, pos, valid, None)
        want = torch.stack([_scorer_logits(head, x[b] + pos[b]) for b in range(2)])
    torch.testing.assert_close(rank, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(foreground, want.sigmoid(), rtol=1e-5, atol=1e-5)


class _OpenClipStub(torch.nn.Module):
    """An open_clip-like model in float64 (encode_image / encode_text, visual.image_size) that records its frames."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.words = torch.nn.Parameter(torch.randn(100, 4, generator=g, dtype=torch.float64))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
        self.visual = type("Visual", (), {"image_size": (6, 5)})()
        self.seen = []

    def encode_image(self, frames):
        self.seen.append(frames)
        return frames.mean(dim=(-2, -1)) @ self.proj

    def encode_text(self, ids):
        return self.words[ids].mean(dim=1)


def _char_ids(texts):
    return torch.tensor([[2 + ord(ch) % 90 for ch in t[:7]] + [99] for t in texts])


def _stub_probabilities(model, frames, question):
    with torch.no_grad():
        image = model.encode_image(frames)
        text = model.encode_text(_char_ids([question]))
        cos = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1)[0]
        return (model.logit_scale.exp() * cos).softmax(0)


def test_quota_clip_probabilities_take_frames_of_the_input_size_as_they_are():
    """Frames already at the model's input size reach it unresized and uncast beyond the model's dtype:
    float64 frames stay float64 exactly (not rounded through float32 by a resize)."""
    model = _OpenClipStub()
    frames = torch.rand(3, 3, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 3
    probs = quota.clip_probabilities(model, _char_ids, frames, "a red car")
    assert torch.equal(model.seen[0], frames)
    torch.testing.assert_close(probs, _stub_probabilities(_OpenClipStub(), frames, "a red car").float())


def test_quota_clip_probabilities_with_a_plain_tokenizer_when_transformers_is_missing(monkeypatch):
    """Without transformers importable, a tokenizer is called as open_clip's is (texts only, no HF padding or
    truncation arguments), and the probabilities are still the formula."""
    import sys
    monkeypatch.setitem(sys.modules, "transformers", None)
    model = _OpenClipStub()
    frames = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    probs = quota.clip_probabilities(model, _char_ids, frames, "a blue boat")
    torch.testing.assert_close(probs, _stub_probabilities(_OpenClipStub(), frames, "a blue boat").float())


def test_quota_clip_probabilities_truncate_a_question_longer_than_the_text_tower():
    """A Hugging Face tokenizer truncates a 30-word question to its 16 tokens (the text tower's positions),
    so scoring it does not fail; the probabilities are those of the first 16 tokens, computed here."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vitcompress.testing import LLAVA_VISION
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(vision_config=dict(LLAVA_VISION), text_config={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 100, "max_position_embeddings": 16}, projection_dim=16)).eval()
    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 100)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>",
                                                     model_max_length=16)
    question = " ".join(f"w{2 + 3 * i}" for i in range(30))
    frames = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    probs = quota.clip_probabilities(clip, tokenizer, frames, question)
    ids = torch.tensor([[2 + 3 * i for i in range(16)]])

    def pooled(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        image = pooled(clip.get_image_features(pixel_values=frames))
        text = pooled(clip.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids)))
        cos = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1)[0]
    torch.testing.assert_close(probs, (clip.logit_scale.exp() * cos).softmax(0), rtol=1e-5, atol=1e-6)


def test_tokencorr_reduce_crops_skips_a_crop_without_patches_and_reduces_a_one_patch_crop():
    """Crop 0 has no patch in the layout (skipped, not reported), crop 1 a single patch (reduced: kept), crop 2
    four: the crops after the empty one are still reduced and every patch and the [CLS] entry stay."""
    g = torch.Generator().manual_seed(4)
    N = 4
    layout = torch.tensor([-2, 1 * N + 2, 2 * N + 0, 2 * N + 1, 2 * N + 2, 2 * N + 3])
    features = torch.randn(layout.numel(), 5, generator=g)
    keys = torch.randn(3, N, 4, generator=g)
    deep, shallow = torch.rand(3, N, generator=g), torch.rand(3, N, generator=g)
    out, report = tokencorr.reduce_crops(features, layout, keys, deep, shallow, tau=1.5, c=0, merge=False,
                                         generator_of=lambda crop: torch.Generator().manual_seed(crop))
    assert torch.equal(out, features)
    crops = [(c["crop"], c["patches"], sorted(c["kept"])) for c in report["crops"]]
    assert crops == [(1, 1, [2]), (2, 4, [0, 1, 2, 3])]


def test_focus_detr_learned_scorer_moves_its_head_to_the_tokens_device():
    """The head is no submodule of the detector, so token_scores moves it to the tokens' device; shown on
    CPU with tokens on the meta device (shapes only): the head follows them, the scores are [B, N] there."""
    spec = focus_detr.FocusDETR()
    head = focus_detr.FocusScorer(dim=8, hidden=8)
    options = dict(spec.defaults, scorer="learned", scorer_module=head)
    x, pos = torch.empty(2, 5, 8, device="meta"), torch.empty(2, 5, 8, device="meta")
    valid = torch.ones(2, 5, dtype=torch.bool, device="meta")
    rank, foreground = spec.token_scores(options, head, x, pos, valid, None)
    assert all(p.device.type == "meta" for p in head.parameters())
    assert rank.device.type == foreground.device.type == "meta" and rank.shape == foreground.shape == (2, 5)


# --------------------------------------------------------------- QuoTA's checks, tokencorr's newlines, descriptors (ninth run)


def test_quota_frame_probabilities_accept_0_and_1_and_refuse_the_rest_naming_the_frame_count():
    """A scorer's yes-probabilities must be one finite number in [0, 1] per frame: exactly 0 and 1 pass;
    1.5, a negative value alone and a NaN alone are refused; a wrong count names the frames it was given."""
    frames = torch.zeros(3, 3, 4, 4)
    assert quota.frame_probabilities(lambda f, q: [0.0, 1.0, 0.5], None, frames, "q") == [0.0, 1.0, 0.5]
    for bad in ([0.0, 1.5, 0.5], [0.0, -0.5, 0.5], [0.0, float("nan"), 0.5]):
        with pytest.raises(ValueError, match="must lie in"):
            quota.frame_probabilities(lambda f, q, bad=bad: bad, None, frames, "q")
    with pytest.raises(ValueError, match="returned 2 values for 4 frames"):  # of 3 channels
        quota.frame_probabilities(lambda f, q: [0.5, 0.5], None, torch.zeros(4, 3, 4, 4), "q")


def test_quota_refuses_a_scorer_neither_callable_nor_clip_and_accepts_a_clip_model_as_is():
    """validate: a non-callable, non-CLIP scorer is a TypeError; an object with the CLIP interface is a CLIP
    scorer even when it is not callable itself (it then needs a tokenizer, and a plain callable must not get one)."""
    spec = quota.QuoTA()
    with pytest.raises(TypeError, match="scorer=int"):
        spec.validate({"scorer": 3, "tokenizer": None})

    class ClipInterface:  # not callable: scored through get_image_features / get_text_features
        def get_image_features(self, pixel_values):
            raise AssertionError("not called by validate")

        def get_text_features(self, input_ids):
            raise AssertionError("not called by validate")

    spec.validate({"scorer": ClipInterface(), "tokenizer": _char_ids})
    with pytest.raises(ValueError, match="needs tokenizer"):
        spec.validate({"scorer": ClipInterface(), "tokenizer": None})


@pytest.mark.parametrize("method", sorted(vitcompress.methods.REGISTRY))
def test_describe_gives_the_kind_dynamic_and_option_help_each_method_page_states(method):
    """Each method page says what ``vitcompress.describe`` lists: target, prune or merge, and (where it says so)
    content-dependent or static token counts; every option has a help text, the one in the page's table."""
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "methods", f"{method}.md"), encoding="utf-8") as page:
        text = page.read()
    stated = re.search(r"lists them \(target `(\w+)`, kind `(\w+)`(, (content-dependent|static) token counts)?;", text)
    assert stated, method
    described = vitcompress.describe(method)
    assert (described["target"], described["kind"]) == stated.group(1, 2)
    if stated.group(4):
        assert described["dynamic"] is (stated.group(4) == "content-dependent")
    for name, option in described["options"].items():
        assert isinstance(option["help"], str) and option["help"], (method, name)


def _newline_case(monkeypatch, layout, crops, N, kept):
    """reduce_crops on ``layout`` with each crop's plan keeping the patches ``kept[crop]`` (tokencorr_plan
    replaced: the newline rule alone is under test) -> (output, report, the newline rule computed here)."""
    from vitcompress.interfaces import Plan

    def plan_of(keys, deep, shallow, **_):  # keys[p] = (crop, patch)
        crop, patches = int(keys[0, 0]), keys[:, 1].long().tolist()
        keep = torch.tensor([i for i, p in enumerate(patches) if p in kept[crop]], dtype=torch.long)
        return Plan(keep=keep[None]), keep.numel()

    monkeypatch.setattr(tokencorr, "tokencorr_plan", plan_of)
    keys = torch.stack([torch.stack([torch.full((N,), float(c)), torch.arange(N, dtype=torch.float)], dim=1)
                        for c in range(crops)])
    features = torch.randn(layout.numel(), 3, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(crops, N)
    out, report = tokencorr.reduce_crops(features, layout, keys, ones, ones, tau=0.9, c=4, merge=False,
                                         generator_of=lambda crop: None)
    values = layout.tolist()
    token_kept = [v == -2 or (v >= 0 and v % N in kept[v // N]) for v in values]
    want, row_start = list(token_kept), 0
    for i, v in enumerate(values):
        if v == -1:  # the newline of the row values[row_start:i]: kept iff a grid-crop token of it is
            want[i] = any(token_kept[j] and values[j] >= 0 and (crops == 1 or values[j] >= N)
                          for j in range(row_start, i))
            row_start = i + 1
    return out, report, features[torch.tensor(want)], want


@pytest.mark.parametrize("kept, newlines", [
    ({0: {0, 1, 2, 3}, 1: {0}}, [True, False, False]),  # row 0: only the first grid patch (layout == N)
    ({0: {0, 1, 2, 3}, 1: {2, 5}}, [False, True, True]),  # base crop kept, no grid token of row 0; one per row
])
def test_tokencorr_anyres_newline_stays_iff_a_grid_token_of_its_row_does(monkeypatch, kept, newlines):
    """A LLaVA-NeXT image of a base crop (no newlines) and one grid crop of 3 rows of 2 patches, each row ended
    by a newline (-1): a newline stays exactly when a grid token of its row is kept (one is enough)."""
    N = 6
    layout = torch.tensor([0, 1, 2, 3, N + 0, N + 1, -1, N + 2, N + 3, -1, N + 4, N + 5, -1])
    out, report, want_out, want = _newline_case(monkeypatch, layout, 2, N, kept)
    assert [w for w, v in zip(want, layout.tolist()) if v == -1] == newlines
    assert report["newline_tokens"] == sum(newlines) and torch.equal(out, want_out)


def test_tokencorr_one_crop_image_with_newlines_counts_its_own_tokens_for_its_rows(monkeypatch):
    """A one-crop layout with newlines (crop 0 is then no base crop): row 0 keeps one token, so its newline
    stays; row 1 keeps none, so its newline goes."""
    N = 4
    layout = torch.tensor([0, 1, -1, 2, 3, -1])
    out, report, want_out, want = _newline_case(monkeypatch, layout, 1, N, {0: {1}})
    assert want == [False, True, True, False, False, False]
    assert report["newline_tokens"] == 1 and torch.equal(out, want_out)


# --------------------------------------------------------------- tokencorr's report, defaults and checks (tenth run)


def test_tokencorr_merge_report_pairs_each_dropped_patch_with_the_kept_patch_it_folds_into():
    """With merge=True each crop's report lists ``merged``: [dropped patch, kept patch] (grid indices, not packed
    positions; the layout here is permuted), every dropped patch once, into its most similar kept one (cosine)."""
    g = torch.Generator().manual_seed(2)
    N = 12
    keys = torch.randn(N, 6, generator=g)
    keys[6:9] = keys[:3] + 0.05 * torch.randn(3, 6, generator=g)  # three near pairs: 6 redundant patches
    deep, shallow = torch.rand(1, N, generator=g), torch.rand(1, N, generator=g)
    layout = torch.cat([torch.tensor([-2]), torch.randperm(N, generator=g)])
    features = torch.randn(layout.numel(), 5, generator=g)
    _, report = tokencorr.reduce_crops(features, layout, keys[None], deep, shallow, tau=0.9, c=0, merge=True,
                                       generator_of=lambda crop: torch.Generator().manual_seed(crop))
    crop = report["crops"][0]
    kept, merged = crop["kept"], crop["merged"]
    assert 0 < len(kept) < N and isinstance(merged, list)
    assert sorted(src for src, _ in merged) == sorted(set(range(N)) - set(kept))
    unit = torch.nn.functional.normalize(keys, dim=-1)
    for src, dst in merged:
        assert dst == kept[int((unit[src] @ unit[kept].T).argmax())], (src, dst)


def test_tokencorr_one_crop_newline_stays_when_only_patch_0_of_its_row_is_kept(monkeypatch):
    """Patch 0 of a one-crop image with newlines is a grid token of row 0: kept alone, it keeps row 0's newline."""
    layout = torch.tensor([0, 1, -1, 2, 3, -1])
    out, report, want_out, want = _newline_case(monkeypatch, layout, 1, 4, {0: {0}})
    assert want == [True, False, True, False, False, False]
    assert report["newline_tokens"] == 1 and torch.equal(out, want_out)


def test_tokencorr_defaults_are_the_documented_layers_no_merge_and_seed_0():
    """docs/methods/tokencorr.md: keys and deep [CLS] attention from the tower's second-to-last layer (-2, the one
    LLaVA feeds its LM) and from the last (-1) on InternVL; shallow a quarter of the depth; no merging; seed 0."""
    from vitcompress.api import resolve_options
    spec = tokencorr.TokenCorr()
    assert spec.defaults == {"tau": 0.9, "c": 4, "key_layer": -2, "deep_layer": -2, "shallow_layer": None,
                             "merge": False, "seed": 0, "min_tokens": 1}
    for variant, layer in ((None, 22), ("next", 22), ("internvl", 23)):
        own, _ = resolve_options(spec, {}, variant)
        assert own["merge"] is False and own["seed"] == 0, variant
        assert spec.tower_layers(own, 24) == (layer, layer, 6), variant  # CLIP ViT-L/14's 24 layers
    assert torch.equal(torch.randint(99, (8,), generator=spec.generator(own, "cpu", 1)),
                       torch.randint(99, (8,), generator=torch.Generator().manual_seed(1)))  # seed 0 + crop 1


def test_tokencorr_validate_takes_the_bounds_inclusive_and_refuses_bools_and_wrong_types():
    """tau in [-1, 1] (ends included), c an int >= 0, each layer an int or None, seed an int or None; a bool is
    no number for any of them."""
    spec = tokencorr.TokenCorr()

    def check(**options):
        spec.validate(dict(spec.defaults, **options))

    for ok in ({"tau": -1.0}, {"tau": 1.0}, {"tau": 0}, {"c": 0}, {"seed": None}, {"seed": 7},
               {"key_layer": None, "deep_layer": 3, "shallow_layer": -1}):
        check(**ok)
    for bad, error in [({"tau": -1.5}, ValueError), ({"tau": 1.5}, ValueError), ({"tau": True}, ValueError),
                       ({"tau": "0.9"}, ValueError), ({"c": -1}, ValueError), ({"c": True}, ValueError),
                       ({"c": 2.5}, ValueError), ({"seed": True}, TypeError), ({"seed": 1.5}, TypeError)]:
        with pytest.raises(error, match=f"{next(iter(bad))}="):
            check(**bad)
    for name in ("key_layer", "deep_layer", "shallow_layer"):
        for bad in (True, 1.5, "2"):
            with pytest.raises(TypeError, match=f"{name}="):
                check(**{name: bad})


def test_zero_tprune_head_filter_keeps_heads_on_either_bound_of_the_variance_range():
    """The head filter keeps heads whose variance lies in the closed range [var_min, var_max]: a head
    exactly on either bound stays (the bounds taken from the heads' own variances, so they are exact)."""
    from vitcompress.kernels.reference import head_mask, head_variance

    g = torch.Generator().manual_seed(0)
    scores = torch.softmax(torch.randn(1, 3, 20, generator=g) * torch.tensor([0.5, 1.0, 2.0])[:, None], dim=-1)
    var = head_variance(scores)[0]
    assert var[0] < var[1] < var[2]
    assert head_mask(scores, var[0].item(), var[1].item()).tolist() == [[True, True, False]]
    assert head_mask(scores, var[1].item(), var[2].item()).tolist() == [[False, True, True]]


def test_pagerank_scores_start_from_the_class_token_sqrt_n_by_default():
    """Zero-TPrune's importance starts, by default, with the class token ``sqrt(n)``-fold (``cls_sqrt=True``),
    which changes the scores against a uniform start."""
    from vitcompress.kernels.reference import pagerank_scores

    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(2, 3, 9, 9, generator=g), dim=-1)
    default = pagerank_scores(attn, 2, 1)
    torch.testing.assert_close(default, pagerank_scores(attn, 2, 1, cls_sqrt=True), rtol=0, atol=0)
    assert not torch.allclose(default, pagerank_scores(attn, 2, 1, cls_sqrt=False))


def test_tokencorr_layers_take_every_index_of_the_tower_and_min_tokens_an_int():
    """Layer options index a tower of ``depth`` layers from ``-depth`` to ``depth - 1`` (both ends
    taken, the refusal names that range); ``min_tokens`` must be an int >= 0, not a bool or a float."""
    from vitcompress.methods import get

    spec = get("tokencorr")
    options = dict(spec.defaults, key_layer=-24, deep_layer=23)
    assert spec.tower_layers(options, 24) == (0, 23, 6)
    with pytest.raises(ValueError, match=r"deep_layer=24 is outside the vision tower's 24 encoder layers "
                                         r"\(use -24 \.\. 23\)"):
        spec.tower_layers(dict(options, deep_layer=24), 24)
    with pytest.raises(ValueError, match=r"key_layer=-25 .*\(use -24 \.\. 23\)"):
        spec.tower_layers(dict(options, key_layer=-25), 24)
    spec.validate(dict(spec.defaults, min_tokens=0))
    for bad in (True, 1.5, -1):
        with pytest.raises(ValueError, match="min_tokens="):
            spec.validate(dict(spec.defaults, min_tokens=bad))


def test_tokencorr_the_third_image_of_a_batch_is_reduced_from_its_own_crop():
    """Three LLaVA-1.5 images in one call each keep what they keep alone (the crop offset adds up)."""
    from vitcompress.testing import LLAVA_IMAGE_TOKEN, LLAVA_PATCHES, tiny_llava

    model = tiny_llava("llava")
    g = torch.Generator().manual_seed(4)
    pixels = torch.full((3, 3, 32, 32), 0.4)  # flat above, noise below a different row in each: partial budgets
    for b, row in enumerate((16, 24, 8)):
        pixels[b, :, row:] = torch.randn(3, 32 - row, 32, generator=g)
    ids = torch.tensor([[1, 5] + [LLAVA_IMAGE_TOKEN] * LLAVA_PATCHES + [7]] * 3)
    vitcompress.compress(model, "tokencorr")
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixels)
            batch = [u["crops"][0]["kept"] for u in vitcompress.stats(model)["image"]]
            alone = []
            for b in range(3):
                model(input_ids=ids[b:b + 1], pixel_values=pixels[b:b + 1])
                alone.append(vitcompress.stats(model)["image"][0]["crops"][0]["kept"])
    finally:
        vitcompress.restore(model)
    assert len({str(k) for k in alone}) == 3 and batch == alone


def test_focus_detr_dual_k_must_be_an_int():
    """dual_k counts tokens: an int >= 0 (0 turns dual attention off); a bool or a float is refused."""
    from vitcompress.methods import get

    spec = get("focus_detr")
    spec.validate(dict(spec.defaults, dual_k=0))
    for bad in (True, 1.5, -1):
        with pytest.raises(ValueError, match="dual_k="):
            spec.validate(dict(spec.defaults, dual_k=bad))
