"""timm's ``set_input_size`` on a compressed model: the budget is planned at the model's input size, so
resizing compresses again at the new size, as if the model had been resized before compress."""
import copy

import pytest
import torch

import vitcompress
from vitcompress.testing import tiny_vit


def eva02():
    from test_eva_beit import eva02 as build
    return build()


def beit():
    from test_eva_beit import beit as build
    return build(use_rel_pos_bias=True)


@pytest.mark.parametrize("build", [tiny_vit, eva02, beit], ids=["vit", "eva02", "beit"])
@pytest.mark.parametrize("method,budget", [("zero_tprune", dict(flops=0.8)), ("tome", dict(r=3))])
def test_a_resized_model_is_the_model_compressed_at_its_new_size(build, method, budget):
    resized_after = build()
    resized_before = copy.deepcopy(resized_after)
    vitcompress.compress(resized_after, method, prop_attn=False, **budget)
    resized_after.set_input_size(img_size=48)
    resized_before.set_input_size(img_size=48)
    vitcompress.compress(resized_before, method, prop_attn=False, **budget)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(resized_after(x), resized_before(x))
    after, before = vitcompress.stats(resized_after), vitcompress.stats(resized_before)
    assert after["tokens_per_layer"] == before["tokens_per_layer"] == before["planned_tokens_per_layer"]
    assert after["options"] == before["options"] and after["budget"] == before["budget"]
    vitcompress.restore(resized_after)
    vitcompress.restore(resized_before)
    with torch.no_grad():
        assert torch.equal(resized_after(x), resized_before(x))
    assert "set_input_size" not in resized_after.__dict__


def test_a_budget_the_new_size_cannot_take_is_refused_by_the_resize():
    model = vitcompress.compress(tiny_vit(), "tome", r=8)  # 64 patches: 56, 48, 40, 32 left
    with pytest.raises(ValueError, match=r"r=8 asks block 1 to remove 8 of the 8 tokens left.*left the model resized and uncompressed"):
        model.set_input_size(img_size=16)  # 16 patches
    assert model.patch_embed.num_patches == 16 and "set_input_size" not in model.__dict__
    with pytest.raises(ValueError, match="not compressed"):
        vitcompress.stats(model)
