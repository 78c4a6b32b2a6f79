"""InternVL (transformers' InternVLForConditionalGeneration) through the VLM runtime: tokencorr per
local tile after the pixel shuffle, QuoTA per frame, the thumbnail kept whole; tiny random models.
Beams and padded rows alone are slow: ``python -m pytest -m slow tests/test_internvl.py``."""
import pytest
import torch
import torch.nn.functional as F

import vitcompress
from vitcompress.adapters.internvl import InternVLAdapter
from vitcompress.engine.schedule import Budget
from vitcompress.interfaces import LlavaMethod, runtime_of
from vitcompress.testing import (INTERNVL_IMAGE_TOKEN, INTERNVL_IMG_END, INTERNVL_IMG_START, INTERNVL_TILE_TOKENS,
                                 INTERNVL_VISION, internvl_inputs, ramp_scorer, tiny_internvl)

T = INTERNVL_TILE_TOKENS
KEEP_ALL = {"tokencorr": dict(c=10**6),  # no patch has that many near-duplicates: every tile keeps all
            "quota": dict(keep=1.0, scorer=lambda frames, q: torch.full((len(frames),), 0.5))}  # equal shares
REDUCE = {"tokencorr": {}, "quota": dict(keep=0.5, scorer=ramp_scorer)}


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


class LMInput:
    """Records what the inner InternVLModel (which scatters the visual tokens) receives."""

    def __init__(self, model):
        self.model, self.ids, self.features = model, [], []

    def __enter__(self):
        def hook(module, args, kwargs):
            self.ids.append(kwargs["input_ids"].clone())
            encoded = kwargs.get("mm_encoder_outputs") or {}
            self.features.append(encoded["image"].pooler_output if "image" in encoded else None)
        self.handle = self.model.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def image_runs(ids):
    """Per row, the lengths of its runs of image tokens (one per image), zero-length runs included
    (``<img></img>``: an image that kept nothing)."""
    out = []
    for row in ids.tolist():
        runs, n = [], None
        for t in row:
            if t == INTERNVL_IMG_START:
                n = 0
            elif t == INTERNVL_IMAGE_TOKEN:
                n += 1
            elif t == INTERNVL_IMG_END:
                runs.append(n)
        out.append(runs)
    return out


@pytest.mark.parametrize("method", ["tokencorr", "quota"])
def test_keeping_every_token_is_the_uncompressed_model(model, method):
    """Every tile of every image kept: the same logits (1e-5) and the same generated tokens, in a
    batch of images of 3, 1 and 5 tiles (thumbnails included)."""
    inputs = internvl_inputs()
    with torch.no_grad():
        want = model(**inputs).logits
        want_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        vitcompress.compress(model, method, **KEEP_ALL[method])
        try:
            with LMInput(model) as seen:
                got = model(**inputs, question="q").logits
            stats = vitcompress.stats(model)
            got_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False, question="q")
        finally:
            vitcompress.restore(model)
    assert seen.features[0] is not None  # the reduced path ran (features, not pixels, reached the model)
    assert stats["visual_tokens_after"] == stats["visual_tokens_before"] == 9 * T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_tokens, want_tokens)


@pytest.mark.slow
def test_beam_search_expands_each_rows_features(model):
    """num_beams=2: keeping every token gives the model's beams; reducing (the images keep different
    numbers of tokens), each beam of a row gets that row's features and the row's beams alone."""
    inputs = internvl_inputs()
    beams = dict(max_new_tokens=3, do_sample=False, num_beams=2)
    with torch.no_grad():
        want = model.generate(**inputs, **beams)
        vitcompress.compress(model, "tokencorr", **KEEP_ALL["tokencorr"])
        try:
            got = model.generate(**inputs, **beams)
            vitcompress.compress(model, "tokencorr")
            with LMInput(model) as seen:
                model(**inputs)
                batch = model.generate(**inputs, **beams)
            alone = [model.generate(**row_alone(inputs, b, first), **beams) for b, first in ((0, 0), (1, 3))]
        finally:
            vitcompress.restore(model)
    assert torch.equal(got, want)
    rows = seen.features[0].flatten(0, -2).split([sum(r) for r in image_runs(seen.ids[0])])
    assert torch.equal(seen.features[1].flatten(0, -2), torch.cat([rows[0], rows[0], rows[1], rows[1]]))
    for b in range(2):
        assert torch.equal(batch[b, -3:], alone[b][0, -3:])


@pytest.mark.parametrize("method", ["tokencorr", "quota"])
def test_placeholders_match_the_features_in_a_batch_of_different_tile_counts(model, method):
    """Rows of 3 tiles and of 1 + 5 tiles: each image's run of placeholders is as long as the
    tokens it kept (its local tiles' plus the whole thumbnail), the LM gets exactly that many
    features, and generate's prefill sees the same prompt (KV cache or not: the same tokens)."""
    inputs = internvl_inputs()
    vitcompress.compress(model, method, **REDUCE[method])
    try:
        with torch.no_grad(), LMInput(model) as seen:
            logits = model(**inputs, question="q").logits
        stats = vitcompress.stats(model)
        with LMInput(model) as gen_seen:
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, question="q")
        no_cache = model.generate(**inputs, max_new_tokens=4, do_sample=False, question="q", use_cache=False)
    finally:
        vitcompress.restore(model)
    units = stats["image"]
    runs = [n for row in image_runs(seen.ids[0]) for n in row]
    assert runs == [u["tokens_after"] for u in units]
    assert seen.features[0].reshape(-1, seen.features[0].shape[-1]).shape[0] == sum(runs)
    assert [u["tokens_before"] for u in units] == [3 * T, T, 5 * T]
    assert stats["visual_tokens_after"] < stats["visual_tokens_before"]
    for unit, tiles in zip(units, (3, 1, 5)):
        thumbnail = T if tiles > 1 else 0
        if method == "tokencorr":  # local tiles are crops, the thumbnail is kept whole
            assert [c["crop"] for c in unit["crops"]] == list(range(tiles - (tiles > 1)))
            assert unit["tokens_after"] == unit["budget"] + thumbnail and unit["cls_tokens"] == thumbnail
        else:  # local tiles are frames, the thumbnail rides along whole
            assert unit["extra_tokens"] == thumbnail
            assert unit["tokens_after"] == sum(unit["frame_tokens"][i] for i in unit["frames"]) + thumbnail
    assert torch.equal(gen_seen.ids[0], seen.ids[0]) and len(gen_seen.ids) == 4
    assert all(ids.shape[1] == 1 for ids in gen_seen.ids[1:])
    assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(out[:, inputs["input_ids"].shape[1]], logits[:, -1].argmax(-1))
    assert torch.equal(out, no_cache)


def row_alone(inputs, b, tiles_before):
    """Row ``b`` of a left-padded batch as a batch of one (its tiles start at ``tiles_before``)."""
    keep = inputs["attention_mask"][b] == 1
    tiles = int((inputs["input_ids"][b] == INTERNVL_IMAGE_TOKEN).sum()) // T
    return dict(input_ids=inputs["input_ids"][b][keep][None],
                pixel_values=inputs["pixel_values"][tiles_before:tiles_before + tiles])


@pytest.mark.slow
def test_padded_rows_match_rows_alone(model):
    inputs = internvl_inputs()
    vitcompress.compress(model, "tokencorr", merge=True)
    try:
        with torch.no_grad():
            batch = model(**inputs).logits[:, -1]
            alone = [model(**row_alone(inputs, 0, 0)).logits[0, -1], model(**row_alone(inputs, 1, 3)).logits[0, -1]]
    finally:
        vitcompress.restore(model)
    torch.testing.assert_close(batch, torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_kept_tokens_are_the_projectors_and_the_thumbnail_is_whole(model):
    """What the LM gets for each image: the uncompressed model's projected tokens of each local tile
    at the kept positions (in order), then all T tokens of the thumbnail."""
    inputs = internvl_inputs()
    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # [tiles, T, D]
    vitcompress.compress(model, "tokencorr")
    try:
        with torch.no_grad(), LMInput(model) as seen:
            model(**inputs)
        units = vitcompress.stats(model)["image"]
    finally:
        vitcompress.restore(model)
    expected, first = [], 0
    for unit, tiles in zip(units, (3, 1, 5)):
        for crop in unit["crops"]:
            expected.append(full[first + crop["crop"], crop["kept"]])
        if tiles > 1:
            expected.append(full[first + tiles - 1])
        first += tiles
    got = seen.features[0].reshape(-1, full.shape[-1])
    assert torch.equal(got, torch.cat(expected))
    assert any(0 < c["budget"] < T for u in units for c in u["crops"])  # partial budgets: a real choice


# ---------------------------------------------------------------- the choice, computed independently

def cls_attention_and_keys(model, pixels, layer):
    """Layer ``layer``'s head-averaged [CLS] attention to each patch ``[tiles, N]`` and the patches'
    head-averaged keys ``[tiles, N, d]``, from the tower's hidden states and the layer's own modules."""
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        block = tower.encoder.layer[layer]
        attn = block.attention
        x = block.layernorm_before(hidden)
        q, k = attn.q_norm(attn.q_proj(x)), attn.k_norm(attn.k_proj(x))
    B, L, C = q.shape
    heads = attn.num_heads
    qh, kh = q.reshape(B, L, heads, -1), k.reshape(B, L, heads, -1)
    logits = torch.einsum("bhd,blhd->bhl", qh[:, 0], kh) * attn.scale
    return logits.softmax(-1).mean(1)[:, 1:], kh.mean(2)[:, 1:]


def shuffled_cells(side):
    """Token (i, j) of the pixel-shuffled grid covers patches (2i + a, 2j + b), a-major."""
    return torch.tensor([[(2 * i + a) * side + 2 * j + b for a in (0, 1) for b in (0, 1)]
                         for i in range(side // 2) for j in range(side // 2)])


def test_tokencorr_choice_equals_the_pooled_signals_computed_independently():
    """With q/k norm (InternViT-6B's ``use_qk_norm``): the taps read what the attention multiplies."""
    model = tiny_internvl(use_qk_norm=True)
    inputs = internvl_inputs()
    pixels = inputs["pixel_values"]
    depth, side = INTERNVL_VISION["num_hidden_layers"], INTERNVL_VISION["image_size"] // INTERNVL_VISION["patch_size"]
    deep, keys = cls_attention_and_keys(model, pixels, depth - 1)  # InternVL's defaults: the last layer
    shallow, _ = cls_attention_and_keys(model, pixels, depth // 4)
    cells = shuffled_cells(side)
    deep, shallow = deep[:, cells].sum(-1), shallow[:, cells].sum(-1)  # [tiles, T]
    keys = keys[:, cells].flatten(2)  # [tiles, T, 4 d]
    vitcompress.compress(model, "tokencorr")
    try:
        with torch.no_grad():
            model(**inputs)
        units = vitcompress.stats(model)["image"]
    finally:
        vitcompress.restore(model)
    first, partial = 0, 0
    for unit, tiles in zip(units, (3, 1, 5)):
        for crop in unit["crops"]:
            tile = first + crop["crop"]
            kn = F.normalize(keys[tile], dim=-1)
            similar = ((kn @ kn.T) > 0.9).sum(-1) - 1  # others above tau (a key is similar to itself)
            budget = max(int((similar <= 4).sum()), 1)
            q1, q3 = torch.quantile(deep[tile], torch.tensor([0.25, 0.75]))
            outliers = (deep[tile] > q3 + 1.5 * (q3 - q1)).nonzero().flatten()
            assert crop["budget"] == budget and set(outliers.tolist()) <= set(crop["kept"])
            if outliers.numel() < budget:
                rest = [i for i in range(T) if i not in outliers.tolist()]
                drawn = torch.multinomial(shallow[tile, rest].clamp_min(1e-12), budget - outliers.numel(),
                                          generator=torch.Generator().manual_seed(crop["crop"]))
                assert sorted(crop["kept"]) == sorted(outliers.tolist() + [rest[i] for i in drawn.tolist()])
            partial += budget < T
        first += tiles
    assert partial >= 2


# ---------------------------------------------------------------- QuoTA on a video

def test_quota_assigns_each_frame_its_share_of_a_video(model):
    """A video is a run of one-tile frames (``Frame i: <img>...</img>``); the frames of a sample are
    one video: each frame keeps ``int(budget w_i)`` tokens as a resized grid."""
    inputs = internvl_inputs(images=((1, 1, 1, 1), (1, 1)), frames=True)
    vitcompress.compress(model, "quota", keep=0.5, scorer=ramp_scorer)
    try:
        with torch.no_grad(), LMInput(model) as seen:
            model(**inputs, question="q")
        units = vitcompress.stats(model)["image"]
    finally:
        vitcompress.restore(model)
    runs = image_runs(seen.ids[0])
    for frames, row_runs, row_units in ((4, runs[0], units[:4]), (2, runs[1], units[4:])):
        budget = int(0.5 * frames * T)
        squares = [(100 * p) ** 2 for p in torch.linspace(0.1, 1.0, frames).tolist()]  # ramp_scorer's p
        shares = [int(budget * (s / sum(squares))) for s in squares]
        sides = [min(max(round(n ** 0.5), 1), n) for n in shares]  # square frames: h' = round(sqrt(n))
        grids = [h * (n // h) if n > 0 else 0 for h, n in zip(sides, shares)]
        assert row_units[0]["allocation"] == shares and row_runs == grids
        assert sum(row_runs) <= budget


def test_quota_scores_the_local_tiles_of_each_sample(model):
    """The scorer sees each sample's local tiles, image after image, never a thumbnail."""
    inputs = internvl_inputs()
    seen = []

    def scorer(frames, question):
        seen.append(frames.clone())
        return torch.linspace(0.1, 1.0, len(frames))

    vitcompress.compress(model, "quota", keep=0.5, scorer=scorer)
    try:
        with torch.no_grad():
            model(**inputs, question="q")
    finally:
        vitcompress.restore(model)
    tiles = inputs["pixel_values"]  # row 0: tiles 0, 1 + thumbnail 2; row 1: tile 3, tiles 4-7 + thumbnail 8
    assert torch.equal(seen[0], tiles[[0, 1]]) and torch.equal(seen[1], tiles[[3, 4, 5, 6, 7]])


def test_bf16(model):
    """bf16 weights and pixels: keeping every token reproduces the bf16 model's logits and tokens;
    tokencorr's reduction runs through generate."""
    half = tiny_internvl().to(torch.bfloat16)
    inputs = internvl_inputs()
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        want = half(**inputs).logits
        want_tokens = half.generate(**inputs, max_new_tokens=4, do_sample=False)
        vitcompress.compress(half, "tokencorr", **KEEP_ALL["tokencorr"])
        got = half(**inputs).logits
        got_tokens = half.generate(**inputs, max_new_tokens=4, do_sample=False)
        vitcompress.compress(half, "tokencorr")
        reduced = half(**inputs).logits
        out = half.generate(**inputs, max_new_tokens=4, do_sample=False)
        stats = vitcompress.stats(half)
    assert torch.equal(got, want) and torch.equal(got_tokens, want_tokens)
    assert reduced.dtype == torch.bfloat16 and torch.isfinite(reduced.float()).all()
    assert stats["visual_tokens_after"] < stats["visual_tokens_before"]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("method", ["tokencorr", "quota"])
def test_restore_is_bit_exact(model, method):
    inputs = internvl_inputs()
    with torch.no_grad():
        before = model(**inputs).logits
        gen_before = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        vitcompress.compress(model, method, **REDUCE[method])
        compressed = model(**inputs, question="q").logits
        stats = vitcompress.stats(model)
        vitcompress.restore(model)
        after = model(**inputs).logits
        gen_after = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert stats["visual_tokens_after"] < stats["visual_tokens_before"]
    assert not torch.equal(compressed[:, -1], before[:, -1])
    assert torch.equal(after, before) and torch.equal(gen_after, gen_before)
    assert "generate" not in model.__dict__ and runtime_of(model) is None and not model._forward_pre_hooks
    assert not any(layer.attention.q_norm._forward_hooks or layer.attention.k_norm._forward_hooks
                   for layer in model.model.vision_tower.encoder.layer)


# ---------------------------------------------------------------- refusals

class PerTokenMethod(LlavaMethod):
    name, unit = "per_token_stub", "token"


def test_methods_that_cannot_run_are_refused_naming_those_that_can(model):
    takes = "takes: cdpruner, quota, tokencorr, visionzip"
    with pytest.raises(TypeError, match=f"a transformers.InternVLForConditionalGeneration {takes}"):
        vitcompress.compress(model, "tome", keep=0.8)
    with pytest.raises(TypeError, match=r"per_token_stub cannot reduce an InternVL.*"
                                        r"\(unit 'crop': tokencorr, visionzip, cdpruner\).*"
                                        r"\(unit 'video': quota\)"):
        InternVLAdapter(model).make_runtime(PerTokenMethod(), {}, Budget("keep", 0.5), None)
    fits = vitcompress.supported(model)
    assert fits["tokencorr"] is True and fits["quota"] is True and takes in fits["tome"]
    assert runtime_of(model) is None


def test_visualize_refuses_internvl_with_a_message(model):
    vitcompress.compress(model, "tokencorr")
    try:
        with pytest.raises(TypeError, match="do not draw a transformers.InternVLForConditionalGeneration"):
            vitcompress.visualize.draw(model, internvl_inputs())
    finally:
        vitcompress.restore(model)


def test_placeholders_that_do_not_match_the_tiles_are_refused(model):
    inputs = internvl_inputs()
    inputs["pixel_values"] = inputs["pixel_values"][:-1]
    vitcompress.compress(model, "tokencorr")
    try:
        with pytest.raises(ValueError, match="do not match the 8 tiles of pixel_values"):
            model(**inputs)
    finally:
        vitcompress.restore(model)
