"""What a user meets when something is wrong: each error names the problem and the fix; a
schedule that collapses at another input size warns; describe() documents every option."""
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import vitcompress
from vitcompress.testing import tiny_vit


def test_jit_script_is_refused_with_the_alternatives():
    model = vitcompress.compress(tiny_vit(), "tome", r=2)
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot.*torch.compile.*torch.jit.trace.*export_onnx"):
        torch.jit.script(model)


@pytest.mark.parametrize("wrap,fix", [(lambda m: nn.DataParallel(m), r"compress\(model\.module"),
                                      (lambda m: nn.Sequential(nn.Identity(), m), r"compress\(model\[1\]"),
                                      (lambda m: nn.ModuleDict({"vit": m}), r"compress\(model\.vit")])
def test_a_wrapped_model_names_the_module_to_pass(wrap, fix):
    with pytest.raises(TypeError, match=fix):
        vitcompress.compress(wrap(tiny_vit()), "tome", r=2)


def test_an_unsupported_model_names_the_families_in_one_line():
    with pytest.raises(TypeError) as err:
        vitcompress.compress(nn.Linear(2, 2), "tome")
    message = str(err.value)
    assert "timm.VisionTransformer" in message and "\n" not in message and len(message) < 450


def test_restore_of_an_inner_module_names_the_outer_model():
    open_clip = pytest.importorskip("open_clip")
    from vitcompress.testing import tiny_clip

    clip = tiny_clip()
    vitcompress.compress(clip, "tome", r=2)
    assert isinstance(clip, open_clip.model.CLIP)
    with pytest.raises(ValueError, match="part of a compressed CLIP; call vitcompress.restore on that CLIP"):
        vitcompress.restore(clip.visual)
    with pytest.raises(ValueError, match="not compressed by vitcompress"):
        vitcompress.restore(nn.Linear(2, 2))


@pytest.mark.parametrize("method,options,match", [
    ("pitome", dict(margin="x"), r"pitome margin='x' must be a number \(default 0.75"),
    ("tome", dict(prop_attn="yes"), r"prop_attn='yes' must be True or False"),
    ("tome", dict(trace_source=1), r"trace_source=1 must be True or False"),
    ("tome", dict(clamp="no"), r"clamp='no' must be True or False"),
    ("zero_tprune", dict(s_ratio="half"), r"s_ratio='half' must be a number"),
    ("zero_tprune", dict(cls_init=1), r"cls_init=1 must be a string"),
    ("zero_tprune", dict(prerank_iters=1.5), r"prerank_iters=1.5 must be an int"),
])
def test_option_types_are_checked(method, options, match):
    with pytest.raises(TypeError, match=match):
        vitcompress.compress(tiny_vit(), method, **options)


def test_numpy_numbers_are_accepted():
    model = tiny_vit()
    vitcompress.compress(model, "tome", r=np.int64(3))
    assert vitcompress.stats(model)["schedule"] == [3, 3, 3, 3]
    vitcompress.compress(model, "tome", r=[np.int32(2), np.int64(1)])
    assert vitcompress.stats(model)["schedule"] == [2, 1, 0, 0]
    vitcompress.compress(model, "pitome", keep=np.float32(0.8), alpha=np.float64(0.5))
    vitcompress.compress(model, "zero_tprune", keep=0.8, prerank_iters=np.int64(2))
    assert vitcompress.stats(model)["options"]["prerank_iters"] == 2
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="unknown target 'foo'; methods reduce one of: vit, detr, llava"):
        vitcompress.list_methods("foo")


def test_a_block_replaced_after_compress_is_named():
    from timm.models.vision_transformer import Block

    model = vitcompress.compress(tiny_vit(), "tome", r=2)
    model.blocks[1] = Block(48, 3)
    with pytest.raises(RuntimeError, match="block 1 of this compressed model did not run under vitcompress.*compress"):
        model(torch.randn(1, 3, 32, 32))


def collapse_warnings(model, sizes):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for size in sizes:
                model(torch.randn(1, 3, size, size))
    return [str(w.message) for w in caught if "budget leaves" in str(w.message)]


def test_a_collapsing_schedule_warns_once_per_size_and_not_at_the_checked_size():
    model = tiny_vit(dynamic_img_size=True, depth=6)  # 64 patches at 32 px
    vitcompress.compress(model, "tome", r=7)
    messages = collapse_warnings(model, [32, 32, 16, 16, 24, 16])
    assert len(messages) == 2, messages  # 16 px (16 patches) and 24 px (36 patches), each once
    assert "at 16 patches" in messages[0] and "keep= or flops=" in messages[0]
    assert "at 36 patches" in messages[1]
    model = tiny_vit(dynamic_img_size=True, depth=6)
    vitcompress.compress(model, "pitome", keep=0.9)  # scales with the input: no collapse
    assert collapse_warnings(model, [32, 24, 28]) == []


def accepted_options(model, method):
    """The options compress accepts, from its own refusal of an unknown one."""
    with pytest.raises(TypeError) as err:
        vitcompress.compress(model, method, no_such_option=1)
    return set(re.search(r"its options are: ([^(]*)", str(err.value)).group(1).strip().split(", "))


def test_describe_lists_exactly_the_options_compress_accepts():
    vit = tiny_vit()
    for method in vitcompress.list_methods("vit"):
        described = vitcompress.describe(method)
        assert set(described["options"]) == accepted_options(vit, method)
        assert all(o["help"] for o in described["options"].values()), method
        assert described["default_budget"]
    transformers = pytest.importorskip("transformers")
    from vitcompress.testing import tiny_detr, tiny_llava
    assert set(vitcompress.describe("focus_detr")["options"]) == accepted_options(tiny_detr(), "focus_detr")
    llava = tiny_llava("llava")
    for method in vitcompress.list_methods("llava"):
        described = vitcompress.describe(method)
        assert set(described["options"]) == accepted_options(llava, method)
        assert all(o["help"] for o in described["options"].values()), method
    assert transformers


def test_describe_reports_defaults_and_family_defaults():
    info = vitcompress.describe("pitome")
    assert info["options"]["margin"]["default"] == 0.75 and info["family_defaults"]["clip"] == {"margin": 0.9}
    assert info["default_budget"] == {"keep": 0.9} and info["options"]["prop_attn"]["default"] is True
    assert vitcompress.describe("zero_tprune")["default_budget"] == {"flops": 0.653}
    with pytest.raises(ValueError, match="unknown method"):
        vitcompress.describe("nope")


@pytest.mark.parametrize("method", ["tome", "pitome", "zero_tprune"])
def test_a_forward_on_the_meta_device_gives_the_shapes(method):
    model = vitcompress.compress(tiny_vit(), method, keep=0.8).to("meta")
    assert model(torch.randn(2, 3, 32, 32, device="meta")).shape == (2, 10)
