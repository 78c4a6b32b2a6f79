"""Visual tokens dropped inside the language model (fastv, pyramiddrop, dart) on tiny random Qwen2-VL,
Qwen2.5-VL and Qwen3-VL models with an 8-layer language model: a left-padded batch of two prompts,
each with an image of its own size and a video (both modalities' placeholders are visual tokens).

The independent reference, as in ``test_lm_prune.py``: the restored model in which, from each
layer on, no query attends to the tokens dropped before it (a pre-hook that only blocks mask
columns: no gathering, positions, M-RoPE and DeepStack all the model's own).
"""
import copy

import pytest
import torch

import vitcompress
from conftest import assert_equals_masked_model, dropped_per_layer
from vitcompress.runtimes.language_model import kept_slots
from vitcompress.testing import QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, qwen_vl_inputs, tiny_qwen_vl

DEPTH = 8
KINDS = ("qwen2", "qwen2_5", "qwen3")
LM_HEADS = 4  # the tiny language model's query heads (the tower has 2)


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_qwen_vl(kind, layers=DEPTH) for kind in KINDS}


def _visual(inputs):
    return torch.isin(inputs["input_ids"], torch.tensor([QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN]))


def _generate(model, inputs, steps=5):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


def _cases(fast):
    """Every method on every version; those not in ``fast`` marked slow."""
    for method in ("fastv", "pyramiddrop", "dart"):
        for kind in KINDS:
            marks = [] if (method, kind) in fast else [pytest.mark.slow]
            yield pytest.param(kind, method, marks=marks, id=f"{method}-{kind}")


FASTV = {("fastv", kind) for kind in KINDS}


@pytest.mark.parametrize("kind,method", list(_cases(FASTV | {("pyramiddrop", "qwen2_5"), ("dart", "qwen3")})))
def test_keep_all_is_the_uncompressed_model(models, kind, method):
    """keep=1.0: the same prefill logits and generated tokens / per-step logits (equal, not close)."""
    model = copy.deepcopy(models[kind])
    inputs = qwen_vl_inputs(model, kind)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref = _generate(model, inputs)
    vitcompress.compress(model, method, keep=1.0)
    with torch.no_grad():
        logits = model(**inputs).logits
    out = _generate(model, inputs)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


@pytest.mark.parametrize("kind,method", list(_cases(FASTV | {("pyramiddrop", "qwen3"), ("dart", "qwen2")})))
def test_kept_tokens_and_decoding_are_the_masked_model(models, kind, method):
    """Default budget: each drop layer keeps the planned visual tokens of each sample; the kept
    tokens' prefill logits, the generated tokens and each decoding step's logits are those of the
    uncompressed model with the dropped tokens masked from their drop layer on."""
    model = copy.deepcopy(models[kind])
    inputs = qwen_vl_inputs(model, kind)
    visual = _visual(inputs)
    vitcompress.compress(model, method)
    with torch.no_grad():
        logits = model(**inputs).logits
    out = _generate(model, inputs)
    stats = vitcompress.stats(model)
    vitcompress.restore(model)

    counts = visual.sum(1).tolist()
    assert stats["visual_tokens_before"] == sum(counts)
    kept = [s["visual_tokens"] for s in stats["stages"]]
    if method == "fastv":
        assert stats["drop_layers"] == [2] and kept == [[round(n * 0.5) for n in counts]]
    elif method == "pyramiddrop":
        assert stats["drop_layers"] == [2, 4, 6]
        assert kept == [[int(n * 0.5 ** (s + 1)) for n in counts] for s in range(3)]
    else:
        assert stats["drop_layers"] == [2] and all(0 < k < n for k, n in zip(kept[0], counts))
    for stage in stats["stages"]:  # only visual tokens are dropped
        assert all(bool(visual[b, idx].all()) for b, idx in enumerate(stage["kept"]))

    assert_equals_masked_model(model, inputs, stats, visual, DEPTH, logits, out, _generate)


def test_every_layer_keeps_sdpa_and_reads_fewer_tokens_after_the_drop(models, monkeypatch):
    """One fused SDPA call per language-model layer, on fewer tokens after the drop; a later layer
    gets the kept tokens' rotary embeddings and text positions (``position_ids [B, T']``, what a
    flash-attention layer reads) as the first layer got them. The prefill of ``generate``: its 4-row
    positions (text row first) give the layers the text row; a forward's 3-row ones give them None."""
    model = copy.deepcopy(models["qwen2_5"])
    inputs = qwen_vl_inputs(model, "qwen2_5")
    vitcompress.compress(model, "fastv")
    seen = {}
    layers = model.model.language_model.layers
    for i in (0, DEPTH - 1):  # registered after compress's hooks: they see what the layer gets
        layers[i].register_forward_pre_hook(lambda m, a, kw, i=i: seen.setdefault(i, kw) and None,
                                           with_kwargs=True)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)  # the prefill only
    lm_tokens = [c[2] for c in calls if c[1] == LM_HEADS]
    length = inputs["input_ids"].shape[1]
    kept = vitcompress.stats(model)["stages"][0]["visual_tokens"]
    shorter = max(length - n + k for n, k in zip(_visual(inputs).sum(1).tolist(), kept))  # padded to the longest
    assert lm_tokens == [length] * 2 + [shorter] * (DEPTH - 2)
    index = kept_slots(~dropped_per_layer(vitcompress.stats(model), _visual(inputs), DEPTH)[DEPTH - 1])[0]
    first, last = seen[0], seen[DEPTH - 1]
    assert first["position_ids"].shape == inputs["input_ids"].shape
    assert torch.equal(last["position_ids"], first["position_ids"].gather(1, index))
    for a, b in zip(last["position_embeddings"], first["position_embeddings"]):
        assert torch.equal(a, b.gather(1, index[..., None].expand(-1, -1, b.shape[-1])))
    assert model.config.text_config._attn_implementation == "sdpa"


def test_restore_is_bit_exact(models):
    model = copy.deepcopy(models["qwen3"])
    inputs = qwen_vl_inputs(model, "qwen3")
    with torch.no_grad():
        before = model(**inputs).logits
    hooks = [len(layer._forward_pre_hooks) for layer in model.model.language_model.layers]
    vitcompress.compress(model, "fastv")
    with torch.no_grad():
        compressed = model(**inputs).logits
        assert compressed.shape[1] < before.shape[1]
        assert torch.equal(copy.deepcopy(model)(**inputs).logits, compressed)
    vitcompress.restore(model)
    assert [len(layer._forward_pre_hooks) for layer in model.model.language_model.layers] == hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_qwen3_refuses_a_drop_before_the_last_deepstack_layer(models):
    """The tiny Qwen3-VL adds DeepStack features after layers 0 and 1: a drop at layer 1 is refused."""
    model = copy.deepcopy(models["qwen3"])
    with pytest.raises(ValueError, match="DeepStack"):
        vitcompress.compress(model, "fastv", layer=1)
    with pytest.raises(ValueError, match="DeepStack"):
        vitcompress.compress(model, "pyramiddrop", layers=[1, 4])
    vitcompress.compress(model, "fastv", layer=1 + 1)  # right after the last DeepStack layer


def test_images_only_and_other_methods_still_refused(models):
    model = copy.deepcopy(models["qwen2"])
    inputs = qwen_vl_inputs(model, "qwen2", video=False)
    vitcompress.compress(model, "fastv")
    with torch.no_grad():
        model(**inputs)
    counts = _visual(inputs).sum(1).tolist()
    assert vitcompress.stats(model)["stages"][0]["visual_tokens"] == [round(n * 0.5) for n in counts]
    with pytest.raises(TypeError, match="reduces vit models"):  # every VLM method now runs on Qwen-VL
        vitcompress.compress(model, "tome")
