"""dart on tiny random LLaVA-1.5 / LLaVA-NeXT (8 language-model layers): counts, batches (the
official-code equality is in test_official_lm_recorded.py; decoding and masks in test_lm_prune.py)."""
import copy

import pytest
import torch

import vitcompress
from vitcompress.methods.dart import least_duplicates
from vitcompress.testing import LLAVA_IMAGE_TOKEN, llava_inputs, tiny_llava_lm

QUESTION = torch.tensor([[11, 12, 13, 14, 15]])


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_llava_lm(kind) for kind in ("llava", "next")}


def _noise(shape):
    """Two noise images: no two visual tokens alike (a constant image ties every similarity)."""
    torch.manual_seed(5)
    return torch.randn((2,) + shape)


def _batch(model, kind):
    """``llava_inputs`` with five text tokens after each image (text pivots), left padded, positions
    counted from each prompt's first real token (as ``generate`` counts them)."""
    inputs = llava_inputs(model, kind, images=_noise)
    ids = torch.cat([inputs["input_ids"], QUESTION.expand(2, -1)], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, QUESTION.shape[1], dtype=torch.long)], 1)
    return dict(inputs, input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))


def _kept(model, inputs, **options):
    model = copy.deepcopy(model)
    vitcompress.compress(model, "dart", **options)
    with torch.no_grad():
        model(**inputs)
    return vitcompress.stats(model)["stages"]


@pytest.mark.parametrize("kind", ["llava", "next"])
@pytest.mark.parametrize("options", [{}, dict(max_kept=32), dict(keep=0.5, pivot_image=2, pivot_text=3, layer=3)])
def test_counts_and_batch_equal_each_sample_alone(models, kind, options):
    """Each sample keeps pivot_image + P * per_pivot visual tokens after layer K, the same tokens in
    a padded batch (images of different sizes on NeXT) as alone."""
    model = models[kind]
    inputs = _batch(model, kind)
    (stage,) = _kept(model, inputs, **options)
    assert stage["layer"] == options.get("layer", 2)
    pivots = options.get("pivot_image", 4) + options.get("pivot_text", 4)
    for b in range(2):
        visual = int((inputs["input_ids"][b] == LLAVA_IMAGE_TOKEN).sum())
        per_pivot = options.get("max_kept", visual * options.get("keep", 0.222)) // pivots
        assert stage["visual_tokens"][b] == options.get("pivot_image", 4) + pivots * int(per_pivot)
        real = inputs["attention_mask"][b].bool()
        alone = {k: v[b:b + 1] for k, v in inputs.items()}
        alone.update({k: inputs[k][b:b + 1, real] for k in ("input_ids", "attention_mask", "position_ids")})
        (single,) = _kept(model, alone, **options)
        assert torch.equal(stage["kept"][b] - int((~real).sum()), single["kept"][0])


def test_least_duplicates_takes_the_least_similar_remaining_tokens():
    """Pivot by pivot, the remaining tokens of lowest cosine similarity; the image pivots stay."""
    states = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7], [0.0, -1.0]])
    visual = torch.arange(6)
    kept = least_duplicates(states, visual, torch.tensor([0]), [0, 2], 2)
    # pivot 0: least similar are 3 (-1) then 2 / 5 (0): topk of -similarity -> 3 and one of {2, 5};
    # pivot 2 (states [0, 1]) among the rest: 5 (-1) if still there, then the next lowest
    assert kept[0] == 0 and kept[1] == 3
    assert len(set(kept.tolist())) == len(kept) == 5


def test_options_are_checked(models):
    with pytest.raises(ValueError, match="pivot_image"):
        vitcompress.compress(copy.deepcopy(models["llava"]), "dart", pivot_image=0)
    with pytest.raises(ValueError, match="max_kept"):
        vitcompress.compress(copy.deepcopy(models["llava"]), "dart", max_kept=-1)
    with pytest.raises(ValueError, match="K must be smaller"):
        vitcompress.compress(copy.deepcopy(models["llava"]), "dart", layer=8)
