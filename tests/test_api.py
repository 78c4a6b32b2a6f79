"""compress / restore / stats on timm ViTs: exactness, schedules, bad input."""
import math

import pytest
import timm
import torch

import vitcompress
from vitcompress.testing import tiny_vit


@pytest.mark.parametrize("method", ["tome", "pitome"])
@pytest.mark.parametrize("budget", [{"keep": 1.0}, {"r": 0}])
def test_no_reduction_matches_original(deit_small, method, budget):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = deit_small(x)
        vitcompress.compress(deit_small, method, **budget)
        out = deit_small(x)
        vitcompress.restore(deit_small)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,budget", [("tome", {"r": 8}), ("pitome", {"keep": 0.9}), ("pitome", {"flops": 0.6})])
def test_restore_is_bit_exact(deit_small, method, budget):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = deit_small(x)
        vitcompress.compress(deit_small, method, **budget)
        compressed = deit_small(x)
        vitcompress.restore(deit_small)
        after = deit_small(x)
    assert not torch.allclose(compressed, before, atol=1e-3)
    assert torch.equal(after, before)
    assert not hasattr(deit_small, "_vitcompress")
    assert all("forward" not in blk.__dict__ for blk in deit_small.blocks)


def test_compressing_twice_replaces_the_first(deit_small):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        vitcompress.compress(deit_small, "pitome", keep=0.8)
        only_second = deit_small(x)
        vitcompress.compress(deit_small, "tome", r=4)
        vitcompress.compress(deit_small, "pitome", keep=0.8)  # stacking would remove tokens twice
        twice = deit_small(x)
        st = vitcompress.stats(deit_small)
        vitcompress.restore(deit_small)
        plain = deit_small(x)
    assert torch.equal(twice, only_second)
    assert st["method"] == "pitome" and st["tokens_per_layer"] == st["planned_tokens_per_layer"]
    assert not torch.allclose(plain, twice, atol=1e-3)


def expected_tokens_pitome(num_patches, depth, keep, prefix=1):
    tokens, t = [], num_patches + prefix
    for _ in range(depth):
        tokens.append(t)
        n = t - prefix
        t -= math.floor(n - n * keep)  # PiToMe's count: floor(T - T * ratio), T without the special tokens
    return tokens


def test_tokens_per_layer_follow_the_schedule(deit_small):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        vitcompress.compress(deit_small, "tome", r=8)
        deit_small(x)
        st = vitcompress.stats(deit_small)
        assert st["tokens_per_layer"] == [197 - 8 * i for i in range(12)]
        vitcompress.compress(deit_small, "pitome", keep=0.9)
        deit_small(x)
        st = vitcompress.stats(deit_small)
        vitcompress.restore(deit_small)
    assert st["tokens_per_layer"] == expected_tokens_pitome(196, 12, 0.9)
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"]


def test_tome_inflection_schedule(deit_small):
    vitcompress.compress(deit_small, "tome", r=(8, 0.5))
    sched = vitcompress.stats(deit_small)["schedule"]
    vitcompress.restore(deit_small)
    assert sched[0] == 4 and sched[-1] == 12 and sorted(sched) == sched
    assert abs(sum(sched) - 8 * 12) <= 12


def test_dynamic_img_size_plans_per_input_size():
    model = timm.create_model("deit_small_patch16_224", dynamic_img_size=True).eval()
    vitcompress.compress(model, "pitome", keep=0.85)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 160, 192))  # 10 x 12 = 120 patches
        st = vitcompress.stats(model)
        assert out.shape == (2, 1000)
        assert st["tokens_per_layer"] == expected_tokens_pitome(120, 12, 0.85)
        model(torch.randn(1, 3, 224, 224))
        assert vitcompress.stats(model)["tokens_per_layer"] == expected_tokens_pitome(196, 12, 0.85)


def test_flops_budget_resolves_before_the_first_forward(deit_small):
    vitcompress.compress(deit_small, "pitome", flops=0.6)
    rt = deit_small._vitcompress
    base = rt.adapter.cost().flops(vitcompress.engine.schedule.build_schedule(rt.method, rt.options, "r", 0, 196, 1, 12))
    ratio = rt.adapter.cost().flops(rt.schedule, rt.method, rt.options) / base
    vitcompress.restore(deit_small)
    assert abs(ratio - 0.6) < 0.01


@pytest.mark.parametrize("kwargs,error,text", [
    ({"keep": 0.0}, ValueError, "outside (0, 1]"),
    ({"keep": 1.5}, ValueError, "outside (0, 1]"),
    ({"flops": 0.0}, ValueError, "outside (0, 1]"),
    ({"flops": 1.2}, ValueError, "outside (0, 1]"),
    ({"r": -1}, ValueError, "negative"),
    ({"r": [2, -3]}, ValueError, "negative"),
    ({"r": 2.5}, TypeError, "must be an int"),
    ({"r": 40}, ValueError, "can remove at most"),
    ({"keep": 0.3}, ValueError, "use a larger keep"),
    ({"flops": 0.05}, ValueError, "unreachable"),
    ({"keep": 0.9, "r": 4}, ValueError, "at most one of"),
    ({"margin": 2.0}, ValueError, "margin"),
    ({"colour": 3}, TypeError, "has no option colour"),
])
def test_bad_input_is_named(kwargs, error, text):
    model = tiny_vit()
    with pytest.raises(error, match=__import__("re").escape(text)):
        vitcompress.compress(model, "pitome", **kwargs)
    assert not hasattr(model, "_vitcompress")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="known methods: .*pitome.*tome"):
        vitcompress.compress(tiny_vit(), "tome_v2")


@pytest.mark.parametrize("name", ["resnet18", "swin_tiny_patch4_window7_224"])
def test_unsupported_model_names_the_supported_families(name):
    with pytest.raises(TypeError, match="supported families are timm.VisionTransformer"):
        vitcompress.compress(timm.create_model(name), "tome", r=2)


def test_restore_on_an_uncompressed_model_says_so():
    with pytest.raises(ValueError, match="not compressed"):
        vitcompress.restore(tiny_vit())


def test_methods_lists_registered_names():
    assert {"tome", "pitome", "zero_tprune"} <= set(vitcompress.list_methods())
    assert {"tome", "pitome", "zero_tprune"} <= set(vitcompress.list_methods("vit"))


def test_common_options_are_split_off_once_and_the_runtime_mutates_nothing():
    """prop_attn / trace_source leave the method's options in the API: the method never sees them, the
    runtime gets them apart and changes no dict it is given, stats reports them beside the method's."""
    from vitcompress.api import resolve_options
    from vitcompress.interfaces import CommonOptions, runtime_of
    from vitcompress.methods import get

    given = {"prop_attn": False, "clamp": True}
    own, common = resolve_options(get("tome"), given)
    assert own == {"clamp": True} and common == CommonOptions(prop_attn=False, trace_source=False)
    assert given == {"prop_attn": False, "clamp": True}
    assert resolve_options(get("focus_detr"), {})[1] is None  # other targets take no common options
    model = vitcompress.compress(tiny_vit(), "tome", r=2, prop_attn=False, trace_source=True)
    runtime = runtime_of(model)
    assert runtime.options == {"clamp": False} and (runtime.prop_attn, runtime.trace_source) == (False, True)
    assert vitcompress.stats(model)["options"] == {"clamp": False, "prop_attn": False, "trace_source": True,
                                              "unmerge": False}
    options = dict(runtime.options)
    runtime.adapter.make_runtime(runtime.method, options, runtime.requested, CommonOptions(True, False))
    assert options == {"clamp": False}


def test_a_method_for_another_family_is_refused_and_bench_skips_it(monkeypatch):
    import argparse
    from vitcompress.cli.bench import _bench_settings
    from vitcompress.methods import REGISTRY
    from vitcompress.interfaces import Method

    class DetectorOnly(Method):
        name, target, defaults = "detector_only_test", "detr", {}

    monkeypatch.setitem(REGISTRY, DetectorOnly.name, DetectorOnly())
    assert DetectorOnly.name in vitcompress.list_methods() and DetectorOnly.name not in vitcompress.list_methods("vit")
    default_rows = [text for text, _, _ in _bench_settings(argparse.Namespace(settings=None, methods=None, flops=[0.7]))]
    assert "tome:flops=0.7" in default_rows and not any(DetectorOnly.name in row for row in default_rows)
    model = tiny_vit()
    with pytest.raises(TypeError, match="reduces detr models.*takes: .*tome"):
        vitcompress.compress(model, DetectorOnly.name)
    assert not hasattr(model, "_vitcompress")


def _pickle_round_trip(model):
    import io
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("clone", ["deepcopy", "torch.save"])
def test_a_copy_of_a_compressed_model_is_independent(clone):
    import copy

    model = tiny_vit(global_pool="avg")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        vitcompress.compress(model, "pitome", keep=0.8)
        out = model(x)
        twin = copy.deepcopy(model) if clone == "deepcopy" else _pickle_round_trip(model)
        assert torch.equal(twin(x), out)
        vitcompress.restore(twin)
        assert torch.equal(twin(x), ref)
        assert torch.equal(model(x), out)  # the original stays compressed
        twin.blocks[0].attn.qkv.weight.mul_(2)
        assert torch.equal(model(x), out)  # and runs its own weights


def test_user_hooks_registered_while_compressed_survive_restore():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    vitcompress.compress(model, "tome", r=4)
    fired = []
    model.register_forward_pre_hook(lambda m, args: fired.append("model-pre"))
    model.blocks[1].register_forward_hook(lambda m, args, out: fired.append("block-post"))
    with torch.no_grad():
        model(x)
    assert fired == ["model-pre", "block-post"]
    vitcompress.restore(model)
    fired.clear()
    with torch.no_grad():
        after = model(x)
    assert fired == ["model-pre", "block-post"] and torch.equal(before, after)
