"""visionzip and cdpruner on Qwen2-VL / Qwen2.5-VL / Qwen3-VL (tiny random models): kept counts as the
budget says, videos unchanged, M-RoPE positions of the kept tokens, generate() with the KV cache, the
model's fused attention kept, exact restore, a batch of two image sizes against each row alone,
Qwen3-VL's DeepStack features reduced with the tokens, bf16 (the official selections:
test_official_qwen_visionzip_cdpruner)."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_qwen_vl import BaseInputs, row_alone, unit_columns

import vitcompress
from vitcompress.methods import cdpruner
from vitcompress.testing import QWEN_IMAGE_TOKEN, QWEN_KINDS, qwen_char_tokenizer, qwen_vl_inputs, tiny_qwen_vl

QUESTION = "what is on the left?"
METHODS = ("visionzip", "cdpruner")


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_qwen_vl(kind) for kind in QWEN_KINDS}


def options(model, method):
    if method == "visionzip":
        return dict(dominant=6, contextual=2, layer=-1)
    return dict(tokens=8, scorer=cdpruner.embedding_scorer(model.get_input_embeddings(), qwen_char_tokenizer))


def image_positions(model, inputs, call, stats):
    """Each image's new placeholder columns' 3-D positions, and the uncompressed prompt's positions at
    the columns of the tokens they stand for (``sources``)."""
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs.get("image_grid_thw"),
                                         video_grid_thw=inputs.get("video_grid_thw"),
                                         attention_mask=inputs["attention_mask"])
    old = unit_columns(inputs["input_ids"], QWEN_IMAGE_TOKEN, [u["tokens_before"] for u in stats["image"]])
    new = unit_columns(call["input_ids"], QWEN_IMAGE_TOKEN, [u["tokens_after"] for u in stats["image"]])
    return [(call["position_ids"][:, b, cols_new], full[:, b, cols_old[torch.tensor(unit["sources"])]])
            for unit, (b, cols_old), (_, cols_new) in zip(stats["image"], old, new)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_budget_positions_generate_fused_attention_and_exact_restore(models, kind, method, monkeypatch):
    model = models[kind]
    inputs = qwen_vl_inputs(model, kind)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        original = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        calls.clear()
        before = model(**inputs).logits
    full_deltas = model.model.rope_deltas.clone()
    plain_calls = len(calls)
    gen_before = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    vitcompress.compress(model, method, **options(model, method))
    try:
        calls.clear()
        with torch.no_grad(), BaseInputs(model) as seen:
            logits = model(**inputs, question=QUESTION).logits
            compressed_calls = len(calls)
            deltas = model.model.rope_deltas.clone()
            out = model.generate(**inputs, question=QUESTION, max_new_tokens=3, do_sample=False)
            no_cache = model.generate(**inputs, question=QUESTION, max_new_tokens=3, do_sample=False, use_cache=False)
        stats = vitcompress.stats(model)
    finally:
        vitcompress.restore(model)
    # the model's attention stays fused (tower and language model): as many SDPA calls as the uncompressed forward
    assert compressed_calls == plain_calls > 0
    assert [u["tokens_after"] for u in stats["image"]] == [8, 8]
    assert [u["tokens_before"] for u in stats["image"]] == [24, 16]
    assert all(u["tokens_after"] == u["tokens_before"] for u in stats["video"])  # videos pass unchanged
    call = seen.calls[0]
    assert int((call["input_ids"] == QWEN_IMAGE_TOKEN).sum()) == 16
    for new, old in image_positions(model, inputs, call, stats):  # each token at its own (target's) position
        assert torch.equal(new, old)
    for unit, features, image in zip(stats["image"], call["features"]["image"], original):
        kept = len(unit["kept"])  # dominant tokens (visionzip) or all (cdpruner): the model's own tokens
        torch.testing.assert_close(features[:kept], image[unit["sources"][:kept]], atol=1e-5, rtol=1e-5)
    # decoding continues at the uncompressed positions; generate: the caller's prompt, then tokens; the cache
    # changes nothing
    full_len, new_len = inputs["attention_mask"].sum(-1), call["attention_mask"].sum(-1)
    assert torch.equal(deltas[:, 0] + new_len, full_deltas[:, 0] + full_len)
    assert torch.equal(seen.calls[1]["input_ids"], call["input_ids"])
    assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(out[:, inputs["input_ids"].shape[1]], logits[:, -1].argmax(-1))
    assert torch.equal(out, no_cache)
    # restore: no hook left, the same outputs bit for bit
    assert not model._forward_pre_hooks and "generate" not in model.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), gen_before)


def test_visionzip_contextual_tokens_are_the_target_plus_the_mean_of_the_joined(models):
    """Each contextual token is the merger of its target's patch features plus the mean of those of the
    tokens that joined it (the official formula before the projector); Qwen3-VL's DeepStack features of
    every token follow the same rule."""
    model = models["qwen3"]
    inputs = qwen_vl_inputs(model, "qwen3", video=False)
    merger_in, seen = {}, []
    hook = model.model.visual.merger.register_forward_pre_hook(lambda m, a: merger_in.setdefault("x", a[0]))
    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    hook.remove()
    grab = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["mm_encoder_outputs"]["image"]),
                                                 with_kwargs=True)
    vitcompress.compress(model, "visionzip", **options(model, "visionzip"))
    try:
        with torch.no_grad():
            model(**inputs)
        stats = vitcompress.stats(model)
    finally:
        vitcompress.restore(model)
        grab.remove()
    patches = merger_in["x"].split(inputs["image_grid_thw"].prod(-1).tolist())
    for i, unit in enumerate(stats["image"]):
        hidden = patches[i].reshape(-1, 4, patches[i].shape[-1])
        deepstack = [d[i] for d in full.deepstack_features]
        joined = torch.tensor(unit["merged"])
        for c, target in enumerate(unit["contextual"]):
            members = joined[joined[:, 1] == target, 0]
            expect_hidden = hidden[target] + (hidden[members].mean(0) if len(members) else 0)
            with torch.no_grad():
                expected = model.model.visual.merger(expect_hidden)[0]
            torch.testing.assert_close(seen[0].pooler_output[i][6 + c], expected, atol=1e-5, rtol=1e-5)
            for level, got in zip(deepstack, seen[0].deepstack_features):
                want = level[target] + (level[members].mean(0) if len(members) else 0)
                torch.testing.assert_close(got[i][6 + c], want, atol=1e-5, rtol=1e-5)
        for d, token in enumerate(unit["kept"]):
            for level, got in zip(deepstack, seen[0].deepstack_features):
                assert torch.equal(got[i][d], level[token])
        assert sorted(unit["kept"] + unit["contextual"] + joined[:, 0].tolist()) == list(range(unit["tokens_before"]))


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_of_two_image_sizes_matches_each_row_alone(models, method):
    """Qwen2.5-VL (attention windows): a padded batch with images of 24 and 16 tokens keeps, per image,
    what the image keeps alone and generates the same tokens."""
    model = models["qwen2_5"]
    inputs = qwen_vl_inputs(model, "qwen2_5")
    vitcompress.compress(model, method, **options(model, method))
    try:
        gen = model.generate(**inputs, question=QUESTION, max_new_tokens=3, do_sample=False)
        batch = vitcompress.stats(model)["image"]
        alone, kept_alone = [], []
        for b in range(2):
            alone.append(model.generate(**row_alone(inputs, b), question=QUESTION, max_new_tokens=3, do_sample=False))
            kept_alone.append(vitcompress.stats(model)["image"][0]["sources"])
    finally:
        vitcompress.restore(model)
    assert [u["tokens_before"] for u in batch] == [24, 16]
    assert [u["sources"] for u in batch] == kept_alone
    for b in range(2):
        assert torch.equal(gen[b, -3:], alone[b][0, -3:])


@pytest.mark.parametrize("method", METHODS)
def test_bf16(models, method):
    """A bf16 Qwen3-VL (DeepStack) runs compressed: the budget kept, tokens in the model's dtype, generate works."""
    model = copy.deepcopy(models["qwen3"]).to(torch.bfloat16)
    inputs = qwen_vl_inputs(model, "qwen3")
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("mm_encoder_outputs")), with_kwargs=True)
    vitcompress.compress(model, method, **options(model, method))
    out = model.generate(**inputs, question=QUESTION, max_new_tokens=2, do_sample=False)
    stats = vitcompress.stats(model)
    assert [u["tokens_after"] for u in stats["image"]] == [8, 8]
    assert all(t.dtype == torch.bfloat16 for t in seen[0]["image"].pooler_output)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("method,kwargs,error,match", [
    ("visionzip", dict(dominant=14, contextual=4), ValueError, "more than the 16 visual tokens"),
    ("cdpruner", dict(tokens=8, clip=SimpleNamespace(get_text_features=None, visual_projection=None, vision_model=None),
                      tokenizer=qwen_char_tokenizer), ValueError, "tower has none: pass scorer="),
])
def test_clear_errors(models, method, kwargs, error, match):
    model = models["qwen2"]
    inputs = qwen_vl_inputs(model, "qwen2", video=False)
    with pytest.raises(error, match=match):
        vitcompress.compress(model, method, **kwargs)
        try:
            with torch.no_grad():
                model(**inputs, question=QUESTION)
        finally:
            vitcompress.restore(model)
