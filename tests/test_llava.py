"""LLaVA adapter, tokencorr and QuoTA on tiny random LLaVA / NeXT / NeXT-Video / OneVision models."""
import copy
import io
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vitcompress
from test_threads import CALLS, THREADS
from vitcompress.interfaces import runtime_of
from vitcompress.methods import quota, tokencorr
from vitcompress.runtimes.prompt import rewrite_prompt
from vitcompress.testing import (LLAVA_CASES, LLAVA_IMAGE_TOKEN, LLAVA_PATCHES, LLAVA_TEXT, LLAVA_VIDEO_TOKEN,
                                 LLAVA_VISION, half_flat, llava_inputs, ramp_scorer, tiny_llava)

@pytest.fixture(scope="module")
def models():
    return {kind: tiny_llava(kind) for kind in ("llava", "next", "next_video", "onevision")}


class LMInput:
    """Records the input_ids the inner LLaVA model (which scatters the visual tokens) receives."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        def hook(module, args, kwargs):
            self.calls.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).clone())
        self.handle = self.model.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def reported_tokens(stats, modality):
    """Visual tokens the method says it hands on, from its own report (budget, grids, specials)."""
    total = 0
    for unit in stats.get(modality, []):
        if "crops" in unit:  # tokencorr: the per-crop budgets, plus the newlines of the rows kept and CLS
            total += unit["budget"] + unit["newline_tokens"] + unit["cls_tokens"]
        elif "frame_tokens" in unit:  # QuoTA: each frame's resized grid, plus the model's extra tokens
            total += sum(unit["frame_tokens"][i] for i in unit["frames"]) + unit["extra_tokens"]
        else:  # a modality the method passes through unchanged, or a ViT method (reported by the tower)
            total += unit["tokens_after"]
    return total


@pytest.mark.parametrize("kind,method,opts", LLAVA_CASES, ids=[f"{k}-{m}" for k, m, _ in LLAVA_CASES])
def test_forward_and_generate_with_reported_token_counts(models, kind, method, opts):
    model = models[kind]
    inputs = llava_inputs(model, kind)
    vitcompress.compress(model, method, **opts)
    try:
        with torch.no_grad(), LMInput(model) as seen:
            logits = model(**inputs, question="what is shown?").logits
        stats = vitcompress.stats(model)
        with LMInput(model) as gen_seen:
            out = model.generate(**inputs, question="what is shown?", max_new_tokens=4, do_sample=False)
        no_cache = model.generate(**inputs, question="what is shown?", max_new_tokens=4, do_sample=False,
                                  use_cache=False)
    finally:
        vitcompress.restore(model)
    if method not in ("tome", "pitome", "zero_tprune"):  # a modality the method does not reduce is untouched
        for unit in stats.get("image", []) + stats.get("video", []):
            if "crops" not in unit and "frame_tokens" not in unit:
                assert unit["tokens_before"] == unit["tokens_after"]
    lm_image = int((seen.calls[0] == LLAVA_IMAGE_TOKEN).sum())
    lm_video = int((seen.calls[0] == LLAVA_VIDEO_TOKEN).sum())
    before = int((inputs["input_ids"] == LLAVA_IMAGE_TOKEN).sum()) + int((inputs["input_ids"] == LLAVA_VIDEO_TOKEN).sum())
    assert lm_image == reported_tokens(stats, "image") and lm_video == reported_tokens(stats, "video")
    assert lm_image + lm_video == stats["visual_tokens_after"] < before == stats["visual_tokens_before"]
    if method in ("tome", "pitome", "zero_tprune"):  # the tower's planned output of the feature layer, minus CLS
        depth = LLAVA_VISION["num_hidden_layers"]
        assert lm_image == 2 * (stats["tower"]["planned_tokens_per_layer"][depth - 1] - 1)
    assert logits.shape[1] == seen.calls[0].shape[1]
    # generate: the caller's prompt, then new tokens; prefill saw the same rewritten prompt as forward,
    # the first token is forward's argmax, and the KV cache changes nothing.
    assert torch.equal(gen_seen.calls[0], seen.calls[0])
    assert all(c.shape[1] == 1 for c in gen_seen.calls[1:]) and len(gen_seen.calls) == 4
    assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert torch.equal(out[:, inputs["input_ids"].shape[1]], logits[:, -1].argmax(-1))
    assert torch.equal(out, no_cache)


def row_alone(inputs, b):
    """Row ``b`` of a left-padded batch as a batch of one, without its padding."""
    keep = inputs["attention_mask"][b] == 1
    one = {k: v[b:b + 1] for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return dict(one, input_ids=inputs["input_ids"][b][keep][None])


def test_full_feature_strategy_counts_the_kept_cls():
    """With vision_feature_select_strategy="full" the tower's CLS reaches the LM too: it is kept
    and reported."""
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(**LLAVA_VISION), text_config=LlamaConfig(**LLAVA_TEXT),
        image_token_index=LLAVA_IMAGE_TOKEN, vision_feature_select_strategy="full")).eval()
    px = half_flat((3, 32, 32))
    inputs = dict(input_ids=torch.tensor([[1, 5] + [LLAVA_IMAGE_TOKEN] * (LLAVA_PATCHES + 1) + [7]] * 2),
                  pixel_values=px)
    vitcompress.compress(model, "tokencorr")
    with torch.no_grad(), LMInput(model) as seen:
        model(**inputs)
    stats = vitcompress.stats(model)
    assert [u["cls_tokens"] for u in stats["image"]] == [1, 1]
    lm_image = int((seen.calls[0] == LLAVA_IMAGE_TOKEN).sum())
    assert lm_image == reported_tokens(stats, "image") == stats["visual_tokens_after"]


def test_padded_batch_rows_match_rows_alone(models):
    """Rows reduced to different lengths are padded; masks and positions keep each row exact."""
    model = models["llava"]
    inputs = llava_inputs(model, "llava")
    vitcompress.compress(model, "tokencorr")
    try:
        with torch.no_grad():
            batch = model(**inputs).logits[:, -1]
            lengths = [u["tokens_after"] for u in vitcompress.stats(model)["image"]]
            alone = [model(**row_alone(inputs, b)).logits[0, -1] for b in range(2)]
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        gen_alone = [model.generate(**row_alone(inputs, b), max_new_tokens=3, do_sample=False) for b in range(2)]
    finally:
        vitcompress.restore(model)
    assert lengths[0] != lengths[1]  # the rows really were padded to different extents
    torch.testing.assert_close(batch, torch.stack(alone), atol=1e-5, rtol=1e-5)
    for b in range(2):
        assert torch.equal(gen[b, -3:], gen_alone[b][0, -3:])


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("kind", ["llava", "next"])
def test_partial_budgets_sample_and_merge_independently_of_the_batch(models, kind, merge):
    """Crops that keep some but not all patches: outliers + sampling (+ merging) pick what the LM
    sees, and an image keeps the same tokens alone, next to another image or next to itself."""
    model = models[kind]
    inputs = llava_inputs(model, kind, images=half_flat)
    twice = {k: v[[1, 1]] for k, v in inputs.items()}  # the second prompt and image, twice
    vitcompress.compress(model, "tokencorr", merge=merge)
    try:
        with torch.no_grad(), LMInput(model) as seen:
            batch = model(**inputs).logits[:, -1]
            stats = vitcompress.stats(model)
            alone = model(**row_alone(inputs, 1)).logits[0, -1]
            pair = model(**twice).logits[:, -1]
    finally:
        vitcompress.restore(model)
    budgets = [c["budget"] for unit in stats["image"] for c in unit["crops"]]
    patches = [c["patches"] for unit in stats["image"] for c in unit["crops"]]
    assert all(0 < b < n for b, n in zip(budgets, patches)), (budgets, patches)
    assert int((seen.calls[0] == LLAVA_IMAGE_TOKEN).sum()) == reported_tokens(stats, "image")
    for row in (batch[1], pair[0], pair[1]):
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,method,opts", [("llava", "tokencorr", dict(merge=True)), ("next", "tokencorr", {}),
                                              ("onevision", "quota", dict(scorer=ramp_scorer)), ("llava", "pitome", {})])
def test_restore_is_bit_exact(models, kind, method, opts):
    model = models[kind]
    inputs = llava_inputs(model, kind)
    with torch.no_grad():
        before = model(**inputs).logits
        gen_before = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        vitcompress.compress(model, method, **opts)
        compressed = model(**inputs, question="q").logits
        reduced = vitcompress.stats(model)["visual_tokens_after"]
        vitcompress.restore(model)
        after = model(**inputs).logits
        gen_after = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert reduced < int((inputs["input_ids"] >= LLAVA_VIDEO_TOKEN).sum())
    assert not torch.equal(compressed[:, -1], before[:, -1])
    assert torch.equal(after, before) and torch.equal(gen_after, gen_before)
    assert "generate" not in model.__dict__ and runtime_of(model) is None
    assert all("forward" not in layer.__dict__ for layer in model.model.vision_tower.encoder.layers)


def test_user_hooks_registered_while_compressed_survive_restore(models):
    """Hooks go through public handles: restore removes exactly the compression's, and the user's
    (on the model, and on a tower projection the compression taps too) keep firing."""
    model = models["llava"]
    inputs = llava_inputs(model, "llava", images=half_flat)
    with torch.no_grad():
        before = model(**inputs).logits
    vitcompress.compress(model, "tokencorr")
    fired = []
    handles = [
        model.register_forward_pre_hook(lambda m, args, kwargs: fired.append(("pre", kwargs["input_ids"].shape[1])),
                                        with_kwargs=True),
        model.register_forward_hook(lambda m, args, out: fired.append(("post", out.logits.shape[1]))),
        model.model.vision_tower.encoder.layers[-2].self_attn.k_proj.register_forward_hook(
            lambda m, args, out: fired.append(("tower", out.shape[1]))),
    ]
    try:
        with torch.no_grad():
            compressed = model(**inputs).logits
        n = compressed.shape[1]  # the prefill hook runs first: the user's pre-hook sees the rewritten prompt
        assert n < inputs["input_ids"].shape[1]
        assert fired == [("tower", LLAVA_PATCHES + 1), ("pre", n), ("post", n)]
        vitcompress.restore(model)
        fired.clear()
        with torch.no_grad():
            after = model(**inputs).logits
        full = inputs["input_ids"].shape[1]
        assert fired == [("pre", full), ("tower", LLAVA_PATCHES + 1), ("post", full)]
        assert torch.equal(after, before)
    finally:
        for handle in handles:
            handle.remove()


def torch_save_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("clone", ["deepcopy", "torch.save"])
def test_compressing_twice_replaces_and_a_copy_keeps_the_patch(clone):
    model = tiny_llava("llava")  # fresh: transformers' own hooks, installed by a first forward, do not pickle
    inputs = llava_inputs(model, "llava", images=half_flat)
    vitcompress.compress(model, "quota", keep=0.5, scorer=ramp_scorer)
    vitcompress.compress(model, "tokencorr", merge=True)
    twin = copy.deepcopy(model) if clone == "deepcopy" else torch_save_round_trip(model)
    with torch.no_grad():
        twice = model(**inputs).logits
        twin_out = twin(**inputs).logits
        assert vitcompress.stats(twin)["visual_tokens_after"] == vitcompress.stats(model)["visual_tokens_after"]
        vitcompress.restore(twin)
        twin_plain = twin(**inputs).logits
        assert torch.equal(model(**inputs).logits, twice)  # the original stays compressed
        vitcompress.restore(model)
        plain = model(**inputs).logits
        vitcompress.compress(model, "tokencorr", merge=True)
        once = model(**inputs).logits
    assert torch.equal(twice, once) and torch.equal(twin_out, once) and torch.equal(twin_plain, plain)
    assert not torch.equal(once[:, -1], plain[:, -1])


# ---------------------------------------------------------------- threads

def thread_inputs(model, kind, i):
    """Thread ``i``'s own call: its images (noise below a row that depends on ``i``, flat above:
    partial budgets that differ per thread), one or two samples."""
    def images(shape):
        torch.manual_seed(10 + i)
        out = torch.full((2,) + shape, 0.2 + 0.05 * i)
        out[..., 8 + 2 * i:, :] = torch.randn(out[..., 8 + 2 * i:, :].shape)
        return out

    inputs = llava_inputs(model, kind, images=images)
    return row_alone(inputs, i % 2) if i % 4 == 3 else inputs


def question_scorer(frames, question):
    """Later frames are more relevant, the more so the longer the question: each question its own
    allocation."""
    return torch.linspace(0.1, 1.0, frames.shape[0]) ** len(question)


@pytest.mark.parametrize("kind,method,opts", [("llava", "tokencorr", {}), ("next", "tokencorr", dict(merge=True)),
                                              ("next_video", "quota", dict(keep=0.5, scorer=question_scorer))],
                         ids=["llava-tokencorr", "next-tokencorr", "next_video-quota"])
def test_threads_through_one_compressed_llava_get_their_own_outputs_and_stats(models, kind, method, opts):
    """THREADS threads x CALLS forwards through one compressed model: each gets exactly the logits
    of a sequential run on its input, and ``stats`` in each thread reports its own last prefill."""
    model = models[kind]
    calls = [(thread_inputs(model, kind, i), "q" * (1 + i)) for i in range(THREADS)]

    def call(i):
        inputs, question = calls[i]
        with torch.no_grad():
            logits = model(**inputs, question=question).logits
        stats = vitcompress.stats(model)
        return logits, {k: stats.get(k) for k in ("image", "video", "visual_tokens_after")}

    vitcompress.compress(model, method, **opts)
    try:
        expected = [call(i) for i in range(THREADS)]
        assert len({str(stats) for _, stats in expected}) == THREADS  # every thread's call is its own
        results, errors = [None] * THREADS, []
        start = threading.Barrier(THREADS)

        def work(i):
            try:
                start.wait()
                results[i] = [call(i) for _ in range(CALLS)]
            except Exception as err:  # reported below, with the thread's index
                errors.append((i, err))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        vitcompress.restore(model)
    assert not errors, errors
    for i, runs in enumerate(results):
        for logits, stats in runs:
            assert torch.equal(logits, expected[i][0]), f"thread {i} got another call's logits"
            assert stats == expected[i][1], f"thread {i}'s stats report another call"


# ---------------------------------------------------------------- tokencorr

def test_noise_crop_gets_a_larger_budget_than_a_flat_crop(models):
    for kind in ("llava", "next"):
        model = models[kind]
        vitcompress.compress(model, "tokencorr")
        try:
            with torch.no_grad():
                model(**llava_inputs(model, kind))
            noise, flat = vitcompress.stats(model)["image"]
        finally:
            vitcompress.restore(model)
        # Per crop (anyres crops keep only their unpadded patches, so compare densities too).
        assert min(c["density"] for c in noise["crops"]) > max(c["density"] for c in flat["crops"])
        assert sum(c["budget"] for c in noise["crops"]) > sum(c["budget"] for c in flat["crops"])
        assert noise["tokens_after"] > flat["tokens_after"]
        for c in noise["crops"] + flat["crops"]:
            assert c["density"] == c["budget"] / c["patches"]
        if kind == "llava":  # no newlines, no CLS: what reaches the LM is exactly the budget
            assert [noise["tokens_after"], flat["tokens_after"]] == [noise["budget"], flat["budget"]]


def test_every_crop_keeps_at_least_min_tokens(models):
    model = models["llava"]
    budgets = {}
    for floor in (0, 1, 3):
        vitcompress.compress(model, "tokencorr", min_tokens=floor)
        try:
            with torch.no_grad():
                model(**llava_inputs(model, "llava"))
            budgets[floor] = vitcompress.stats(model)["image"][1]["budget"]  # the constant-colour image
        finally:
            vitcompress.restore(model)
    assert budgets == {0: 0, 1: 1, 3: 3}  # the formula gives a flat image nothing; the floor keeps some
    with pytest.raises(ValueError, match="min_tokens=-1"):
        vitcompress.compress(model, "tokencorr", min_tokens=-1)


def test_crop_budget_matches_the_definition():
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    keys = torch.cat([base[torch.randint(0, 6, (30,))] + 0.05 * torch.randn(30, 8), torch.randn(20, 8)])
    tau, c = 0.9, 3
    k = [v / v.norm() for v in keys]
    redundant = sum(1 for i in range(50) if sum(1 for j in range(50) if j != i and float(k[i] @ k[j]) > tau) > c)
    assert tokencorr.crop_budget(keys, tau, c) == 50 - redundant  # ceil(rho * N), computed in integers
    assert tokencorr.information_density(keys, tau, c) == pytest.approx(1 - redundant / 50)
    assert 0 < redundant < 50


def test_sampling_keeps_outliers_and_is_seeded():
    torch.manual_seed(0)
    deep = torch.rand(40) * 0.01
    deep[[3, 17, 29]] = 1.0  # far above Q3 + 1.5 IQR
    shallow = torch.rand(40)
    assert set(tokencorr.iqr_outliers(deep).nonzero().flatten().tolist()) == {3, 17, 29}
    picks = [tokencorr.sample_tokens(deep, shallow, 10, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])
    for p in picks:
        assert p.numel() == 10 and p.unique().numel() == 10 and {3, 17, 29} <= set(p.tolist())
    top = tokencorr.sample_tokens(deep, shallow, 2)  # fewer slots than outliers: the strongest ones
    assert top.numel() == 2 and set(top.tolist()) <= {3, 17, 29}
    # A patch with no shallow attention is (practically) never drawn.
    shallow[[0, 1, 2]] = 0.0
    drawn = tokencorr.sample_tokens(deep, shallow, 30, torch.Generator().manual_seed(0))
    assert not {0, 1, 2} & set(drawn.tolist())


def test_merge_is_an_attention_weighted_average():
    torch.manual_seed(0)
    keys, deep, shallow = torch.randn(12, 4), torch.rand(12), torch.rand(12)
    keys[8:] = keys[8] + 0.01 * torch.randn(4, 4)  # four near-duplicates: each has 3 > c similar patches
    plan, budget = tokencorr.tokencorr_plan(keys, deep, shallow, tau=0.9, c=1, merge=True)
    assert budget == plan.keep.shape[1] == 8 and plan.merge_src.shape[1] == 4
    feats = torch.randn(12, 5)
    merged = tokencorr.compress_tokens(feats, plan, deep)
    kn = torch.nn.functional.normalize(keys, dim=-1)
    keep = plan.keep[0].tolist()
    for slot, i in enumerate(keep):
        group = [i] + [j for j in range(12) if j not in keep and int((kn[j] @ kn[keep].T).argmax()) == slot]
        w = deep[group]
        torch.testing.assert_close(merged[slot], (feats[group] * w[:, None]).sum(0) / w.sum())


# ---------------------------------------------------------------- QuoTA

@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40), st.integers(0, 20000))
def test_quota_allocation_is_the_formula_and_within_budget(probs, budget):
    squares = [(100 * p) ** 2 for p in probs]
    weights = [s / sum(squares) for s in squares] if sum(squares) > 0 else [1 / len(probs)] * len(probs)
    expected = [int(budget * w) for w in weights]
    alloc = quota.allocate(probs, budget)
    assert alloc == expected and sum(alloc) <= budget
    grids = [torch.zeros(7, 5, 1) for _ in probs]
    tokens, alloc2, shapes = quota.assign_tokens(grids, probs, budget)
    assert alloc2 == alloc
    for t, (h, w), n in zip(tokens, shapes, alloc):
        assert t.shape[0] == h * w <= max(n, 0)
        assert (h * w == 0) == (n <= 0)
    assert sum(t.shape[0] for t in tokens) <= budget


@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 5000))
def test_grid_shape_keeps_aspect_within_the_share(h, w, n):
    rows, cols = quota.grid_shape(h, w, n)
    assert 1 <= rows and 1 <= cols and rows * cols <= n
    if n >= 4 * max(h / w, w / h):  # room for the aspect ratio: the grid is close to n and to h:w
        assert rows * cols > n / 2 and 0.4 < (rows / cols) / (h / w) < 2.5


def test_resize_grid_is_bilinear():
    grid = torch.arange(16.0).reshape(4, 4, 1)
    out = quota.resize_grid(grid, (2, 2))
    ref = torch.nn.functional.interpolate(grid.permute(2, 0, 1)[None], size=(2, 2), mode="bilinear")
    torch.testing.assert_close(out, ref[0].permute(1, 2, 0).reshape(4, 1))
    assert torch.equal(quota.resize_grid(grid, (4, 4)), grid.reshape(16, 1))


def hf_clip():
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(vision_config=dict(LLAVA_VISION), text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=16), projection_dim=16)).eval()


def tiny_open_clip():
    open_clip = pytest.importorskip("open_clip")  # only this scorer needs it (extra "clip")
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=32, patch_size=8, image_size=32, head_width=16),
                          text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=2)).eval()


def word_ids(texts):
    """A stand-in tokenizer: one id per character, padded to 8."""
    return torch.tensor([[2 + ord(ch) % 90 for ch in t[:7]] + [99] + [0] * (7 - len(t[:7])) for t in texts])


@pytest.mark.parametrize("make_clip", [hf_clip, tiny_open_clip], ids=["transformers", "open_clip"])
def test_frame_closest_to_the_query_gets_the_largest_share(models, make_clip):
    clip = make_clip()
    model = models["next_video"]
    inputs = llava_inputs(model, "next_video")
    question = "a red car"
    with torch.no_grad():
        frames = inputs["pixel_values_videos"][0]
        if isinstance(clip, CLIPModel):
            img = clip.get_image_features(pixel_values=frames).pooler_output
            txt = clip.get_text_features(input_ids=word_ids([question])).pooler_output
        else:
            img, txt = clip.encode_image(frames), clip.encode_text(word_ids([question]))
        cos = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1)[0]
    vitcompress.compress(model, "quota", keep=0.5, scorer=clip, tokenizer=word_ids)
    try:
        with torch.no_grad():
            model(**inputs, question=question)
        video = vitcompress.stats(model)["video"][0]
    finally:
        vitcompress.restore(model)
    probs = torch.tensor(video["probabilities"], dtype=torch.float64)
    torch.testing.assert_close(probs, (clip.logit_scale.exp() * cos).softmax(0).double(), atol=1e-5, rtol=1e-5)
    alloc = video["allocation"]
    assert alloc.index(max(alloc)) == int(cos.argmax()) and alloc == quota.allocate(video["probabilities"], video["budget"])
    assert video["budget"] == int(0.5 * 4 * 16)  # keep * frames * pooled tokens per frame


def test_quota_questions_per_sample_reach_the_scorer(models):
    seen = []

    def scorer(frames, question):
        seen.append(question)
        return torch.full((frames.shape[0],), 0.5)

    model = models["onevision"]
    vitcompress.compress(model, "quota", scorer=scorer)
    try:
        with torch.no_grad():
            model(**llava_inputs(model, "onevision"), question=["first?", "second?"])
        with pytest.raises(ValueError, match="quota needs the question"):
            model(**llava_inputs(model, "onevision"))
        with pytest.raises(ValueError, match="one per sample"):
            model(**llava_inputs(model, "onevision"), question=["only one"])
    finally:
        vitcompress.restore(model)
    assert seen == ["first?", "second?"]


def test_onevision_refuses_beam_expansion_of_videos_with_different_token_counts(models):
    """transformers repeats OneVision's joined video tensor as a whole when generate() expands rows
    (beams, returned sequences): with unequal videos that would silently mix them up."""
    def scorer(frames, question):  # flat for one video, peaked for the other: different totals
        n = frames.shape[0]
        peak = torch.nn.functional.one_hot(torch.tensor(0), n).float() * 0.98 + 0.01
        return torch.full((n,), 0.5) if question == "flat" else peak

    model = models["onevision"]
    inputs = llava_inputs(model, "onevision")
    vitcompress.compress(model, "quota", keep=0.4, scorer=scorer)
    try:
        with torch.no_grad():
            model.generate(**inputs, question=["flat", "peak"], max_new_tokens=2, do_sample=False)
            totals = [v["tokens_after"] for v in vitcompress.stats(model)["video"]]
            assert totals[0] != totals[1]
            with pytest.raises(ValueError, match="num_beams / num_return_sequences"):
                model.generate(**inputs, question=["flat", "peak"], max_new_tokens=2, num_beams=2, do_sample=False)
            model.generate(**inputs, question=["flat", "flat"], max_new_tokens=2, num_beams=2, do_sample=False)
    finally:
        vitcompress.restore(model)


def test_rewrite_prompt_keeps_mask_labels_and_padding_side():
    ids = torch.tensor([[1, 9, 9, 9, 2, 3], [4, 9, 9, 9, 5, 0]])  # right-padded batch; 9 = placeholder
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, -100, 2, 3], [-100, -100, -100, -100, 5, -100]])
    out = rewrite_prompt(ids, mask, labels, None, {9: ("image", [3, 3], [1, 2])}, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 9, 2, 3, 0], [4, 9, 9, 5, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert out["labels"].tolist() == [[-100, -100, 2, 3, -100], [-100, -100, -100, 5, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 3], [0, 1, 2, 3, 3]]
    left = rewrite_prompt(ids[:1], None, None, None, {9: ("image", [3], [0])}, pad_id=0)
    assert list(left) == ["input_ids"] and left["input_ids"].tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError, match="do not match"):
        rewrite_prompt(ids, mask, None, None, {9: ("image", [4, 2], [1, 1])}, pad_id=0)


# ---------------------------------------------------------------- clear errors

@pytest.mark.parametrize("kind,method,kwargs,error,match", [
    ("llava", "tokencorr", dict(keep=0.5), ValueError, "content"),
    ("llava", "tokencorr", dict(tau=2.0), ValueError, "tau"),
    ("llava", "tokencorr", dict(shallow_layer=9), ValueError, "outside the vision tower"),
    ("llava", "quota", {}, ValueError, "scorer="),
    ("llava", "quota", dict(scorer=ramp_scorer, flops=0.5), ValueError, "keep="),
    ("llava", "quota", dict(scorer=ramp_scorer, keep=1.5), ValueError, "each video's visual tokens"),
    ("llava", "quota", dict(scorer=hf_clip()), ValueError, "tokenizer="),
    ("next", "quota", dict(scorer=ramp_scorer), TypeError, "frames of a video"),
    ("onevision", "tokencorr", {}, TypeError, "image crops"),
    ("next", "tome", dict(r=2), TypeError, "LlavaForConditionalGeneration only"),
])
def test_clear_errors(models, kind, method, kwargs, error, match):
    model = models[kind]
    with pytest.raises(error, match=match):
        vitcompress.compress(model, method, **kwargs)
    assert not hasattr(model, "_vitcompress")


def test_call_errors_name_the_fix(models):
    model = models["llava"]
    inputs = llava_inputs(model, "llava")
    vitcompress.compress(model, "quota", scorer=lambda f, q: torch.ones(f.shape[0] + 1) / 2)
    try:
        with pytest.raises(ValueError, match="one yes-probability per frame"):
            model(**inputs, question="q")
        with pytest.raises(ValueError, match="input_ids"):
            model(inputs_embeds=torch.zeros(2, 70, 32), pixel_values=inputs["pixel_values"], question="q")
        bad = dict(inputs, input_ids=inputs["input_ids"].clone())
        bad["input_ids"][0, 5] = 7  # one placeholder short
        with pytest.raises(ValueError, match="do not match"):
            model(**bad, question="q")
    finally:
        vitcompress.restore(model)
    assert vitcompress.list_methods("llava") == ["cdpruner", "dart", "fastv", "pyramiddrop", "quota", "tokencorr",
                                                 "visionzip"]


def test_transformers_without_pre_encoded_features_is_refused():
    """transformers 4.x LLaVA merged the features inside forward; there is no mm_encoder_outputs."""

    class OldLlava(LlavaForConditionalGeneration):
        def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)

    torch.manual_seed(0)
    model = OldLlava(LlavaConfig(vision_config=CLIPVisionConfig(**LLAVA_VISION), text_config=LlamaConfig(**LLAVA_TEXT),
                                 image_token_index=LLAVA_IMAGE_TOKEN))
    with pytest.raises(TypeError, match="transformers >= 5"):
        vitcompress.compress(model, "tokencorr")


def test_generate_takes_its_arguments_positionally_too(models):
    """``generate(input_ids, generation_config)`` as transformers accepts it: the positional config
    is the one used (its beam count included)."""
    from transformers import GenerationConfig
    model = models["llava"]
    inputs = llava_inputs(model, "llava", images=half_flat)
    ids = inputs.pop("input_ids")
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    beams = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, num_beams=2, num_return_sequences=2)
    vitcompress.compress(model, "tokencorr")
    try:
        with torch.no_grad():
            positional = model.generate(ids, config, **inputs)
            keyword = model.generate(input_ids=ids, generation_config=config, **inputs)
            beamed = model.generate(ids, beams, **inputs)
    finally:
        vitcompress.restore(model)
    assert torch.equal(positional, keyword) and positional.shape == (2, ids.shape[1] + 3)
    assert beamed.shape[0] == 4 and torch.equal(beamed[:, :ids.shape[1]], ids.repeat_interleave(2, dim=0))
