"""unmerge=True: the outputs a dense head reads come back on the full patch grid. Checked against
the uncompressed model (nothing reduced), against the same compression without unmerge (a merged
patch carries its group's token, found through ``source``), and against blocks run by hand (a pruned
patch keeps the value it had when pruned)."""
import pytest
import torch

import vitcompress
from vitcompress.interfaces import ViTMethod, runtime_of
from vitcompress.methods import REGISTRY, names
from vitcompress.profile.flops import count_flops
from vitcompress.testing import RandomPrune, random_images, tiny_vit

X = random_images(2)
METHODS = names("vit")
BUDGETS = {"tome": dict(r=6), "pitome": dict(keep=0.8), "zero_tprune": dict(keep=0.8)}
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)


def budget(method):
    return BUDGETS.get(method, dict(keep=0.8))


def eva():
    from timm.models.eva import Eva

    torch.manual_seed(0)
    return Eva(**TINY, use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=2).eval()


def beit():
    from timm.models.beit import Beit

    torch.manual_seed(0)
    return Beit(**TINY, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1).eval()


@pytest.mark.parametrize("method", ["tome", "zero_tprune"])
def test_beit_dense_outputs_keep_their_shapes(method):
    """BEiT (relative position bias, average pooling): outputs on the grid, the head on every patch."""
    model = beit()
    expected, logits = dense_outputs(model, X), model(X)
    vitcompress.compress(model, method, unmerge=True, **budget(method))
    assert [o.shape for o in dense_outputs(model, X)] == [e.shape for e in expected]
    assert vitcompress.stats(model)["tokens_per_layer"][-1] < 65 and model(X).shape == logits.shape


def dino_config(**kwargs):
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=4, **kwargs)


def dense_outputs(model, x):
    """Final patch tokens, NCHW intermediates and get_intermediate_layers(reshape=True) of a timm model."""
    with torch.no_grad():
        final = model.forward_features(x)
        nchw = model.forward_intermediates(x, indices=[1, 3], output_fmt="NCHW", intermediates_only=True)
        layers = model.get_intermediate_layers(x, n=2, reshape=True) if hasattr(model, "get_intermediate_layers") \
            else ()
    return [final, *nchw, *layers]


@pytest.mark.parametrize("build", [tiny_vit, eva], ids=["vit", "eva"])
def test_nothing_reduced_gives_the_uncompressed_outputs(build):
    """r=0 (no method plans anything, so one method stands for all)."""
    model = build()
    expected = dense_outputs(model, X)
    vitcompress.compress(model, "tome", r=0, unmerge=True)
    for got, want in zip(dense_outputs(model, X), expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [tiny_vit, eva], ids=["vit", "eva"])
@pytest.mark.parametrize("method", METHODS)
def test_shapes_are_the_uncompressed_models_and_restore_is_exact(build, method):
    model = build()
    expected = dense_outputs(model, X)
    logits = model(X)
    vitcompress.compress(model, method, unmerge=True, **budget(method))
    outputs = dense_outputs(model, X)
    assert vitcompress.stats(model)["tokens_per_layer"][-1] < expected[0].shape[1]  # it did reduce
    assert [o.shape for o in outputs] == [e.shape for e in expected]
    assert model(X).shape == logits.shape
    vitcompress.restore(model)
    assert all(torch.equal(a, b) for a, b in zip(dense_outputs(model, X), expected, strict=True))


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_every_patch_of_a_merged_group_carries_the_groups_token(method):
    """The unmerged final tokens are the reduced ones (same compression without unmerge) copied to
    every patch their ``source`` row covers."""
    model = tiny_vit()
    vitcompress.compress(model, method, trace_source=True, **budget(method))
    with torch.no_grad():
        reduced = model.forward_features(X)
    source = vitcompress.stats(model)["source"]
    vitcompress.compress(model, method, unmerge=True, **budget(method))
    with torch.no_grad():
        full = model.forward_features(X)
    assert reduced.shape[1] < full.shape[1] == source.shape[2]
    assert torch.equal(source.sum(dim=1), torch.ones_like(source[:, 0]))  # merging only: one carrier per patch
    carrier = source.argmax(dim=1)  # [B, N0]
    assert torch.equal(full, reduced.gather(1, carrier.unsqueeze(-1).expand_as(full)))
    groups = source.sum(dim=2)
    assert (groups > 1).any()  # some token stands for several patches


@pytest.fixture
def random_prune(monkeypatch):
    monkeypatch.setitem(REGISTRY, RandomPrune.name, RandomPrune())
    return RandomPrune.name


def test_a_pruned_patch_keeps_its_value_when_pruned(random_prune):
    """Blocks 0 and 1 reduce nothing, block 2 prunes 5 random patches after its attention, block 3 prunes
    4 more: the dense output of a pruned patch is, by hand, the residual stream at that point."""
    model = tiny_vit()
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(X))))
        x = model.blocks[1](model.blocks[0](x))
        block = model.blocks[2]
        at_prune = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    vitcompress.compress(model, random_prune, r=[0, 0, 5, 4], unmerge=True)
    with torch.no_grad():
        full = model.forward_intermediates(X, indices=[3], norm=False, output_fmt="NLC", intermediates_only=True)[0]
    g = torch.Generator().manual_seed(2)  # RandomPrune's generator for block 2
    kept = torch.rand(2, 64, generator=g).argsort(dim=1)[:, :59]
    pruned = torch.ones(2, 64, dtype=torch.bool).scatter_(1, kept, False)
    assert pruned.sum() == 10
    torch.testing.assert_close(full[pruned], at_prune[:, 1:][pruned], atol=1e-6, rtol=1e-6)


def test_intermediates_hand_the_reduced_tokens_on_exactly():
    """Putting a block's output on the grid and taking it back changes nothing downstream."""
    model = tiny_vit()
    vitcompress.compress(model, "tome", r=6, unmerge=True)
    with torch.no_grad():
        final_alone = model.forward_features(X)
        final, _ = model.forward_intermediates(X, indices=[0, 1, 2], output_fmt="NCHW")
    assert torch.equal(final, final_alone)


@pytest.mark.parametrize("method", METHODS)
def test_unmerge_costs_the_final_norm_on_every_patch(method):
    """count_flops: the gathers cost no multiply-add, the final norm runs on every patch again; a flops=
    budget is planned with exactly that count."""
    model = tiny_vit()
    vitcompress.compress(model, method, r=6)
    reduced = count_flops(model, X[:1])
    final_tokens = vitcompress.stats(model)["planned_tokens_per_layer"][-1] - 6
    vitcompress.compress(model, method, r=6, unmerge=True)
    assert count_flops(model, X[:1]) - reduced == (65 - final_tokens) * 5 * 48
    def planned_minus_counted(**budget):
        vitcompress.compress(model, method, **budget)
        runtime = runtime_of(model)
        return runtime.cost(64).flops(runtime.schedule, runtime.method, runtime.options) - count_flops(model, X[:1])

    # one schedule without and with unmerge: unmerge's own cost is planned exactly (a method's scoring
    # may be estimated, the same in both)
    assert planned_minus_counted(r=6, unmerge=True) == planned_minus_counted(r=6)
    if method in ("tome", "pitome", "zero_tprune"):  # their scoring's cost model is exact: flops= plans exactly
        assert planned_minus_counted(flops=0.7, unmerge=True) == 0


def test_transformers_hidden_states_and_backbone_feature_maps():
    from transformers import Dinov2Backbone, Dinov2Model

    model = Dinov2Model(dino_config()).eval()
    with torch.no_grad():
        expected = model(X, output_hidden_states=True)
        vitcompress.compress(model, "tome", r=0, unmerge=True)
        same = model(X, output_hidden_states=True)
        vitcompress.compress(model, "pitome", keep=0.8, unmerge=True)
        got = model(X, output_hidden_states=True)
    for a, b in zip(same.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert [h.shape for h in got.hidden_states] == [h.shape for h in expected.hidden_states]
    assert got.last_hidden_state.shape == expected.last_hidden_state.shape
    stats = vitcompress.stats(model)
    assert stats["tokens_per_layer"] == stats["planned_tokens_per_layer"] and stats["tokens_per_layer"][-1] < 65

    backbone = Dinov2Backbone(dino_config(out_features=["stage2", "stage4"])).eval()
    with torch.no_grad():
        maps = backbone(X).feature_maps
        vitcompress.compress(backbone, "zero_tprune", keep=0.8, unmerge=True)
        got = backbone(X).feature_maps
    assert [m.shape for m in got] == [m.shape for m in maps] == [(2, 32, 8, 8)] * 2
    assert runtime_of(backbone).last_forward().unmerge_after == {1, 3}  # only the layers its feature maps read
    with torch.no_grad():
        hidden = backbone(X, output_hidden_states=True).hidden_states
    assert [h.shape[1] for h in hidden] == [65] * 5
    assert runtime_of(backbone).last_forward().unmerge_after == {0, 1, 2, 3}


def depth_anything():
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    torch.manual_seed(0)
    config = DepthAnythingConfig(backbone_config=dino_config(out_features=["stage1", "stage2", "stage3", "stage4"],
                                                             reshape_hidden_states=False),
                                 reassemble_hidden_size=32, neck_hidden_sizes=[16, 16, 16, 16], fusion_hidden_size=16,
                                 head_hidden_size=8, patch_size=4)
    return DepthAnythingForDepthEstimation(config).eval()


def dpt():
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(0)
    config = DPTConfig(backbone_config=dino_config(out_features=["stage2", "stage3", "stage4"],
                                                   reshape_hidden_states=False),
                       is_hybrid=False, hidden_size=32, neck_hidden_sizes=[16, 16, 16], fusion_hidden_size=16,
                       reassemble_factors=[2, 1, 0.5], patch_size=4, image_size=32)
    return DPTForDepthEstimation(config).eval()


@pytest.mark.parametrize("build", [depth_anything, dpt])
@pytest.mark.parametrize("method", METHODS)
def test_depth_models_keep_their_output_shape_and_restore_exactly(build, method):
    model = build()
    with torch.no_grad():
        expected = model(X).predicted_depth
        vitcompress.compress(model, method, unmerge=True, **budget(method))
        got = model(X).predicted_depth
        assert vitcompress.stats(model)["tokens_per_layer"][-1] < 65
        assert got.shape == expected.shape and torch.isfinite(got).all()
        vitcompress.restore(model)
        assert torch.equal(model(X).predicted_depth, expected)


def test_refusals_name_the_fix(monkeypatch):
    from transformers import DPTConfig, DPTForDepthEstimation

    with pytest.raises(ValueError, match="compress it with unmerge=True"):
        vitcompress.compress(depth_anything(), "tome", r=2)
    with pytest.raises(TypeError, match="supported with a DINOv2 backbone"):
        vitcompress.compress(DPTForDepthEstimation(DPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                             intermediate_size=64, image_size=32, patch_size=4)),
                             "tome", r=2, unmerge=True)
    with pytest.raises(ValueError, match="unmerge=True for outputs on the patch grid"):
        model = vitcompress.compress(tiny_vit(), "tome", r=2)
        model.forward_intermediates(X, output_fmt="NCHW")
    from vitcompress.testing import tiny_detr
    with pytest.raises(TypeError, match="focus_detr reduces detr models.*drop unmerge="):
        vitcompress.compress(tiny_detr(), "focus_detr", keep=0.5, unmerge=True)
    from vitcompress.testing import tiny_llava
    llava = tiny_llava("llava")
    with pytest.raises(ValueError, match="every visual token again; drop unmerge="):
        vitcompress.compress(llava, "tome", r=2, unmerge=True)
    with pytest.raises(TypeError, match="tokencorr reduces llava models.*drop unmerge="):
        vitcompress.compress(llava, "tokencorr", keep=0.5, unmerge=True)

    class ContentDependent(ViTMethod):
        name, dynamic = "content_dependent", True

    monkeypatch.setitem(REGISTRY, ContentDependent.name, ContentDependent())
    with pytest.raises(ValueError, match="depend on the content: use a static ViT method"):
        vitcompress.compress(tiny_vit(), ContentDependent.name, r=2, unmerge=True)


@pytest.mark.parametrize("variant", ["tok", "avg"])
def test_open_clip_tower_intermediates_on_the_grid(variant):
    """An open_clip image tower: NCHW intermediates and the pooled embedding keep the uncompressed shapes."""
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(32, 4, 32, 3, 2, 2.0, output_dim=16, pool_type=variant).eval()
    with torch.no_grad():
        expected = tower.forward_intermediates(X)
        vitcompress.compress(tower, "tome", r=6, unmerge=True)
        got = tower.forward_intermediates(X)
    assert vitcompress.stats(tower)["tokens_per_layer"] == [65, 59, 53]
    assert [t.shape for t in got["image_intermediates"]] == [t.shape for t in expected["image_intermediates"]]
    assert got["image_features"].shape == expected["image_features"].shape == (2, 16)


def test_transformers_clip_tower_hidden_states_on_the_grid():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                             num_attention_heads=2, image_size=32, patch_size=4)).eval()
    with torch.no_grad():
        expected = model(pixel_values=X, output_hidden_states=True)
        vitcompress.compress(model, "pitome", keep=0.8, unmerge=True)
        got = model(pixel_values=X, output_hidden_states=True)
    assert vitcompress.stats(model)["tokens_per_layer"][-1] < 65
    assert [h.shape for h in got.hidden_states] == [h.shape for h in expected.hidden_states]
    assert got.pooler_output.shape == expected.pooler_output.shape
