"""visionzip and cdpruner on a tiny random InternVL (InternViT with a [CLS] token, 2 x 2 patches per token
after the pixel shuffle, 16 tokens per tile): a left-padded batch of a row with one image of 3 tiles and a
row with images of 1 and 5 tiles (the 3- and 5-tile images end with their thumbnail).

Neither official repository has an InternVL variant (VisionZip patches CLIP-LLaVA's tower, CDPruner
LLaVA's ``encode_images`` with a CLIP text tower), and their code does not run on transformers' InternVL,
so the selection is checked against a computation written here: the eager tower's own attention
(``output_attentions``), its keys recomputed from the last layer's modules, and the 2 x 2 token cells
written out (not the model's ``pixel_shuffle``). Every tile is reduced alike, the thumbnail included, as
the official code reduces LLaVA-NeXT's base image (the global view) like its grid crops.
"""
import copy
import types

import pytest
import torch
import torch.nn.functional as F

import vitcompress
from vitcompress.testing import INTERNVL_IMAGE_TOKEN, char_tokenizer, internvl_inputs, tiny_internvl

T, SIDE = 16, 8  # tokens per tile, patches per tile side
QUESTIONS = ["a red car", "the small print on the left"]
VZ = {"dominant": 5, "contextual": 3}


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


def hashed_text_scorer(features, question):
    """A random-weight stand-in for a text encoder: the tokens' cosine with a vector drawn from the question."""
    g = torch.Generator().manual_seed(sum(map(ord, question)))
    return F.normalize(features, dim=-1) @ F.normalize(torch.randn(features.shape[-1], generator=g), dim=0)


def cells():
    """Token (i, j) of a tile's 4 x 4 token grid: patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)."""
    return torch.tensor([[(2 * i + a) * SIDE + 2 * j + b for a in (0, 1) for b in (0, 1)]
                         for i in range(SIDE // 2) for j in range(SIDE // 2)])


def tower_signals(model, pixels):
    """Per tile and token: [CLS] attention (the eager last layer's, averaged over heads, summed over the
    token's patches), key (its patches' head-averaged keys concatenated) and features before the projector."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    tower = eager.model.vision_tower
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        layer = tower.encoder.layer[-1]
        attn = layer.attention
        keys = attn.k_norm(attn.k_proj(layer.layernorm_before(out.hidden_states[-2])))[:, 1:]
    cls = out.attentions[-1][:, :, 0, 1:].mean(1)
    keys = keys.reshape(*keys.shape[:2], attn.num_heads, -1).mean(2)
    c = cells()
    return cls[:, c].sum(-1), keys[:, c].flatten(2), out.last_hidden_state[:, 1:][:, c].flatten(2)


def visionzip_written_here(attention, keys, features, dominant, contextual):
    """One tile: the dominant tokens (ascending), targets, the target each other token joined, and the tokens."""
    top = sorted(attention.topk(dominant).indices.tolist())
    rest = [t for t in range(len(attention)) if t not in top]
    targets = rest[::max(1, len(rest) // contextual)][:contextual]
    unit = F.normalize(keys, dim=-1)
    joined = {t: targets[int((unit[targets] @ unit[t]).argmax())] for t in rest if t not in targets}
    context = [features[g] + (torch.stack([features[t] for t, to in joined.items() if to == g]).mean(0)
                              if g in joined.values() else 0) for g in targets]
    return top, targets, joined, torch.cat([features[top], torch.stack(context)])


def greedy_determinant(kernel, tokens):
    """Greedy MAP of a DPP by brute force: each step adds the token that maximises det(L[S, S])."""
    chosen = []
    for _ in range(tokens):
        gains = [float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]].double())) if j not in chosen
                 else -float("inf") for j in range(kernel.shape[0])]
        chosen.append(max(range(len(gains)), key=gains.__getitem__))
    return sorted(chosen)


def features_seen(model, inputs, **kwargs):
    """The visual tokens the compressed model hands its language model ``[tokens, D]``, and its stats."""
    seen = {}

    def grab(module, args, kw):
        seen["features"] = kw["mm_encoder_outputs"]["image"].pooler_output.flatten(0, -2)
        seen["ids"] = kw["input_ids"]

    handle = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, **kwargs)
    finally:
        handle.remove()
    return seen, vitcompress.stats(model)


def tiles_of(inputs):
    return [3, 1, 5]  # internvl_inputs()'s images, in prompt order


def noise_inputs():
    """:func:`internvl_inputs` with noise tiles: no two tokens with equal keys, so no ties in the choice."""
    inputs = internvl_inputs()
    inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(3))
    return inputs


def test_visionzip_keeps_the_tokens_computed_here(model):
    """Per tile (thumbnails included): the 5 dominant tokens by [CLS] attention and 3 contextual tokens
    (target + mean of the tokens that joined it by key cosine), projected by the model's projector."""
    inputs = noise_inputs()
    attention, keys, features = tower_signals(model, inputs["pixel_values"])
    vitcompress.compress(model, "visionzip", **VZ)
    try:
        seen, stats = features_seen(model, inputs)
    finally:
        vitcompress.restore(model)
    assert stats["options"]["layer"] is None  # the layer InternVL projects: the last, as tower_signals reads
    crops = [c for unit in stats["image"] for c in unit["crops"]]
    assert [len(u["crops"]) for u in stats["image"]] == tiles_of(inputs)
    want = []
    for tile, crop in enumerate(crops):
        top, targets, joined, tokens = visionzip_written_here(attention[tile], keys[tile], features[tile], **VZ)
        assert crop["kept"] == top and crop["contextual"] == targets
        assert {t: g for t, g in crop["merged"]} == joined
        with torch.no_grad():
            want.append(model.model.multi_modal_projector(tokens))
    torch.testing.assert_close(seen["features"], torch.cat(want), rtol=1e-5, atol=1e-5)


def test_cdpruner_keeps_the_tokens_computed_here(model):
    """Per tile (thumbnails included): 4 tokens by the greedy determinant of r_i cos(f_i, f_j) r_j, f the
    uncompressed model's projected tokens, r the scorer's similarity on the tokens' features before the
    projector, negated and min-max normalised over the image; each row's own question."""
    inputs = noise_inputs()
    _, _, features = tower_signals(model, inputs["pixel_values"])
    with torch.no_grad():
        projected = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    vitcompress.compress(model, "cdpruner", tokens=4, scorer=hashed_text_scorer)
    try:
        seen, stats = features_seen(model, inputs, question=QUESTIONS)
    finally:
        vitcompress.restore(model)
    want, first = [], 0
    for image, tiles in enumerate(tiles_of(inputs)):
        span = slice(first, first + tiles)
        first += tiles
        s = -hashed_text_scorer(features[span], QUESTIONS[min(image, 1)])
        r = (s - s.min() + 1e-6) / (s.max() - s.min())
        kept = []
        for tile in range(tiles):
            f = F.normalize(projected[span][tile], dim=-1)
            kernel = r[tile][:, None] * (f @ f.T) * r[tile][None, :]
            kept.append(greedy_determinant(kernel, 4))
            want.append(projected[span][tile][kept[-1]])
        assert stats["image"][image]["kept"] == kept
    torch.testing.assert_close(seen["features"], torch.cat(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,options,per_tile", [("visionzip", VZ, 8),
                                                     ("cdpruner", dict(tokens=4, scorer=hashed_text_scorer), 4)])
def test_budget_generate_fused_attention_and_exact_restore(model, method, options, per_tile, monkeypatch):
    """Images of 3, 1 and 5 tiles: each keeps its tiles times the budget and its run of placeholders is that
    long; generate() with the KV cache = without it, and starts with the caller's prompt; the tower and the
    language model make as many SDPA calls as uncompressed (nothing switched to eager); restore is exact."""
    inputs = internvl_inputs()
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        before = model(**inputs).logits
    plain_calls = len(calls)
    gen_before = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    vitcompress.compress(model, method, **options)
    try:
        calls.clear()
        seen, stats = features_seen(model, inputs, question=QUESTIONS)
        compressed_calls = len(calls)
        out = model.generate(**inputs, question=QUESTIONS, max_new_tokens=3, do_sample=False)
        no_cache = model.generate(**inputs, question=QUESTIONS, max_new_tokens=3, do_sample=False, use_cache=False)
    finally:
        vitcompress.restore(model)
    assert compressed_calls == plain_calls > 0
    assert model.config.text_config._attn_implementation == model.config.vision_config._attn_implementation == "sdpa"
    kept = [per_tile * t for t in tiles_of(inputs)]
    assert [u["tokens_after"] for u in stats["image"]] == kept
    assert [u["tokens_before"] for u in stats["image"]] == [T * t for t in tiles_of(inputs)]
    assert (seen["ids"] == INTERNVL_IMAGE_TOKEN).sum(1).tolist() == [kept[0], kept[1] + kept[2]]
    assert seen["features"].shape[0] == sum(kept)
    assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(out, no_cache)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), gen_before)


def test_cdpruner_clip_is_refused_saying_why(model):
    clip = types.SimpleNamespace(get_text_features=None, visual_projection=None, vision_model=None)
    with pytest.raises(ValueError, match="InternViT has none .* pass scorer="):
        vitcompress.compress(model, "cdpruner", clip=clip, tokenizer=char_tokenizer)
    with pytest.raises(ValueError, match="need more than the 16 tokens of a tile"):
        vitcompress.compress(model, "visionzip", dominant=14, contextual=3)
        try:
            with torch.no_grad():
                model(**internvl_inputs())
        finally:
            vitcompress.restore(model)
    assert vitcompress.supported(model)["visionzip"] is True and vitcompress.supported(model)["cdpruner"] is True
