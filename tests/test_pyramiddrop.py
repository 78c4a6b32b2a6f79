"""pyramiddrop on tiny random LLaVA-1.5 / LLaVA-NeXT (8 language-model layers): stage boundaries, the
visual tokens each stage keeps, and the ranking (official equality per stage: test_official_lm_recorded.py)."""
import copy

import pytest
import torch

import vitcompress
from vitcompress.testing import LLAVA_IMAGE_TOKEN, llava_inputs, tiny_llava_lm


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_llava_lm(kind) for kind in ("llava", "next")}


@pytest.mark.parametrize("kind", ["llava", "next"])
@pytest.mark.parametrize("keep,layers", [(0.5, None), (0.6, None), (0.5, [3, 5])])
def test_stages_keep_lambda_powers_of_the_visual_tokens(models, kind, keep, layers):
    """Boundaries D/4, D/2, 3D/4 (2, 4, 6 of 8) by default; stage s keeps int(N * lambda^s); each
    layer sees as many tokens as its stage keeps."""
    model = copy.deepcopy(models[kind])
    inputs = llava_inputs(model, kind)
    visual = (inputs["input_ids"] == LLAVA_IMAGE_TOKEN).sum(1).tolist()
    vitcompress.compress(model, "pyramiddrop", keep=keep, layers=layers)
    lengths = []
    for layer in model.model.language_model.layers:
        layer.register_forward_pre_hook(lambda m, a, kw: lengths.append(a[0].shape[1]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    stats = vitcompress.stats(model)
    boundaries = layers or [2, 4, 6]
    assert [s["layer"] for s in stats["stages"]] == boundaries
    other = [inputs["input_ids"].shape[1] - n for n in visual]  # text and padding tokens stay
    expected_lengths = [inputs["input_ids"].shape[1]] * boundaries[0]
    for s, layer in enumerate(boundaries):
        counts = [int(n * keep ** (s + 1)) for n in visual]
        assert stats["stages"][s]["visual_tokens"] == counts
        end = boundaries[s + 1] if s + 1 < len(boundaries) else 8
        expected_lengths += [max(o + c for o, c in zip(other, counts))] * (end - layer)
        if s:
            previous = stats["stages"][s - 1]["kept"]
            assert all(bool(torch.isin(k, p).all()) for k, p in zip(stats["stages"][s]["kept"], previous))
    assert lengths == expected_lengths


@pytest.mark.parametrize("kind", ["llava", "next"])
def test_first_stage_ranks_by_the_next_layers_eager_attention(models, kind):
    """Stage 0 keeps the top of the eager attention of layer 2 (the layer that starts stage 1),
    last instruction token, mean over heads: padded batch, grouped key heads."""
    model = copy.deepcopy(models[kind])
    inputs = llava_inputs(model, kind)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attention = eager(**inputs, output_attentions=True).attentions[2]
    vitcompress.compress(model, "pyramiddrop")
    with torch.no_grad():
        model(**inputs)
    kept = vitcompress.stats(model)["stages"][0]["kept"]
    for b in range(2):
        visual = (inputs["input_ids"][b] == LLAVA_IMAGE_TOKEN).nonzero()[:, 0]
        scores = attention[b].mean(0)[-1][visual]
        assert torch.equal(kept[b], visual[scores.topk(len(visual) // 2).indices].sort().values)


def test_layers_must_fit_the_language_model(models):
    with pytest.raises(ValueError, match="increasing layers in 1..7"):
        vitcompress.compress(copy.deepcopy(models["llava"]), "pyramiddrop", layers=[2, 8])
    with pytest.raises(ValueError, match="list of block indices"):
        vitcompress.compress(copy.deepcopy(models["llava"]), "pyramiddrop", layers=[])
