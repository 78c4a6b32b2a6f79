"""Visual tokens dropped inside the language model (fastv, pyramiddrop, dart) on a tiny random InternVL
(InternViT tower, 8-layer Qwen2 language model): a left-padded batch of a row with one image of 3 tiles
and a row with images of 1 and 5 tiles (48 and 96 image tokens; the 3- and 5-tile images end with
their thumbnail).

The thumbnail: every image token of the prompt is a candidate, the thumbnails' included, as the
official FastV ranks every image token it finds (the language model's own attention decides; sparing
the thumbnail would change the budget the paper states). ``test_fastv_selection_is_the_models_own_attention``
checks the kept set against the eager model's attention over all image tokens.

The independent reference, as in ``test_lm_prune.py``: the restored model in which, from each
layer on, no query attends to the tokens dropped before it (``conftest.masking_hooks``).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import vitcompress
from conftest import assert_equals_masked_model, dropped_per_layer, masking_hooks
from vitcompress.testing import (INTERNVL_IMAGE_TOKEN, INTERNVL_TILE_TOKENS, internvl_inputs,
                                 tiny_internvl_lm)

DEPTH = 8
TOWER_TOKENS = 1 + 64  # InternViT: [CLS] + 8 x 8 patches per tile


@pytest.fixture(scope="module")
def model():
    return tiny_internvl_lm(layers=DEPTH)


def _visual(inputs):
    return inputs["input_ids"] == INTERNVL_IMAGE_TOKEN


def _generate(model, inputs, steps=5):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


@pytest.mark.parametrize("method", ["fastv", pytest.param("dart", marks=pytest.mark.slow)])
def test_keep_all_is_the_uncompressed_model(model, method):
    """keep=1.0: the same prefill logits and generated tokens / per-step logits (equal, not close)."""
    model = copy.deepcopy(model)
    inputs = internvl_inputs()
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref = _generate(model, inputs)
    options = dict(max_kept=10**6) if method == "dart" else dict(keep=1.0)
    vitcompress.compress(model, method, **options)
    with torch.no_grad():
        logits = model(**inputs).logits
    out = _generate(model, inputs)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "dart"])
def test_kept_tokens_and_decoding_are_the_masked_model(model, method):
    """Default budget: each drop layer keeps the planned visual tokens of each row (images of 3 and
    1 + 5 tiles: different counts, so padded slots); the kept tokens' prefill logits, the generated
    tokens and each decoding step's logits (KV cache) are those of the uncompressed model with the
    dropped tokens masked from their drop layer on."""
    model = copy.deepcopy(model)
    inputs = internvl_inputs()
    visual = _visual(inputs)
    vitcompress.compress(model, method)
    with torch.no_grad():
        logits = model(**inputs).logits
    out = _generate(model, inputs)
    stats = vitcompress.stats(model)
    vitcompress.restore(model)

    counts = visual.sum(1).tolist()
    assert counts == [3 * INTERNVL_TILE_TOKENS, 6 * INTERNVL_TILE_TOKENS]  # thumbnails' tokens included
    assert stats["visual_tokens_before"] == sum(counts)
    kept = [s["visual_tokens"] for s in stats["stages"]]
    if method == "fastv":
        assert stats["drop_layers"] == [2] and kept == [[round(n * 0.5) for n in counts]]
    elif method == "pyramiddrop":
        assert stats["drop_layers"] == [2, 4, 6]
        assert kept == [[int(n * 0.5 ** (s + 1)) for n in counts] for s in range(3)]
    else:  # 4 image + 3 text pivots (</img> and two words follow the last image), each choosing floor(0.222 N / 7)
        assert stats["drop_layers"] == [2] and kept == [[4 + 7 * int(0.222 * n / 7) for n in counts]]
    for stage in stats["stages"]:  # only visual tokens are dropped
        assert all(bool(visual[b, idx].all()) for b, idx in enumerate(stage["kept"]))

    assert_equals_masked_model(model, inputs, stats, visual, DEPTH, logits, out, _generate)


def test_fastv_selection_is_the_models_own_attention(model):
    """The kept set is, per row, the round(0.5 * N) image tokens (thumbnails included) that the last
    token attends to most in layer K - 1 = 1, averaged over the heads, as the eager model reports its
    attention (``output_attentions``, the official FastV's source)."""
    inputs = internvl_inputs()
    visual = _visual(inputs)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attention = eager(**inputs, output_attentions=True).attentions[1]  # [B, H, T, T]
    received = attention[:, :, -1].mean(1)
    compressed = copy.deepcopy(model)
    vitcompress.compress(compressed, "fastv")
    with torch.no_grad():
        compressed(**inputs)
    (stage,) = vitcompress.stats(compressed)["stages"]
    for b in range(visual.shape[0]):
        candidates = visual[b].nonzero()[:, 0]
        top = candidates[received[b, candidates].topk(round(0.5 * len(candidates))).indices]
        assert sorted(stage["kept"][b].tolist()) == sorted(top.tolist())
    thumbnail = torch.arange(visual.shape[1])[visual[1]][-INTERNVL_TILE_TOKENS:]  # row 1's 5-tile image's last tile
    assert 0 < int(torch.isin(thumbnail, stage["kept"][1]).sum()) < INTERNVL_TILE_TOKENS  # ranked like the others


def _mask_as(kind):
    """A pre-hook turning an eager layer's additive mask into a bool one (``kind=bool``) or back."""
    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        if kind is bool:
            return args, dict(kwargs, attention_mask=mask == 0)
        blocked = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        return args, dict(kwargs, attention_mask=blocked)
    return hook


def eager_masking_hooks(layers, dropped):
    """``conftest.masking_hooks`` on an eager model, whose masks are additive floats."""
    handles = [layer.register_forward_pre_hook(_mask_as(bool), with_kwargs=True) for layer in layers]
    handles += masking_hooks(layers, dropped)
    return handles + [layer.register_forward_pre_hook(_mask_as(float), with_kwargs=True) for layer in layers]


def test_pyramiddrop_stages_rank_by_the_masked_models_own_attention(model):
    """At each stage boundary L (2, 4, 6) a row keeps the int(N * 0.5^(s+1)) image tokens still present
    that the last token attends to most in layer L itself, as the eager model reports it with the tokens
    of the earlier stages masked (``masking_hooks``), averaged over the heads."""
    inputs = internvl_inputs()
    visual = _visual(inputs)
    compressed = copy.deepcopy(model)
    vitcompress.compress(compressed, "pyramiddrop")
    with torch.no_grad():
        compressed(**inputs)
    stats = vitcompress.stats(compressed)
    dropped = dropped_per_layer(stats, visual, DEPTH)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    for s, stage in enumerate(stats["stages"]):
        layer = stage["layer"]
        before = {i: dropped[min(i, layer - 1)] for i in range(DEPTH)}  # only the earlier stages' drops
        handles = eager_masking_hooks(eager.model.language_model.layers, before)
        with torch.no_grad():
            received = eager(**inputs, output_attentions=True).attentions[layer][:, :, -1].mean(1)
        for h in handles:
            h.remove()
        for b in range(visual.shape[0]):
            candidates = (visual[b] & ~before[layer][b]).nonzero()[:, 0]
            count = int(int(visual[b].sum()) * 0.5 ** (s + 1))
            top = candidates[received[b, candidates].topk(count).indices]
            assert sorted(stage["kept"][b].tolist()) == sorted(top.tolist()), (layer, b)


def test_dart_keeps_what_its_rule_gives_on_the_models_own_states(model):
    """DART at K = 2: per row the 4 image tokens and the (up to) 4 text tokens after the last image with
    the largest L1 norm of their layer-1 keys (rotary applied, from the layer's own modules and the
    rotary embeddings it receives), then, pivot after pivot in the official set order, the
    floor(0.222 N / pivots) remaining image tokens least cosine-similar to it in the layer-1 output
    through the model's output norm (its weight drawn here: at its initial ones the norm would not change
    a cosine)."""
    inputs = internvl_inputs()
    visual = _visual(inputs)
    model = copy.deepcopy(model)
    lm = model.model.language_model
    lm.norm.weight.data = torch.rand(lm.norm.weight.shape, generator=torch.Generator().manual_seed(1)) + 0.1
    seen = {}

    def grab(name):
        def hook(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"], kwargs.get("position_embeddings"))
        return hook

    handles = [lm.layers[1].register_forward_pre_hook(grab("in"), with_kwargs=True),
               lm.layers[2].register_forward_pre_hook(grab("out"), with_kwargs=True)]
    with torch.no_grad():
        model(**inputs)
        for h in handles:
            h.remove()
        hidden, (cos, sin) = seen["in"]
        attn = lm.layers[1].self_attn
        k = attn.k_proj(lm.layers[1].input_layernorm(hidden)).view(*hidden.shape[:2], -1, attn.head_dim)
        half = k.shape[-1] // 2
        k = k * cos[:, :, None] + torch.cat([-k[..., half:], k[..., :half]], dim=-1) * sin[:, :, None]
        norms = k.flatten(2).abs().sum(-1)  # the key heads once: the same order as repeated to the query heads
        states = F.normalize(lm.norm(seen["out"][0]), dim=-1)
    compressed = copy.deepcopy(model)
    vitcompress.compress(compressed, "dart")
    with torch.no_grad():
        compressed(**inputs)
    (stage,) = vitcompress.stats(compressed)["stages"]
    positions = torch.arange(visual.shape[1])
    for b in range(visual.shape[0]):
        image = positions[visual[b]]
        text = positions[inputs["attention_mask"][b].bool() & ~visual[b] & (positions > image.max())]
        image_pivots = image[norms[b, image].topk(4).indices].tolist()
        text_pivots = text[norms[b, text].topk(min(4, len(text))).indices].tolist()
        per_pivot = int(len(image) * 0.222 // (len(image_pivots) + len(text_pivots)))
        first = int(inputs["attention_mask"][b].nonzero()[0, 0])
        kept, left = list(image_pivots), [p for p in image.tolist() if p not in image_pivots]
        for pivot in [first + p for p in set(p - first for p in image_pivots + text_pivots)]:
            similarity = states[b, left] @ states[b, pivot]
            take = [left[i] for i in similarity.argsort()[:per_pivot].tolist()]
            kept += take
            left = [p for p in left if p not in take]
        assert sorted(stage["kept"][b].tolist()) == sorted(kept)


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "dart"])
def test_every_language_model_layer_keeps_sdpa(model, method, monkeypatch):
    """One fused SDPA call per language-model layer, the scoring one included, on fewer tokens from the
    first drop layer on (an eager model, or a method that switched it to eager, makes none); the config
    still says sdpa."""
    model = copy.deepcopy(model)
    inputs = internvl_inputs()
    vitcompress.compress(model, method)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(**inputs)
    lm_tokens = [c[2] for c in calls if c[2] != TOWER_TOKENS]
    assert len(calls) - len(lm_tokens) == model.config.vision_config.num_hidden_layers
    length = inputs["input_ids"].shape[1]
    first = vitcompress.stats(model)["drop_layers"][0]
    assert len(lm_tokens) == DEPTH and lm_tokens[:first] == [length] * first
    assert all(n < length for n in lm_tokens[first:])
    assert model.config.text_config._attn_implementation == "sdpa"


def test_restore_is_bit_exact(model):
    model = copy.deepcopy(model)
    inputs = internvl_inputs()
    with torch.no_grad():
        before = model(**inputs).logits
    hooks = [len(layer._forward_pre_hooks) for layer in model.model.language_model.layers]
    vitcompress.compress(model, "pyramiddrop")
    with torch.no_grad():
        compressed = model(**inputs).logits
        assert compressed.shape[1] < before.shape[1]
        assert torch.equal(copy.deepcopy(model)(**inputs).logits, compressed)  # the copy carries its own hooks
    vitcompress.restore(model)
    assert [len(layer._forward_pre_hooks) for layer in model.model.language_model.layers] == hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_supported_lists_the_language_model_methods(model):
    fits = vitcompress.supported(model)
    assert all(fits[m] is True for m in ("fastv", "pyramiddrop", "dart", "tokencorr"))
