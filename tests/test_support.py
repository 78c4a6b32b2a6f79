"""What vitcompress supports: ``vitcompress.supported(model)``, the refusal message for other models,
timm's MAP pooling (SigLIP), and the README's support table -- every cell of
``experiments/studies/support_table.py`` is a test here (the torch.compile and ONNX cells are slow:
``python -m pytest -m slow tests/test_support.py``)."""
import pytest
import torch

import vitcompress
from conftest import load_script
from vitcompress.interfaces import PART_ATTR
from vitcompress.testing import random_images, tiny_vit

table = load_script("studies/support_table.py")
X = random_images()


# --------------------------------------------------------------------------- the table's cells


def expected(family: str, method: str, aspect: str) -> str:
    kind = table.family(family).kind
    if kind == "vit" or aspect in ("forward", "restore"):
        return "✓"
    if aspect == "compile" or method in table.VIT_METHODS:
        return "·"  # not checked: DETR / LLaVA under torch.compile, a LLaVA through export_onnx
    return "refused"  # export_onnx refuses detection and VLM methods, naming the methods that export


def run_cell(family, method, aspect):
    try:
        value = table.check(family, method, aspect)
    except table.Unavailable as err:
        pytest.skip(str(err))
    except table.Refused:
        value = "refused"
    assert value == expected(family, method, aspect)


# second variants of a family (their own tests cover them by default): slow here
SLOW_FAMILIES = ("timm EVA + registers", "timm BEiT shared bias")


@pytest.mark.parametrize("aspect", ["forward", "restore"])
@pytest.mark.parametrize("family,method", [pytest.param(f, m, marks=pytest.mark.slow) if f in SLOW_FAMILIES else (f, m)
                                           for f, m in table.cases()])
def test_cell(family, method, aspect):
    run_cell(family, method, aspect)


SLOW_CELLS = [pytest.param(f, m, a, marks=pytest.mark.slow, id=f"{f}-{m}-{a}")
              for a in ("compile", "onnx") for f, m in table.cases()]


@pytest.mark.parametrize("family,method,aspect", SLOW_CELLS)
def test_slow_cell(family, method, aspect):
    run_cell(family, method, aspect)


def test_the_table_names_every_family_and_method():
    results = {(f, m, a): (expected(f, m, a), "") for f, m in table.cases() for a in table.ASPECTS}
    shown = set()
    for methods, families in table.TABLES:
        lines = table.table(results, table.ASPECTS, list(methods), families).splitlines()
        assert len(lines) == 2 + len(families)
        assert all(line.count("|") == len(methods) + 3 for line in lines)
        shown |= {(f.name, m) for f in families for m in f.methods if m in methods}
    assert shown == set(table.cases())  # every cell is in one of the two tables
    assert set(table.ALL_METHODS) == {m for methods, _ in table.TABLES for m in methods}


def test_the_class_token_free_list_matches_the_registry():
    """The refusal of evit / ppt on a model without a class token names exactly the ViT methods that
    run there (random, the baseline, aside)."""
    from vitcompress.methods import get
    from vitcompress.methods.block_options import CLASS_TOKEN_FREE

    free = []
    for name in vitcompress.list_methods("vit"):
        try:
            get(name).check_model(0, False)
        except ValueError as err:
            assert str(err).endswith("use a method that needs none: " + ", ".join(CLASS_TOKEN_FREE))
        else:
            free.append(name)
    assert sorted(CLASS_TOKEN_FREE) == sorted(n for n in free if n != "random")
    assert sorted(CLASS_TOKEN_FREE) == sorted(table.CLASS_TOKEN_FREE)


# --------------------------------------------------------------------------- supported(model)


@pytest.mark.parametrize("name", [f.name for f in table.ALL_FAMILIES])
def test_supported_names_the_methods_that_fit_each_family(name):
    fam = table.family(name)
    try:
        model = fam.model()
    except table.Unavailable as err:
        pytest.skip(str(err))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fits = vitcompress.supported(model)
    assert sorted(fits) == vitcompress.list_methods()
    assert [m for m, ok in fits.items() if ok is True and m in table.ALL_METHODS] == sorted(fam.methods)
    for method, ok in fits.items():
        if ok is True or method not in table.ALL_METHODS:
            continue
        if method in table.CLASS_TOKEN_METHODS and fam.kind == "vit":  # says why and what fits instead
            assert "has no class token; use a method that needs none: tome" in ok
        elif method in table.LLAVA_ONLY_METHODS and fam.kind == "llava":  # the family refuses it, naming what runs
            assert f"{method} cannot reduce " in ok and sorted(fam.methods)[0] in ok
        else:  # another target's method: says what it reduces and what fits instead
            assert f"{method} reduces " in ok and sorted(fam.methods)[0] in ok
    # nothing patched, nothing changed
    assert not any(PART_ATTR in m.__dict__ for m in model.modules()) and "_vitcompress" not in model.__dict__
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_supported_when_nothing_fits():
    fits = vitcompress.supported(torch.nn.Linear(3, 3))
    reasons = set(fits.values())
    assert len(reasons) == 1 and sorted(fits) == vitcompress.list_methods()
    (reason,) = reasons
    assert "cannot compress a torch.nn.modules.linear.Linear" in reason
    wrapped = vitcompress.supported(torch.nn.Sequential(torch.nn.Identity(), tiny_vit()))
    assert all("vitcompress.compress(model[1], ...)" in r for r in wrapped.values())


def test_a_block_without_attn_is_a_reason_not_an_error():
    """issue 33: timm's ParallelScalingBlock has no ``attn``; supported() returns why, compress()
    refuses with a TypeError naming the block and what is supported."""
    import timm

    model = timm.create_model("vit_pwee_patch16_reg1_gap_256", depth=2)
    fits = vitcompress.supported(model)
    reasons = set(fits.values())
    assert len(reasons) == 1 and sorted(fits) == vitcompress.list_methods()
    (reason,) = reasons
    assert reason.startswith("block 0 of this VisionTransformer is a ParallelScalingBlock; ")
    assert "pre-norm Block with the standard Attention" in reason
    with pytest.raises(TypeError) as err:
        vitcompress.compress(model, "tome")
    assert str(err.value) == reason


def test_supported_tells_a_default_budget_the_model_cannot_take(monkeypatch):
    from vitcompress.methods import get

    monkeypatch.setattr(get("tome"), "default_budget", {"flops": 0.05})
    fits = vitcompress.supported(tiny_vit())
    assert fits["pitome"] is True
    assert "fits this model but not with its default budget flops=0.05" in fits["tome"]
    assert "unreachable" in fits["tome"]


def test_supported_validates_the_defaults_but_asks_no_option_of_the_user(monkeypatch):
    """A family default the method refuses makes it unfit (with the method's own words); an option
    only the user can give (quota's scorer=, without a default) does not."""
    from vitcompress.methods import get

    monkeypatch.setattr(get("pitome"), "family_defaults", {"clip": {"margin": 1.5}})
    fits = vitcompress.supported(table.family("open_clip ViT").model())
    assert fits["tome"] is True
    assert "pitome refuses its default options for this open_clip.VisionTransformer model" in fits["pitome"]
    assert "margin=1.5 must lie in [0, 1]" in fits["pitome"]
    assert vitcompress.supported(tiny_vit())["pitome"] is True  # the variant without that default
    with pytest.raises(ValueError, match="quota needs scorer="):
        get("quota").validate(dict(get("quota").defaults))  # what the LLaVA row's quota=True lets through


def test_refusal_names_the_supported_families_in_one_line():
    from vitcompress.adapters import ADAPTERS

    with pytest.raises(TypeError) as err:
        vitcompress.compress(torch.nn.Conv2d(3, 3, 1), "tome")
    message = str(err.value)
    assert "\n" not in message and len(message) < 450
    for adapter in ADAPTERS:
        assert adapter.family in message
    assert "transformers.ViT/DeiT/Dinov2/SiglipVision" in message


# --------------------------------------------------------------------------- timm MAP pooling


def expand_by_size(x, size):
    """Each token of a batch of one repeated as many times as the patches it stands for."""
    return x[0].repeat_interleave(size[0, :, 0].round().long(), dim=0)[None]


MAP_VARIANTS = {"siglip": dict(class_token=False, global_pool="map"),
                "cls+registers": dict(global_pool="map", reg_tokens=2),
                "qk_norm+latents": dict(class_token=False, global_pool="map", qk_norm=True)}


@pytest.mark.parametrize("variant", MAP_VARIANTS)
def test_timm_map_pool_is_proportional(variant):
    """A token standing for k patches weighs in the MAP pool as k copies of it would (the original
    pool over every token repeated by its size), and as softmax(q.k * scale + log size) says."""
    model = tiny_vit(**MAP_VARIANTS[variant])
    pool = model.attn_pool
    if variant == "qk_norm+latents":  # several latent queries, averaged
        from timm.layers import AttentionPoolLatent

        torch.manual_seed(0)
        pool = model.attn_pool = AttentionPoolLatent(48, num_heads=3, latent_len=4, qk_norm=True, pool_type="avg",
                                                     norm_layer=torch.nn.LayerNorm).eval()
    captured = {}
    hook = pool.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
    vitcompress.compress(model, "tome", r=8)
    with torch.no_grad():
        model(X[:1])
        hook.remove()
        size = vitcompress.stats(model)["size"][:, model.num_prefix_tokens:]  # the pool leaves the prefix out
        assert size.max() > 1 and size.sum() == 64
        vitcompress.restore(model)
        want = pool(expand_by_size(captured["x"], size))
        x = captured["x"][0]
        H, d = pool.num_heads, pool.head_dim
        q = pool.q_norm(pool.q(pool.latent[0]).view(-1, H, d).transpose(0, 1))  # [H, L, d]
        k, v = pool.kv(x).view(-1, 2, H, d).permute(1, 2, 0, 3).unbind(0)
        k = pool.k_norm(k)
        a = (q @ k.transpose(1, 2) * pool.scale + size[0, :, 0].log()).softmax(dim=-1)
        o = pool.proj((a @ v).transpose(0, 1).reshape(1, -1, H * d))
        o = o + pool.mlp(pool.norm(o))
        explicit = o[:, 0] if pool.pool == "token" else o.mean(1)
    torch.testing.assert_close(captured["out"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured["out"], explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", MAP_VARIANTS)
def test_timm_map_model_keep_one_restore_and_flops(variant):
    from vitcompress.adapters import find_adapter
    from vitcompress.methods import get
    from vitcompress.engine.schedule import build_schedule

    model = tiny_vit(**MAP_VARIANTS[variant])
    adapter = find_adapter(model)
    schedule = build_schedule(get("tome"), {}, "r", 0, adapter.num_patches, adapter.num_prefix, adapter.depth)
    base = vitcompress.count_flops(model, X[:1])
    assert adapter.cost().flops(schedule) == base  # the pool counted as fvcore counts it
    with torch.no_grad():
        ref = model(X)
        for method in ("tome", "pitome", "zero_tprune"):
            vitcompress.compress(model, method, keep=1.0)
            torch.testing.assert_close(model(X), ref, atol=1e-5, rtol=0)
        vitcompress.compress(model, "pitome", flops=0.7)
        assert abs(vitcompress.count_flops(model, X[:1]) / base - 0.7) < 0.014
        out = model(X)
        st = vitcompress.stats(model)
        vitcompress.restore(model)
        assert torch.equal(model(X), ref)
    assert out.shape == ref.shape and st["tokens_per_layer"] == st["planned_tokens_per_layer"]


def test_timm_map_pool_checks_the_sizes_it_is_given():
    model = vitcompress.compress(tiny_vit(class_token=False, global_pool="map"), "tome", r=6)
    with torch.no_grad():
        feats = model.forward_features(X)
        model.forward_features(X[:1])  # another forward: the sizes no longer describe feats
        with pytest.raises(ValueError, match="right after the forward_features"):
            model.forward_head(feats)
        with pytest.raises(ValueError, match="takes no attn_mask"):
            model.attn_pool(feats[:1], attn_mask=torch.zeros(1, 1, 1, feats.shape[1]))


def test_timm_pools_that_need_every_patch_are_refused():
    with pytest.raises(ValueError, match="global_pool='prr'"):
        vitcompress.compress(tiny_vit(global_pool="prr"), "tome", r=2)
    model = tiny_vit(class_token=False, global_pool="map")
    model.attn_pool.pos_embed = torch.nn.Parameter(torch.zeros(64, 48))
    with pytest.raises(ValueError, match="its own position embedding"):
        vitcompress.compress(model, "tome", r=2)
