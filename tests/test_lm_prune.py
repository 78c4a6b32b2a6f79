"""Visual tokens dropped inside the language model (fastv, pyramiddrop, dart) on tiny random LLaVA-1.5 and
LLaVA-NeXT models with an 8-layer language model: what every layer and the KV cache see.

The independent reference: dropping tokens before layer K with their original positions is the
uncompressed model in which, from layer K on, no query attends to the dropped tokens. The test
runs the restored model with exactly that mask (`conftest.masking_hooks`, no gathering) and compares the
kept tokens' logits, the generated tokens and the per-step logits of cached decoding.
"""
import copy

import pytest
import torch

import vitcompress
from conftest import dropped_per_layer, masking_hooks
from vitcompress.runtimes.language_model import kept_slots
from vitcompress.testing import llava_inputs, tiny_llava_lm

DEPTH = 8
CASES = [("fastv", {}), ("pyramiddrop", {}), ("dart", dict(keep=0.5))]


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_llava_lm(kind, layers=DEPTH) for kind in ("llava", "next")}


def _visual(inputs):
    return inputs["input_ids"] == 99


@pytest.mark.parametrize("kind", ["llava", "next"])
@pytest.mark.parametrize("method,options", CASES)
def test_kept_tokens_compute_what_the_model_computes_when_the_dropped_are_masked(models, kind, method, options):
    """Logits of the kept tokens == the uncompressed model with the dropped tokens masked from the
    drop layer on; batch of two prompts of different lengths (left padding) and, on NeXT, images of
    different sizes (different visual counts, so invalid slots in the shorter sample)."""
    model = copy.deepcopy(models[kind])
    inputs = llava_inputs(model, kind)
    vitcompress.compress(model, method, **options)
    with torch.no_grad():
        out = model(**inputs).logits
    stats = vitcompress.stats(model)
    vitcompress.restore(model)
    dropped = dropped_per_layer(stats, _visual(inputs), DEPTH)
    handles = masking_hooks(model.model.language_model.layers, dropped)
    with torch.no_grad():
        ref = model(**inputs).logits
    for h in handles:
        h.remove()
    keep = ~dropped[DEPTH - 1]
    index, slot_valid = kept_slots(keep)
    if kind == "next":
        assert not bool(slot_valid.all())  # the samples keep different numbers of tokens
    for b in range(keep.shape[0]):
        torch.testing.assert_close(out[b][slot_valid[b]], ref[b][index[b][slot_valid[b]]], rtol=1e-5, atol=1e-5)


def _generate_cases():
    """Every method on LLaVA-1.5; NeXT and the masked prompt token with fastv, the others marked slow."""
    for method, options in CASES:
        for kind, hole in (("llava", False), ("next", False), ("llava", True)):
            marks = [pytest.mark.slow] if method != "fastv" and (kind == "next" or hole) else []
            yield pytest.param(kind, hole, method, options, marks=marks, id=f"{method}-{kind}{'-hole' * hole}")


@pytest.mark.parametrize("kind,hole,method,options", list(_generate_cases()))
def test_generate_with_the_cache_is_the_masked_model(models, kind, hole, method, options):
    """Cached greedy decoding: the tokens and each step's logits of the masked uncompressed model
    (decoded tokens at their uncompressed positions, each layer's cache columns sliced). ``hole``:
    a prompt token after the image masked out by the caller's attention mask (a column the decoding
    mask must find among each layer's kept columns)."""
    model = copy.deepcopy(models[kind])
    inputs = llava_inputs(model, kind)
    if hole:
        inputs["attention_mask"][0, -2] = 0
    vitcompress.compress(model, method, **options)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    stats = vitcompress.stats(model)
    vitcompress.restore(model)
    handles = masking_hooks(model.model.language_model.layers, dropped_per_layer(stats, _visual(inputs), DEPTH))
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    for h in handles:
        h.remove()
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop"])
def test_keep_all_is_the_uncompressed_model(models, method):
    """keep=1.0: the same generated tokens and the same logits (equal, not close), padded batch."""
    model = copy.deepcopy(models["llava"])
    inputs = llava_inputs(model, "llava")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        ref_logits = model(**inputs).logits
    vitcompress.compress(model, method, keep=1.0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        logits = model(**inputs).logits
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    assert torch.equal(logits, ref_logits)


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "dart"])
def test_every_layer_keeps_sdpa(models, method, monkeypatch):
    """Each language-model layer calls the fused SDPA kernel once per forward (an eager model, or
    a method that switched the model to eager attention, makes none); the config still says sdpa."""
    model = copy.deepcopy(models["llava"])
    inputs = llava_inputs(model, "llava")
    vitcompress.compress(model, method)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(**inputs)
    tower_tokens = 1 + 64  # CLS + 8 x 8 patches
    lm_calls = [c for c in calls if c[2] != tower_tokens]
    assert len(calls) - len(lm_calls) == model.config.vision_config.num_hidden_layers
    assert len(lm_calls) == DEPTH
    assert model.config.text_config._attn_implementation == "sdpa"


def test_restore_is_bit_exact(models):
    model = copy.deepcopy(models["next"])
    inputs = llava_inputs(model, "next")
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


def test_a_language_model_call_without_a_prefill_is_untouched(models):
    """The bare language model, called on its own, runs unchanged (no visual mask was announced)."""
    model = copy.deepcopy(models["llava"])
    lm = model.model.language_model
    embeds = torch.randn(1, 70, 32)
    with torch.no_grad():
        ref = lm(inputs_embeds=embeds).last_hidden_state
        vitcompress.compress(model, "fastv")
        assert torch.equal(lm(inputs_embeds=embeds).last_hidden_state, ref)


def test_beam_search_runs_and_a_static_cache_is_refused(models):
    model = copy.deepcopy(models["llava"])
    inputs = llava_inputs(model, "llava")
    vitcompress.compress(model, "fastv")
    with torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2).shape == (2, 71)
        with pytest.raises(TypeError, match="dynamic cache"):
            model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")


def test_options_are_checked(models):
    model = copy.deepcopy(models["llava"])
    with pytest.raises(ValueError, match="K must be smaller"):
        vitcompress.compress(model, "fastv", layer=DEPTH)
    with pytest.raises(ValueError, match="give K >= 1"):
        vitcompress.compress(model, "fastv", layer=0)
    with pytest.raises(ValueError, match="increasing layers"):
        vitcompress.compress(model, "pyramiddrop", layers=[4, 2])
    with pytest.raises(ValueError, match="takes keep="):
        vitcompress.compress(model, "fastv", r=3)


@pytest.mark.parametrize("kind", ["onevision", pytest.param("next_video", marks=pytest.mark.slow)])
def test_video_families_drop_image_and_video_tokens(kind):
    """NeXT-Video and OneVision (2-layer language model, K=1): image and video placeholders are the
    visual tokens; keep=1.0 generates exactly what the uncompressed model does."""
    from vitcompress.testing import LLAVA_VIDEO_TOKEN, tiny_llava

    model = tiny_llava(kind)
    inputs = llava_inputs(model, kind)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    vitcompress.compress(model, "fastv", layer=1, keep=1.0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences) and all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    vitcompress.compress(model, "fastv", layer=1)
    with torch.no_grad():
        model(**inputs)
    visual = torch.isin(inputs["input_ids"], torch.tensor([99, LLAVA_VIDEO_TOKEN])).sum(1).tolist()
    assert vitcompress.stats(model)["stages"][0]["visual_tokens"] == [round(n * 0.5) for n in visual]
