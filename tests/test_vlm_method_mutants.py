"""Checks written for the mutants of the VLM methods (fastv, pyramiddrop, dart, visionzip, cdpruner) that
the mutation check's fourth run found alive (docs/contributing.md): each asserts the definition -- the
paper's or official code's default, a direct computation -- on a case where the mutant differs."""
import copy

import pytest
import torch

import vitcompress
from vitcompress.methods.cdpruner import CDPruner
from vitcompress.methods.visionzip import VisionZip
from vitcompress.testing import llava_inputs, tiny_llava_lm

pytest.importorskip("transformers")

#: the papers' / official scripts' keep= defaults: FastV R = 50%, PyramidDrop lambda = 0.5,
#: DART reduction_ratio 0.778
PAPER_KEEP = {"fastv": 0.5, "pyramiddrop": 0.5, "dart": 0.222}


@pytest.fixture(scope="module")
def llava():
    return tiny_llava_lm("llava")


@pytest.mark.parametrize("method", sorted(PAPER_KEEP))
def test_language_model_methods_default_to_the_papers_keep_and_say_what_keep_means(llava, method):
    """``describe`` gives the paper's keep= and what it means; an out-of-range keep= names that meaning,
    and compressing without a budget keeps what the paper's keep= keeps."""
    info = vitcompress.describe(method)
    assert info["default_budget"] == {"keep": PAPER_KEEP[method]} and info["kind"] == "prune"
    assert isinstance(info["keep_means"], str) and info["keep_means"]
    with pytest.raises(ValueError) as err:
        vitcompress.compress(copy.deepcopy(llava), method, keep=1.5)
    assert info["keep_means"] in str(err.value)
    inputs = llava_inputs(llava, "llava")
    kept = []
    for budget in ({}, {"keep": PAPER_KEEP[method]}):
        model = vitcompress.compress(copy.deepcopy(llava), method, **budget)
        with torch.no_grad():
            model(**inputs)
        kept.append(vitcompress.stats(model)["visual_tokens_after"])
    assert kept[0] == kept[1]


def _visual_after(model, inputs):
    with torch.no_grad():
        model(**inputs)
    return vitcompress.stats(model)


def test_pyramiddrop_stage_boundaries_are_increasing_layers_from_1_to_depth_minus_1(llava):
    """The boundaries the descriptor accepts on an 8-layer language model: increasing, in 1..7 (a drop
    before layer 0 or at the depth has no layer to run in); each accepted list is where the drops happen."""
    for bad in ([0, 4], [2, 4, 8], [4, 4]):
        with pytest.raises(ValueError, match=r"increasing layers in 1\.\.7"):
            vitcompress.compress(copy.deepcopy(llava), "pyramiddrop", layers=bad)
    inputs = llava_inputs(llava, "llava")
    for good in ([1, 4], [1, 7], [3]):
        stats = _visual_after(vitcompress.compress(copy.deepcopy(llava), "pyramiddrop", layers=good), inputs)
        assert [s["layer"] for s in stats["stages"]] == good


def test_dart_defaults_are_the_official_and_the_option_bounds_are_inclusive(llava):
    """Defaults of the official LLaVA scripts (K = 2, 4 + 4 pivots, no max_kept); the smallest accepted
    values (K = 1, one image pivot, no text pivot, max_kept = 0) run and keep ``pivot_image + P * per_pivot``
    tokens per sample (64 visual tokens each here)."""
    defaults = {name: o["default"] for name, o in vitcompress.describe("dart")["options"].items()}
    assert defaults == {"layer": 2, "pivot_image": 4, "pivot_text": 4, "max_kept": None}
    for bad in ({"layer": 0}, {"pivot_image": 0}, {"pivot_text": -1}, {"max_kept": -1}):
        with pytest.raises(ValueError, match=f"dart {next(iter(bad))}="):
            vitcompress.compress(copy.deepcopy(llava), "dart", **bad)
    inputs = llava_inputs(llava, "llava")
    smallest = {"layer": 1, "pivot_image": 1, "pivot_text": 0, "keep": 0.5}  # per_pivot = 64 * 0.5 // 1 = 32
    stats = _visual_after(vitcompress.compress(copy.deepcopy(llava), "dart", **smallest), inputs)
    assert [s["layer"] for s in stats["stages"]] == [1]
    assert stats["stages"][0]["visual_tokens"] == [1 + 32, 1 + 32]
    stats = _visual_after(vitcompress.compress(copy.deepcopy(llava), "dart", max_kept=0), inputs)
    assert stats["stages"][0]["visual_tokens"] == [4, 4]  # the image pivots alone


# ---------------------------------------------------------------- visionzip and cdpruner (before the language model)


@pytest.fixture(scope="module")
def llava_tower():
    from vitcompress.testing import tiny_llava
    return tiny_llava("llava")  # a 4-layer CLIP tower, 64 patches per crop


def _image_stats(model, method, question="what is shown?", **options):
    """The per-image stats of one forward of ``method`` on the two-image LLaVA batch, then restore."""
    vitcompress.compress(model, method, **options)
    try:
        with torch.no_grad():
            model(**llava_inputs(model, "llava"), question=question)
        return vitcompress.stats(model)
    finally:
        vitcompress.restore(model)


def test_visionzip_defaults_are_the_papers_64_tokens_and_its_counts_are_set_by_the_options():
    """The paper's LLaVA-1.5 setting of 64 tokens (54 dominant with [CLS] + 10 contextual) from the layer
    the model projects (layer=None: CLIP's second-to-last on LLaVA-1.5); a fixed count per image (not
    content-dependent), no keep=."""
    info = vitcompress.describe("visionzip")
    assert {name: o["default"] for name, o in info["options"].items()} == {"dominant": 54, "contextual": 10,
                                                                          "layer": None}
    assert visionzip_split(64) == (54, 10)
    assert info["dynamic"] is False and info["kind"] == "merge" and info["default_budget"] == {"keep": None}
    assert isinstance(info["keep_means"], str) and info["keep_means"]


def visionzip_split(total):
    from vitcompress.methods.visionzip import PAPER_SPLITS
    return PAPER_SPLITS[total]


def test_visionzip_option_bounds_are_inclusive(llava_tower):
    """dominant >= 1 and contextual >= 1 (one [CLS], one contextual token); ``dominant - 1 + contextual``
    up to the crop's 64 patches; ``layer`` an int in -4..3 of the 4-layer tower."""
    for options, tokens in (({"dominant": 1, "contextual": 1}, 2), ({"dominant": 55, "contextual": 10}, 65),
                            ({"dominant": 12, "contextual": 4, "layer": -4}, 16),
                            ({"dominant": 12, "contextual": 4, "layer": 3}, 16)):
        stats = _image_stats(llava_tower, "visionzip", **options)
        assert [u["tokens_after"] for u in stats["image"]] == [tokens, tokens]
        assert stats["budget"] == "set by the method's options"
    for options, error, match in (({"dominant": 0}, ValueError, r"dominant=0: a number of tokens, an int >= 1"),
                                  ({"contextual": 0}, ValueError, r"contextual=0: a number of tokens, an int >= 1"),
                                  ({"dominant": 56, "contextual": 10}, ValueError, "more than the 64 patches"),
                                  ({"layer": 4}, ValueError, r"vision tower's 4 encoder layers \(use -4 \.\. 3\)"),
                                  ({"layer": -5}, ValueError, "outside the vision tower's 4")):
        with pytest.raises(error, match=match):
            _image_stats(llava_tower, "visionzip", **dict({"dominant": 12, "contextual": 4}, **options))
    method = VisionZip()  # the descriptor refuses bools itself (compress's type check comes first)
    for name in ("dominant", "contextual", "layer"):
        with pytest.raises((TypeError, ValueError), match=f"{name}=True"):
            method.validate(dict(method.defaults, **{name: True}))


@pytest.mark.parametrize("remaining,num", [(53, 4), (5, 4), (4, 4), (7, 3), (523, 10)])
def test_visionzip_contextual_targets_are_every_r_over_c_th_remaining_patch(remaining, num):
    """The official ``range(0, R, max(1, R // c))[:c]``: a step of one when fewer than 2c patches remain."""
    from vitcompress.methods.visionzip import contextual_targets
    assert contextual_targets(remaining, num).tolist() == list(range(0, remaining, max(1, remaining // num)))[:num]


def test_cdpruner_defaults_and_option_checks(llava_tower):
    """The paper's 64 tokens per crop; exactly one of clip= (with its tokenizer) or a callable scorer=."""
    from vitcompress.testing import char_tokenizer, tiny_llava_clip
    info = vitcompress.describe("cdpruner")
    assert {name: o["default"] for name, o in info["options"].items()} == {"tokens": 64, "clip": None,
                                                                          "tokenizer": None, "scorer": None}
    assert info["dynamic"] is False and info["kind"] == "prune" and info["default_budget"] == {"keep": None}
    assert isinstance(info["keep_means"], str) and info["keep_means"]
    clip, scorer = tiny_llava_clip(llava_tower), (lambda p, q: p[..., 0])
    for options, error, match in (({"clip": clip, "tokenizer": char_tokenizer, "scorer": scorer}, ValueError,
                                   "exactly one of clip="),
                                  ({"clip": clip}, ValueError, "clip= needs tokenizer="),
                                  ({"clip": object(), "tokenizer": char_tokenizer}, TypeError,
                                   "a transformers CLIPModel"),
                                  ({"scorer": "cosine"}, TypeError, "scorer=str: a callable")):
        with pytest.raises(error, match=match):
            vitcompress.compress(copy.deepcopy(llava_tower), "cdpruner", **options)
    with pytest.raises(ValueError, match="tokens=True"):
        CDPruner().validate(dict(CDPruner.defaults, tokens=True, scorer=scorer))
    stats = _image_stats(llava_tower, "cdpruner", tokens=16, clip=clip, tokenizer=char_tokenizer)
    assert [len(u["kept"]) for u in stats["image"]] == [16, 16]


@pytest.mark.parametrize("patch", [0, 63])
def test_cdpruner_keeps_the_least_similar_patch_first_at_either_end_of_the_crop(llava_tower, patch):
    """tokens=1 (the smallest accepted) keeps the patch the instruction is least similar to (the official
    negation: the largest relevance, the largest kernel diagonal), also the crop's first or last patch."""
    def scorer(patches, question):
        similarity = torch.zeros(patches.shape[:2])
        similarity[:, patch] = -1.0
        return similarity
    stats = _image_stats(llava_tower, "cdpruner", tokens=1, scorer=scorer)
    assert [u["kept"] for u in stats["image"]] == [[patch], [patch]]
    assert [u["tokens_after"] for u in stats["image"]] == [1, 1]
    assert stats["budget"] == "set by the method's options"


def test_cdpruner_scorer_similarities_per_text_segment_are_averaged_and_their_shape_checked(llava_tower):
    """A scorer may return ``[crops, N, M]`` (M text segments): the relevance uses their mean, so it keeps
    what a scorer of the mean keeps; any other shape is refused."""
    def segments(patches, question):
        return torch.stack([patches[..., 0], patches[..., 1] * 3], dim=-1)

    def mean(patches, question):
        return (patches[..., 0] + patches[..., 1] * 3) / 2

    kept = [[u["kept"] for u in _image_stats(llava_tower, "cdpruner", tokens=16, scorer=s)["image"]]
            for s in (segments, mean)]
    assert kept[0] == kept[1]
    with pytest.raises(ValueError, match=r"the cdpruner scorer returned \(1, 63\) for \(1, 64\) patches"):
        _image_stats(llava_tower, "cdpruner", tokens=16, scorer=lambda p, q: p[:, 1:, 0])


def test_cdpruner_text_segments_cut_the_question_into_padded_rows_of_the_text_length():
    from transformers import BatchEncoding

    from vitcompress.methods.cdpruner import text_segments

    def tokenizer(text, return_tensors="pt"):
        ids = torch.arange(1, len(text[0]) + 1)[None]
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                              "token_type_ids": torch.zeros_like(ids)})

    for n in (1, 15, 16, 17, 33):
        out = text_segments(tokenizer, "x" * n, 16)
        rows = -(-n // 16)
        assert set(out) == {"input_ids", "attention_mask"}
        assert out["input_ids"].shape == out["attention_mask"].shape == (rows, 16)
        assert out["input_ids"].flatten().tolist() == list(range(1, n + 1)) + [0] * (16 * rows - n)
        assert out["attention_mask"].flatten().tolist() == [1] * n + [0] * (16 * rows - n)


def test_cdpruner_clip_similarity_is_the_cosine_of_the_clip_embeddings_per_segment(llava_tower):
    """Patches through the tower's post-layernorm and visual projection, each text segment through the
    text tower and its projection: their cosine, ``[crops, N, M]``, without an autograd graph."""
    import torch.nn.functional as F

    from vitcompress.methods.cdpruner import clip_similarity, text_segments
    from vitcompress.testing import char_tokenizer, tiny_llava_clip
    clip = tiny_llava_clip(llava_tower)
    patches = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(3))
    question = "what colour is the large car?"  # 31 ids: two segments of 16
    out = clip_similarity(clip, char_tokenizer, patches, question)
    assert out.shape == (2, 64, 2) and not out.requires_grad
    with torch.no_grad():
        image = clip.visual_projection(clip.vision_model.post_layernorm(patches))
        texts = []
        for m in range(2):
            segment = {k: v[m:m + 1] for k, v in text_segments(char_tokenizer, question, 16).items()}
            pooled = clip.get_text_features(**segment)
            texts.append(pooled if isinstance(pooled, torch.Tensor) else pooled.pooler_output)
        expected = torch.stack([F.cosine_similarity(image, t[0], dim=-1) for t in texts], dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def _next_layout(rows, columns, side):
    """A packed LLaVA-NeXT layout (``crop * N + patch``, -1 a row's newline): the base crop's patches,
    then the whole grid of ``rows x columns`` crops of ``side x side`` patches in raster order."""
    N = side * side
    layout = list(range(N))
    for r in range(rows * side):
        for c in range(columns * side):
            layout.append((1 + (r // side) * columns + c // side) * N + (r % side) * side + c % side)
        layout.append(-1)
    return torch.tensor(layout)


@pytest.mark.parametrize("rows,columns", [(1, 2), (2, 1), (2, 3)])
def test_visionzip_anyres_packing_is_the_official_raster_order(rows, columns):
    """The grid crops' dominant tokens in the raster order of the whole grid (row of the grid, then
    column), then every grid crop's [CLS], then every grid crop's contextual tokens; the columns read
    back from the packed layout."""
    from vitcompress.methods.visionzip import anyres_tokens, crop_columns
    side, d, ctx = 3, 4, 2
    N, crops = side * side, 1 + rows * columns
    assert crop_columns(_next_layout(rows, columns, side), N) == columns
    g = torch.Generator().manual_seed(rows * 10 + columns)
    dominant = torch.stack([torch.randperm(N, generator=g)[:d].sort().values for _ in range(crops)])
    tokens = torch.arange(crops * (1 + d + ctx), dtype=torch.float32).reshape(crops, 1 + d + ctx, 1)
    out = anyres_tokens(tokens, dominant, columns, N)[:, 0].tolist()
    placed = []
    for c in range(1, crops):
        for i, p in enumerate(dominant[c].tolist()):
            row = ((c - 1) // columns) * side + p // side
            col = ((c - 1) % columns) * side + p % side
            placed.append((row, col, float(tokens[c, 1 + i, 0])))
    expected = (tokens[0, :, 0].tolist() + [t for _, _, t in sorted(placed)]
                + [float(tokens[c, 0, 0]) for c in range(1, crops)]
                + [float(t) for c in range(1, crops) for t in tokens[c, 1 + d:, 0]])
    assert out == expected


def test_cdpruner_relevance_keeps_the_official_epsilon_so_the_least_relevant_patch_stays_positive():
    """``(s - min s + 1e-6) / (max s - min s)``: the least relevant patch gets exactly 1e-6 / (max - min),
    not zero or less (the official epsilon, in float64 here so that it is not lost to rounding)."""
    from vitcompress.methods.cdpruner import relevance
    similarity = torch.tensor([[1.0, -0.5, 0.0], [0.5, 0.0, -1.0]], dtype=torch.float64)  # s: 2 rows x 3 patches
    s = -similarity
    out = relevance(similarity)
    assert out.dtype == torch.float64 and float(out.min()) > 0
    assert torch.equal(out, (s - s.min() + 1e-6) / (s.max() - s.min()))
    assert float(out.flatten()[0]) == 1e-6 / 2.0  # s = -1 there, the minimum; max - min = 2


def test_cdpruner_a_budget_above_the_crops_patches_keeps_each_patch_once():
    """tokens= is capped at the crop's N patches (not at the features' width: here D = 16 > N = 8, as on
    LLaVA, 4096 > 576): every patch kept once, in index order."""
    from vitcompress.methods.cdpruner import select_tokens
    g = torch.Generator().manual_seed(7)
    features, similarity = torch.randn(2, 8, 16, generator=g), torch.rand(2, 8, generator=g)
    for tokens in (8, 12, 20):
        assert select_tokens(features, similarity, tokens).tolist() == [list(range(8))] * 2
    assert select_tokens(features, similarity, 3).shape == (2, 3)


def test_registry_names_every_method_once_and_by_target():
    """``methods.names()``: every registered method, sorted; ``names(target)`` those of that target,
    which together are all of them; an unknown target is refused."""
    from vitcompress.interfaces import TARGETS
    from vitcompress.methods import REGISTRY, get, names
    assert names() == sorted(REGISTRY) and {"tome", "fastv", "visionzip", "focus_detr"} <= set(names())
    by_target = {t: names(t) for t in TARGETS}
    assert sorted(n for ns in by_target.values() for n in ns) == names()
    for target, ns in by_target.items():
        assert ns == sorted(ns) and all(get(n).target == target for n in ns)
    assert "tome" in by_target["vit"] and "fastv" in by_target["llava"] and "focus_detr" in by_target["detr"]
    with pytest.raises(ValueError, match="unknown target"):
        names("nope")


@pytest.mark.parametrize("method, options", [("visionzip", dict(dominant=12, contextual=4)),
                                             ("cdpruner", dict(tokens=16, scorer=lambda p, q: p[..., 0]))])
def test_the_third_image_of_a_batch_is_reduced_from_its_own_crop(llava_tower, method, options):
    """Three images in one call each keep what they keep alone: the crops are taken in turn (with two
    images, the second starts where the first ends whether the offset adds up or not)."""
    from vitcompress.testing import LLAVA_IMAGE_TOKEN, LLAVA_PATCHES

    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[1, 5] + [LLAVA_IMAGE_TOKEN] * LLAVA_PATCHES + [7]] * 3)
    vitcompress.compress(llava_tower, method, **options)
    try:
        with torch.no_grad():
            llava_tower(input_ids=ids, pixel_values=pixels, question=["what is shown?"] * 3)
            batch = [u["kept"] for u in vitcompress.stats(llava_tower)["image"]]
            alone = []
            for b in range(3):
                llava_tower(input_ids=ids[b:b + 1], pixel_values=pixels[b:b + 1], question="what is shown?")
                alone.append(vitcompress.stats(llava_tower)["image"][0]["kept"])
    finally:
        vitcompress.restore(llava_tower)
    assert len({str(k) for k in alone}) == 3  # three images, three choices
    assert batch == alone


@pytest.mark.parametrize("method, options", [("visionzip", {}),
                                             ("cdpruner", dict(tokens=16, scorer=lambda p, q: p[..., 0]))])
def test_a_llava_handing_on_its_cls_feature_is_refused(method, options):
    """vision_feature_select_strategy='full' hands the tower's [CLS] to the language model: the crop
    layouts would hold a token no method of the tower reduces, so both refuse it by name."""
    from vitcompress.testing import tiny_llava

    model = tiny_llava("llava")
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match=f"{method} needs vision_feature_select_strategy='default'"):
            vitcompress.compress(model, method, **options)
            with torch.no_grad():
                model(**llava_inputs(model, "llava"), question="what is shown?")
    finally:
        if vitcompress.interfaces.runtime_of(model) is not None:
            vitcompress.restore(model)


def test_cdpruner_reports_each_crop_of_a_two_crop_image_and_its_newlines():
    """A LLaVA-NeXT image whose grid is one crop (a 1 x 1 pinpoint): the report lists both crops' kept
    patches, and counts the newlines the uncompressed model hands on (each kept as in the official code)."""
    from vitcompress.testing import LLAVA_IMAGE_TOKEN, tiny_llava

    model = tiny_llava("next")
    model.config.image_grid_pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    pixels = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[32, 32]])
    with torch.no_grad():
        features = model.model.get_image_features(pixels, sizes).pooler_output[0]
    newlines = int((features == model.model.image_newline).all(-1).sum())
    assert features.shape[0] == 2 * 64 + newlines and newlines == 8  # base crop, one grid crop, a newline per row
    ids = torch.tensor([[1, 5] + [LLAVA_IMAGE_TOKEN] * features.shape[0] + [7]])
    vitcompress.compress(model, "cdpruner", tokens=16, scorer=lambda p, q: p[..., 0])
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, image_sizes=sizes, question="what is shown?")
    report = vitcompress.stats(model)["image"][0]
    vitcompress.restore(model)
    assert [len(k) for k in report["kept"]] == [16, 16]
    assert report["newline_tokens"] == newlines and report["tokens_after"] == 2 * 16 + newlines


# --------------------------------------------------------------- cdpruner on LLaVA-OneVision (ninth mutation run)


def _onevision_report(model, inputs):
    """cdpruner on the tiny OneVision: (report of each image, the visual tokens the language model gets)."""
    from vitcompress.testing import projection_scorer

    seen = {}

    def grab(module, args, kw):
        seen["image"] = kw["mm_encoder_outputs"]["image"].pooler_output

    vitcompress.compress(model, "cdpruner", tokens=12, scorer=projection_scorer)
    handle = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), question="what is shown?")
        return vitcompress.stats(model)["image"], seen["image"]
    finally:
        handle.remove()
        vitcompress.restore(model)


def test_cdpruner_onevision_reports_kept_per_crop_and_the_newlines_it_hands_on():
    """A OneVision image of two crops (a 1 x 1 pinpoint grid) is reported crop by crop and hands on no newline
    (the uncompressed model has one per grid row); the one-crop images of a multi-image sample report a flat
    list and their one newline. The newlines are counted here in the tokens the language model gets."""
    from vitcompress.testing import LLAVA_IMAGE_TOKEN, tiny_llava_onevision_siglip

    model = tiny_llava_onevision_siglip()
    newline = model.model.image_newline

    def newlines(tokens):
        return int((tokens == newline).all(-1).sum())

    model.config.image_grid_pinpoints = [[36, 36]]
    pixels = torch.randn(1, 2, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[36, 36]])
    with torch.no_grad():
        full = model.model.get_image_features(pixels, sizes).pooler_output[0]
    assert full.shape[0] == 2 * 81 + 9 and newlines(full) == 9  # base crop, one grid crop, a newline per row
    ids = torch.tensor([[1, 5] + [LLAVA_IMAGE_TOKEN] * full.shape[0] + [7]])  # placeholders as uncompressed
    (report,), tokens = _onevision_report(model, {"input_ids": ids, "pixel_values": pixels, "image_sizes": sizes})
    assert [len(k) for k in report["kept"]] == [12, 12] and all(isinstance(k, list) for k in report["kept"])
    assert report["newline_tokens"] == newlines(tokens[0]) == 0 and report["tokens_after"] == 24

    pixels = torch.randn(2, 2, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 5] + [LLAVA_IMAGE_TOKEN] * 82 + [6] + [LLAVA_IMAGE_TOKEN] * 82 + [7]])
    reports, tokens = _onevision_report(model, {"input_ids": ids, "pixel_values": pixels, "image_sizes": sizes.repeat(2, 1),
                                                    "batch_num_images": torch.tensor([2])})
    for report, image in zip(reports, tokens):
        assert len(report["kept"]) == 12 and all(isinstance(k, int) for k in report["kept"])
        assert report["newline_tokens"] == newlines(image) == 1 and report["tokens_after"] == 13


def test_cdpruner_embedding_scorer_builds_no_autograd_graph():
    """``embedding_scorer`` is called as a plain function by users too: with a trainable embedding its
    similarities carry no autograd graph (they only rank tokens)."""
    from vitcompress.methods.cdpruner import embedding_scorer

    embedding = torch.nn.Embedding(10, 8)
    scorer = embedding_scorer(embedding, lambda text: {"input_ids": [[1, 2, 3]]})
    similarity = scorer(torch.randn(1, 5, 8), "three word question")
    assert similarity.shape == (1, 5, 3) and not similarity.requires_grad


def test_visionzip_received_attention_is_the_mean_over_queries_and_heads():
    """OneVision's dominant-token score: the softmax attention each token receives, averaged over the
    queries and the heads (so each image's scores sum to 1), against the full ``[B, H, N, N]`` attention."""
    from vitcompress.methods.visionzip import received_attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 7, 12, generator=g), torch.randn(2, 7, 12, generator=g)
    heads = lambda x: x.reshape(2, 7, 3, 4).transpose(1, 2)  # noqa: E731
    attention = (heads(q) @ heads(k).transpose(-1, -2) * 0.5).softmax(dim=-1)  # [B, H, N, N]
    received = received_attention(q, k, 3, 0.5)
    torch.testing.assert_close(received, attention.mean(dim=(1, 2)))
    torch.testing.assert_close(received.sum(dim=-1), torch.ones(2))
