"""visionzip and cdpruner on tiny random-weight LLaVA models: token counts, generate() with the KV
cache, exact restore, batches of different image sizes, the model's fused attention kept, and the
selection rules against computations written here (the official selections: test_official_visionzip_cdpruner)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import vitcompress
from vitcompress import testing
from vitcompress.interfaces import runtime_of
from vitcompress.methods import cdpruner, visionzip
from vitcompress.testing import LLAVA_IMAGE_TOKEN, char_tokenizer, llava_inputs, tiny_llava, tiny_llava_clip

QUESTION = "what is shown?"


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_llava(kind) for kind in ("llava", "next", "next_video")}


def hashed_text_scorer(patches, question):
    """A random-weight stand-in for a text encoder: the patches' cosine with a vector drawn from the question."""
    g = torch.Generator().manual_seed(sum(map(ord, question)))
    return F.normalize(patches, dim=-1) @ F.normalize(torch.randn(patches.shape[-1], generator=g), dim=0)


def options(model, method, clip=False):
    if method == "visionzip":
        return dict(dominant=12, contextual=4)
    if clip:
        return dict(tokens=16, clip=tiny_llava_clip(model), tokenizer=char_tokenizer)
    return dict(tokens=16, scorer=hashed_text_scorer)


CASES = [("llava", "visionzip"), ("llava", "cdpruner"), ("next", "visionzip"), ("next", "cdpruner"),
         pytest.param("next_video", "visionzip", marks=pytest.mark.slow),
         pytest.param("next_video", "cdpruner", marks=pytest.mark.slow)]
IDS = ["llava-visionzip", "llava-cdpruner", "next-visionzip", "next-cdpruner", "next_video-visionzip",
       "next_video-cdpruner"]


class LMInput:
    """The input_ids the language-model side (``model.model``) sees on each call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        def hook(module, args, kwargs):
            self.calls.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).clone())
        self.handle = self.model.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def lm_counts(call):
    return (call == LLAVA_IMAGE_TOKEN).sum(dim=1).tolist()


@pytest.mark.parametrize("kind,method", CASES, ids=IDS)
def test_budget_generate_fused_attention_and_exact_restore(models, kind, method, monkeypatch):
    """Kept counts as the budget says; generate() with the KV cache; the tower and the language model
    keep SDPA (the same number of SDPA calls as the uncompressed model, no attention implementation
    switched: the [CLS] attention comes from tapped q/k); restore gives bit-identical outputs."""
    model = models[kind]
    inputs = llava_inputs(model, kind)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    implementations = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    assert implementations == ("sdpa", "sdpa")
    with torch.no_grad():
        before = model(**inputs).logits
    plain_calls = len(calls)
    gen_before = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    vitcompress.compress(model, method, **options(model, method))
    try:
        calls.clear()
        with torch.no_grad(), LMInput(model) as seen:
            logits = model(**inputs, question=QUESTION).logits
        compressed_calls = len(calls)
        stats = vitcompress.stats(model)
        assert (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation,
                model.model.language_model.config._attn_implementation) == implementations + ("sdpa",)
        with LMInput(model) as gen_seen:
            out = model.generate(**inputs, question=QUESTION, max_new_tokens=3, do_sample=False)
        no_cache = model.generate(**inputs, question=QUESTION, max_new_tokens=3, do_sample=False, use_cache=False)
        layouts = runtime_of(model).adapter.crop_layouts(inputs)
    finally:
        vitcompress.restore(model)
    assert compressed_calls == plain_calls > 0
    images = stats["image"]
    if method == "visionzip" and kind == "llava":
        assert [u["tokens_after"] for u in images] == [16, 16]
        assert all(len(u["kept"]) == 11 and len(u["contextual"]) == 4 and len(u["merged"]) == 64 - 15 for u in images)
    elif method == "visionzip":  # every crop 12 + 4, packed as the official code (no newlines)
        assert [u["tokens_after"] for u in images] == [16 * crops for _, crops in layouts]
        assert all(len(c["kept"]) == 11 and len(c["contextual"]) == 4 for u in images for c in u["crops"])
    elif kind == "llava":
        assert [len(u["kept"]) for u in images] == [16, 16] == [u["tokens_after"] for u in images]
    else:  # per crop 16 patches chosen on the full grid; the model's unpadding drops some; newlines stay
        for unit, (layout, crops) in zip(images, layouts):
            assert len(unit["kept"]) == crops and all(len(k) == 16 for k in unit["kept"])
            chosen = {c * 64 + p for c, kept in enumerate(unit["kept"]) for p in kept}
            survive = sum(int(t) in chosen for t in layout if t >= 0)
            assert unit["tokens_after"] == survive + int((layout == -1).sum()) < unit["tokens_before"]
    assert lm_counts(seen.calls[0]) == [u["tokens_after"] for u in images]
    # generate: the caller's prompt then new tokens, the prefill saw forward's prompt, the KV cache changes nothing
    assert torch.equal(gen_seen.calls[0], seen.calls[0]) and all(c.shape[1] == 1 for c in gen_seen.calls[1:])
    assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(out[:, inputs["input_ids"].shape[1]], logits[:, -1].argmax(-1))
    assert torch.equal(out, no_cache)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), gen_before)


def row_alone(inputs, b):
    keep = inputs["attention_mask"][b] == 1
    one = {k: v[b:b + 1] for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return dict(one, input_ids=inputs["input_ids"][b][keep][None])


@pytest.mark.parametrize("kind,method", [("llava", "cdpruner"), ("next", "visionzip"), ("next", "cdpruner")],
                         ids=["llava-cdpruner", "next-visionzip", "next-cdpruner"])
def test_batch_rows_match_rows_alone(models, kind, method):
    """A padded batch (LLaVA-NeXT: images of different sizes, 3 and 5 crops) keeps, per image, what the
    image keeps alone, and generates the same tokens; each row gets its own question."""
    model = models[kind]
    inputs = llava_inputs(model, kind)
    questions = ["a red car", "the small print on the left"]
    vitcompress.compress(model, method, **options(model, method))
    try:
        gen = model.generate(**inputs, question=questions, max_new_tokens=3, do_sample=False)
        batch = vitcompress.stats(model)["image"]
        alone, stats_alone = [], []
        for b in range(2):
            alone.append(model.generate(**row_alone(inputs, b), question=questions[b], max_new_tokens=3,
                                        do_sample=False))
            stats_alone.append(vitcompress.stats(model)["image"][0])
    finally:
        vitcompress.restore(model)
    assert [u.get("kept") or u["crops"] for u in batch] == [u.get("kept") or u["crops"] for u in stats_alone]
    assert [u["tokens_after"] for u in batch] == [u["tokens_after"] for u in stats_alone]
    for b in range(2):
        assert torch.equal(gen[b, -3:], alone[b][0, -3:])
    if kind == "next":  # different sizes: different unpadded grids
        assert inputs["image_sizes"][0].tolist() != inputs["image_sizes"][1].tolist()
        assert batch[0]["tokens_before"] != batch[1]["tokens_before"]


def test_cdpruner_selection_follows_the_question(models):
    """The relevance term is in the kernel: two questions pick different tokens of the same image."""
    model = models["llava"]
    inputs = llava_inputs(model, "llava")
    vitcompress.compress(model, "cdpruner", **options(model, "cdpruner", clip=True))
    try:
        kept = []
        for question in ("a red car", "zzzz qqqq xxxx"):
            with torch.no_grad():
                model(**inputs, question=question)
            kept.append([u["kept"] for u in vitcompress.stats(model)["image"]])
    finally:
        vitcompress.restore(model)
    assert kept[0] != kept[1]


def test_cdpruner_scorer_reaches_the_kernel(models):
    """``scorer=`` gets the feature layer's patches and the question; its similarities become the
    kernel's relevance."""
    model = models["llava"]
    inputs = llava_inputs(model, "llava")
    seen = []

    def scorer(patches, question):
        seen.append((tuple(patches.shape), question))
        return patches[..., 0]

    vitcompress.compress(model, "cdpruner", tokens=16, scorer=scorer)
    try:
        with torch.no_grad():
            model(**inputs, question=["one", "two"])
        kept = [u["kept"] for u in vitcompress.stats(model)["image"]]
    finally:
        vitcompress.restore(model)
    assert seen == [((1, 64, 32), "one"), ((1, 64, 32), "two")]
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        patches = out.hidden_states[model.config.vision_feature_layer][:, 1:]
        features = model.model.multi_modal_projector(patches)
    for b in range(2):
        s = -patches[b, :, 0]
        rel = (s - s.min() + 1e-6) / (s.max() - s.min())
        unit = features[b] / features[b].norm(dim=-1, keepdim=True)
        kernel = rel[:, None] * (unit @ unit.T) * rel[None]
        assert kept[b] == cdpruner.greedy_map(kernel[None], 16)[0].tolist()


def test_relevance_is_the_negated_mean_min_max_normalised():
    sim = torch.tensor([[[0.2, 0.4], [0.9, 0.7], [-0.1, 0.1]]])
    s = -sim.mean(-1)
    expected = (s - s.min() + 1e-6) / (s.max() - s.min())
    torch.testing.assert_close(cdpruner.relevance(sim), expected)
    assert int(cdpruner.relevance(sim).argmax()) == 2  # the least similar patch is the most "relevant" (official)


def test_greedy_map_maximises_the_determinant_step_by_step():
    """Each greedy step adds the token that makes det(L_S) largest (computed here by determinants)."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 9, 6, generator=g)
    rel = torch.rand(2, 9, generator=g) + 0.1
    kernel = cdpruner.conditional_kernel(features, rel)
    unit = F.normalize(features, dim=-1)
    torch.testing.assert_close(kernel, rel[:, :, None] * (unit @ unit.transpose(1, 2)) * rel[:, None])
    chosen = cdpruner.greedy_map(kernel, 4)
    for b in range(2):
        picked = []
        for _ in range(4):
            dets = {j: torch.linalg.det(kernel[b][picked + [j]][:, picked + [j]].double()) for j in range(9)
                    if j not in picked}
            picked.append(max(dets, key=dets.get))
        assert chosen[b].tolist() == sorted(picked)


def test_visionzip_contextual_tokens_are_target_plus_mean_of_the_joined():
    """Targets every R // c-th remaining patch; each other patch joins its most similar target (key
    cosine); a contextual token is its target's hidden state plus the mean of those that joined."""
    g = torch.Generator().manual_seed(1)
    keys, hidden = torch.randn(2, 11, 4, generator=g), torch.randn(2, 11, 5, generator=g)
    tokens, targets, joined = visionzip.contextual_tokens(keys, hidden, 3)
    assert targets.tolist() == [0, 3, 6]
    for b in range(2):
        others = [i for i in range(11) if i not in (0, 3, 6)]
        for t_pos, t in enumerate((0, 3, 6)):
            members = [o for o in others
                       if max((0, 3, 6), key=lambda s: float(F.cosine_similarity(keys[b, o], keys[b, s], dim=0))) == t]
            expected = hidden[b, t] + (torch.stack([hidden[b, m] for m in members]).mean(0) if members else 0)
            torch.testing.assert_close(tokens[b, t_pos], expected)
        assert [(0, 3, 6)[j] for j in joined[b].tolist()] == [
            max((0, 3, 6), key=lambda s: float(F.cosine_similarity(keys[b, o], keys[b, s], dim=0))) for o in others]


def test_visionzip_dominant_tokens_are_the_cls_attention_top():
    cls_attn = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.05, 0.3]])
    assert visionzip.dominant_patches(cls_attn, 3).tolist() == [[1, 3, 5]]
    assert visionzip.remaining_patches(torch.tensor([[1, 3, 5]]), 6).tolist() == [[0, 2, 4]]


@pytest.mark.parametrize("kind,method,kwargs,error,match", [
    ("llava", "visionzip", dict(keep=0.5), ValueError, "dominant=54/108/162"),
    ("llava", "cdpruner", dict(tokens=8), ValueError, "exactly one of clip="),
    ("llava", "cdpruner", dict(tokens=8, scorer=lambda p, q: p.mean(-1), tokenizer=char_tokenizer), ValueError,
     "only used with clip="),
    ("llava", "cdpruner", dict(tokens=0, scorer=lambda p, q: p.mean(-1)), ValueError, "tokens=0"),
    ("llava", "visionzip", dict(dominant=60, contextual=10), ValueError, "more than the 64 patches"),
])
def test_clear_errors(models, kind, method, kwargs, error, match):
    model = models[kind]
    try:
        with pytest.raises(error, match=match):
            vitcompress.compress(model, method, **kwargs)
            with torch.no_grad():
                model(**llava_inputs(model, kind), question=QUESTION)
    finally:
        if runtime_of(model) is not None:
            vitcompress.restore(model)


def test_cdpruner_needs_the_question(models):
    model = models["llava"]
    vitcompress.compress(model, "cdpruner", tokens=8, scorer=lambda p, q: p.mean(-1))
    try:
        with pytest.raises(ValueError, match="needs the question"):
            model(**llava_inputs(model, "llava"))
    finally:
        vitcompress.restore(model)


def test_paper_splits_are_a_fixed_share():
    assert all(d + c == total and c == total * 5 // 32 for total, (d, c) in visionzip.PAPER_SPLITS.items())
    assert list(itertools.islice(visionzip.PAPER_SPLITS, 3)) == [64, 128, 192]


@pytest.mark.parametrize("build, projected", [
    (lambda: tiny_llava("llava"), "vision_feature_layer"),
    (lambda: testing.tiny_llava_onevision_siglip(), "vision_feature_layer"),
    (lambda: testing.tiny_internvl(), "vision_feature_layer"),
    (lambda: testing.tiny_qwen_vl("qwen2_5"), None)], ids=["llava", "onevision", "internvl", "qwen2_5_vl"])
def test_visionzip_reads_the_layer_the_model_projects_by_default(build, projected):
    """``layer=None`` taps the layer whose output the model projects: LLaVA-1.5's ``vision_feature_layer``
    (-2 here), OneVision's and InternVL's (-1), Qwen-VL's last block (its merger's input)."""
    model = build()
    vitcompress.compress(model, "visionzip", dominant=4, contextual=2)
    try:
        tapped = [layer for layer, _, _ in runtime_of(model).taps.layers]
    finally:
        vitcompress.restore(model)
    config = model.config
    if projected is None:
        want = len(model.model.visual.blocks) - 1
    else:
        depth = config.vision_config.num_hidden_layers
        want = getattr(config, projected) % (depth + 1) - 1
    assert tapped[0] == want and tapped[-1] == want, (tapped, want)


def test_cdpruner_refuses_more_tokens_than_the_kernel_rank():
    """The kernel of N tokens D wide has rank <= D: past D tokens the greedy gains run out and a token
    would repeat, so more than D is refused (D itself is chosen, every index once)."""
    g = torch.Generator().manual_seed(0)
    features, similarity = torch.randn(1, 12, 5, generator=g), torch.randn(1, 12, generator=g)
    kept = cdpruner.select_tokens(features, similarity, 5)
    assert kept.shape == (1, 5) and kept.unique().numel() == 5
    with pytest.raises(ValueError, match="tokens=6: the DPP kernel of 5-wide projected tokens has rank at most 5"):
        cdpruner.select_tokens(features, similarity, 6)
