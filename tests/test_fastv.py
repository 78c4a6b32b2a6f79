"""fastv on tiny random LLaVA-1.5 / LLaVA-NeXT (8 language-model layers): the tokens every layer
sees and the attention row it ranks by (the official-code equality is in test_official_lm_recorded.py;
decoding and masks in test_lm_prune.py)."""
import copy

import pytest
import torch

import vitcompress
from vitcompress.methods.fastv import last_token_attention
from vitcompress.testing import LLAVA_IMAGE_TOKEN, llava_inputs, tiny_llava_lm


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_llava_lm(kind) for kind in ("llava", "next")}


def _layer_lengths(model, inputs):
    lengths = []
    handles = [layer.register_forward_pre_hook(lambda m, a, kw: lengths.append(a[0].shape[1]), with_kwargs=True)
               for layer in model.model.language_model.layers]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return lengths


@pytest.mark.parametrize("kind", ["llava", "next"])
@pytest.mark.parametrize("layer,keep", [(2, 0.5), (3, 0.25), (1, 0.7)])
def test_kept_counts_at_layer_k(models, kind, layer, keep):
    """Layers before K see every token; from K on each sample keeps round(keep * N) of its N visual
    tokens (the batch is as long as its longest sample)."""
    model = copy.deepcopy(models[kind])
    inputs = llava_inputs(model, kind)
    visual = (inputs["input_ids"] == LLAVA_IMAGE_TOKEN).sum(1).tolist()
    vitcompress.compress(model, "fastv", layer=layer, keep=keep)
    lengths = _layer_lengths(model, inputs)
    stats = vitcompress.stats(model)
    kept = [round(n * keep) for n in visual]
    assert [s["layer"] for s in stats["stages"]] == [layer]
    assert stats["stages"][0]["visual_tokens"] == kept
    length = inputs["input_ids"].shape[1]
    longest = max(length - (n - k) for n, k in zip(visual, kept))  # padding tokens stay, as in the model
    assert lengths == [length] * layer + [longest] * (8 - layer)
    assert stats["visual_tokens_before"] == sum(visual) and stats["visual_tokens_after"] == sum(kept)


@pytest.mark.parametrize("kind", ["llava", "next"])
def test_ranks_by_the_eager_attention_of_the_last_token(models, kind):
    """The kept tokens are the top of the eager model's attention probabilities in layer K (row of
    the last token, mean over heads): padded batch, grouped key heads."""
    model = copy.deepcopy(models[kind])
    inputs = llava_inputs(model, kind)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attention = eager(**inputs, output_attentions=True).attentions[1]  # layer K = 2
    vitcompress.compress(model, "fastv")
    with torch.no_grad():
        model(**inputs)
    kept = vitcompress.stats(model)["stages"][0]["kept"]
    for b in range(2):
        visual = (inputs["input_ids"][b] == LLAVA_IMAGE_TOKEN).nonzero()[:, 0]
        scores = attention[b].mean(0)[-1][visual]
        expected = visual[scores.topk(round(len(visual) * 0.5)).indices].sort().values
        assert torch.equal(kept[b], expected)


def test_last_token_attention_is_the_softmax_row_of_the_last_real_token():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    valid[0, 6] = False  # right padding: the last real token is 5
    out = last_token_attention(q, k, valid)
    for b, last in ((0, 5), (1, 6)):
        keys = valid[b].nonzero()[:, 0]
        keys = keys[keys <= last]
        row = torch.softmax(q[b, :, last, None] @ k[b][:, keys].transpose(-1, -2) / 2.0, dim=-1).mean(0)[0]
        torch.testing.assert_close(out[b, keys], row)
        assert out[b][~valid[b]].abs().max() == 0
