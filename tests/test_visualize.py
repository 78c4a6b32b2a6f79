"""vitcompress.visualize and ``vitcompress show`` (issue 25): the drawn regions are exactly what the
runtime's source map says (a DETR's: the tokens each encoder layer ran on; a LLaVA's: the tower tokens
its language model takes), tracing leaves the user's configuration as it was, and the command writes
a figure of a known size or refuses bad input in one line."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vitcompress
from conftest import load_script
from vitcompress import cli
from vitcompress import visualize as V
from vitcompress.evaluation import reference_model
from vitcompress.interfaces import runtime_of
from vitcompress.testing import llava_inputs, random_images, tiny_clip, tiny_detr, tiny_llava, tiny_vit


def expected_regions(source, num_prefix, grid):
    """Per patch, the reducible token whose source row covers it (-1: none), patch by patch, with
    each patch checked to be covered at most once."""
    B, N, N0 = source.shape
    out = torch.full((B, N0 - num_prefix), -1, dtype=torch.long)
    for b in range(B):
        for token in range(N - num_prefix):
            for patch in torch.nonzero(source[b, num_prefix + token, num_prefix:]).flatten().tolist():
                assert out[b, patch] == -1, "a patch covered by two tokens"
                out[b, patch] = token
    return out.reshape(B, *grid)


def traced_source(model, x, method, **budget):
    """The user's way: compress with trace_source=True, run, read stats(model)['source']."""
    vitcompress.compress(model, method, trace_source=True, **budget)
    with torch.no_grad():
        model(x)
    return vitcompress.stats(model)["source"]


@pytest.mark.parametrize("method, budget", [("tome", dict(r=6)), ("pitome", dict(keep=0.8)),
                                            ("zero_tprune", dict(keep=0.8))])
def test_regions_partition_the_patches_as_the_source_map_says(method, budget):
    model = tiny_vit()
    x = random_images(3)
    source = traced_source(model, x, method, **budget)
    seen = V.trace(model, x)
    want = expected_regions(source, 1, (8, 8))
    assert torch.equal(seen.regions, want)
    for image in seen.regions:  # each remaining token is one region
        assert sorted(image[image >= 0].unique().tolist()) == list(range(seen.tokens))
    pruned = (seen.regions < 0).any()
    assert bool(pruned) == (method == "zero_tprune")  # pruning leaves patches without a token, merging never


def test_regions_on_the_reference_model_and_its_images():
    model, images, _ = reference_model.load(num_images=4)
    source = traced_source(model, images, "tome", r=4)
    p = model.num_prefix_tokens
    assert torch.equal(V.trace(model, images).regions, expected_regions(source, p, (8, 8)))


@pytest.mark.parametrize("budget", [dict(r=0), dict(keep=1.0)])
def test_a_budget_that_keeps_every_token_draws_the_unmodified_grid(budget):
    model = vitcompress.compress(tiny_vit(), "tome", **budget)
    seen = V.trace(model, random_images(2))
    grid = torch.arange(64).reshape(8, 8)
    assert torch.equal(seen.regions, grid.expand(2, 8, 8)) and seen.tokens == 64
    assert V.group_colours(seen.regions[0]) == {}


def test_an_attribute_of_the_package():
    code = "import vitcompress; print(vitcompress.visualize.draw.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "draw", proc.stderr


def test_patch_grid_from_the_image_shape():
    assert V.patch_grid(32, 32, 64) == (8, 8)
    assert V.patch_grid(24, 40, 60) == (6, 10)
    assert V.patch_grid(40, 24, 60) == (10, 6)
    assert V.patch_grid(224, 448, 512) == (16, 32)


def test_a_batch_of_non_square_inputs_with_dynamic_img_size():
    model = tiny_vit(dynamic_img_size=True)
    x = torch.randn(3, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    source = traced_source(model, x, "tome", keep=0.8)
    seen = V.trace(model, x)
    assert seen.regions.shape == (3, 6, 10) and seen.num_patches == 60
    assert torch.equal(seen.regions, expected_regions(source, 1, (6, 10)))
    assert not torch.equal(seen.regions[0], seen.regions[1])  # each image its own regions


def test_the_users_trace_setting_hooks_and_outputs_are_left_as_they_were():
    model = vitcompress.compress(tiny_vit(), "tome", r=6)
    calls = []
    model.blocks[1].register_forward_hook(lambda m, a, o: calls.append(1))
    hooks = [dict(b._forward_hooks) for b in model.blocks]
    x = random_images(2)
    with torch.no_grad():
        before = model(x)
    outputs = []
    seen = V.trace(model, x, blocks=[1, 2], forward=lambda m, images: outputs.append(m(images)))
    assert torch.equal(outputs[0], before)  # tracing sources does not change what the model computes
    assert runtime_of(model).trace_source is False
    assert [dict(b._forward_hooks) for b in model.blocks] == hooks and len(calls) == 2
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert "source" not in vitcompress.stats(model)  # the next forward traces nothing again
    assert set(seen.after) == {1, 2}


def test_a_failing_forward_still_restores_the_setting_and_removes_the_hooks():
    model = vitcompress.compress(tiny_vit(), "tome", r=6)

    def fails(m, images):
        m(images)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        V.trace(model, random_images(2), blocks=[0, 3], forward=fails)
    assert runtime_of(model).trace_source is False
    assert all(not b._forward_hooks for b in model.blocks)


@pytest.mark.parametrize("method, budget", [("tome", dict(r=5)), ("zero_tprune", dict(keep=0.8))])
def test_regions_after_chosen_blocks_agree_with_the_token_counts_per_block(method, budget):
    model = vitcompress.compress(tiny_vit(), method, **budget)
    x = random_images(2)
    seen = V.trace(model, x, blocks=[0, 1, 2])
    entering = vitcompress.stats(model)["tokens_per_layer"]  # tokens entering each block, prefix included
    for block, regions in seen.after.items():
        for image in regions:
            assert image[image >= 0].unique().numel() == entering[block + 1] - 1 == seen.tokens_after[block]
    counts = [seen.tokens_after[b] for b in (0, 1, 2)] + [seen.tokens]
    assert counts == sorted(counts, reverse=True) and counts[0] < 64


def test_whole_clip_models_through_their_image_forward():
    """A whole open_clip CLIP and a whole HF CLIPModel (whose forward needs text): the regions of the
    image tower compressed on its own."""
    import transformers as hf

    x = random_images(2)
    for model, tower in [(tiny_clip(), "visual"), (hf.CLIPModel(hf.CLIPConfig(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                               image_size=32, patch_size=4),
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             vocab_size=100, max_position_embeddings=16), projection_dim=16)).eval(), "vision_model")]:
        part = getattr(model, tower)
        vitcompress.compress(part, "tome", r=6, trace_source=True)
        with torch.no_grad():
            part(x)
        want = expected_regions(vitcompress.stats(part)["source"], 1, (8, 8))
        vitcompress.restore(part)
        vitcompress.compress(model, "tome", r=6)
        assert torch.equal(V.trace(model, x).regions, want)


def test_render_greys_pruned_patches_and_colours_touching_groups_apart():
    regions = torch.tensor([[0, 0, 1, 1], [2, 2, 1, 1], [-1, -1, 3, 4], [-1, -1, 5, 6]])
    picture = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = V.render(picture, regions, min_cell=16)
    assert out.shape == (64, 64, 3)
    pruned = out[36:60, 4:28]
    assert np.allclose(pruned[..., 0], pruned[..., 1]) and np.allclose(pruned[..., 1], pruned[..., 2])
    single = out[36:44, 52:60]  # inside token 3's patch, away from its border: the plain picture
    assert np.allclose(single, picture.permute(1, 2, 0).numpy()[36:44, 52:60], atol=1e-5)
    assert set(V.group_colours(regions)) == {0, 1, 2}  # the tokens of more than one patch


def test_touching_merge_groups_get_different_colours():
    model = vitcompress.compress(tiny_vit(), "tome", r=8)  # many groups: more than the palette's colours
    for regions in V.trace(model, random_images(4)).regions:
        colours = V.group_colours(regions)
        assert len(colours) > len(V.PALETTE)
        pairs = {(int(a), int(b)) for a, b in zip(regions[:, :-1].flatten(), regions[:, 1:].flatten())}
        pairs |= {(int(a), int(b)) for a, b in zip(regions[:-1].flatten(), regions[1:].flatten())}
        touching = [(a, b) for a, b in pairs if a != b and a in colours and b in colours]
        assert touching and all(colours[a] != colours[b] for a, b in touching)


def test_compare_compresses_each_method_and_restores_exactly():
    model = tiny_vit()
    x = random_images(2)
    with torch.no_grad():
        before = model(x)
    fig = V.compare(model, x, ("tome", "zero_tprune"), flops=0.8)
    assert runtime_of(model) is None
    with torch.no_grad():
        assert torch.equal(model(x), before)
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles[0] == "input" and titles[1].startswith("tome: ") and titles[2].startswith("zero_tprune: ")
    assert all(abs(float(t.split(": ")[1].split("x")[0]) - 0.8) <= 0.02 for t in titles[1:])  # the FLOPs reached
    vitcompress.compress(model, "tome", r=2)
    with pytest.raises(ValueError, match="pass it uncompressed"):
        V.compare(model, x, ("tome",), flops=0.8)


def test_llava_visual_tokens_per_crop_are_those_its_language_model_takes():
    """A ViT method inside LLaVA-1.5's vision tower: the final regions are the tokens of the block
    whose output the language model takes (vision_feature_layer=-2: the one before the last)."""
    model = vitcompress.compress(tiny_llava("llava"), "tome", r=4)
    inputs = llava_inputs(model, "llava")
    with torch.no_grad():
        model(**inputs)
    taken = vitcompress.stats(model)["visual_tokens_after"]
    seen = V.trace(model, inputs["pixel_values"], blocks=[0])
    assert seen.depth == 3 and seen.tokens * 2 == taken == 2 * (64 - 3 * 4)
    for image in seen.regions:
        assert sorted(image.unique().tolist()) == list(range(seen.tokens))  # merged, nothing pruned
    assert seen.tokens_after == {0: 60}
    assert vitcompress.stats(model)["tower"]["options"]["trace_source"] is False


def test_models_that_cannot_be_drawn_are_refused_in_one_line():
    with pytest.raises(ValueError, match="vitcompress.compress"):
        V.trace(tiny_vit(), random_images(1))
    llava = vitcompress.compress(tiny_llava("llava"), "tokencorr")
    with pytest.raises(TypeError, match="content-dependent number of visual tokens .* a ViT method inside") as err:
        V.trace(llava, random_images(1))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="blocks 0 to 3"):
        V.trace(vitcompress.compress(tiny_vit(), "tome", r=2), random_images(1), blocks=[4])


def detr_trace(keep=0.5, images=None, **options):
    model = vitcompress.compress(tiny_detr(), "focus_detr", keep=keep, scorer="attention", **options)
    x = random_images(2) if images is None else images
    with torch.no_grad():
        before = model(x).logits
    seen = V.trace(model, x, blocks=range(6))
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)  # drawing changes nothing
    return seen, vitcompress.stats(model)


def test_detr_kept_tokens_per_layer_agree_with_the_counts_and_nest():
    seen, stats = detr_trace()
    assert seen.regions.shape == (2, 4, 4) and seen.num_patches == stats["encoder_tokens"][0] == 16
    for i, per_layer in enumerate(stats["kept_per_image"]):
        kept = [set(seen.after[layer][i][seen.after[layer][i] >= 0].tolist()) for layer in range(6)]
        assert [len(k) for k in kept] == per_layer
        assert all(later <= earlier for earlier, later in zip(kept, kept[1:]))  # nested cascade
        grid = seen.after[0][i]
        assert all(grid.flatten()[t] == t for t in kept[0])  # a kept token sits at its own place
    assert torch.equal(seen.regions, seen.after[5])


def test_detr_keeping_every_token_draws_the_whole_feature_map_and_non_square_inputs():
    seen, _ = detr_trace(keep=1.0, cascade=[1.0] * 6, dual_k=0)
    assert all(torch.equal(r, torch.arange(16).reshape(4, 4).expand(2, 4, 4)) for r in seen.after.values())
    seen, stats = detr_trace(images=torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(0)))
    assert seen.regions.shape == (2, 6, 10) and stats["encoder_tokens"] == [60, 60]


def test_detr_draws_its_cascade_levels_by_default():
    model = vitcompress.compress(tiny_detr(), "focus_detr", keep=0.5, scorer="attention")
    x = random_images(2)
    seen = V.trace(model, x)
    counts = vitcompress.stats(model)["kept_per_image"][0]  # [8, 6, 4, 4, 3, 1]: layer 3 repeats layer 2
    assert sorted(seen.after) == [0, 1, 2, 4] and [seen.tokens_after[b] for b in (0, 1, 2, 4)] == [8, 6, 4, 3]
    assert counts == [8, 6, 4, 4, 3, 1] and seen.tokens == 1
    fig = V.draw(model, x)
    titles = [ax.get_title() for ax in fig.axes[:6]]
    assert titles[1].startswith("encoder layer 0\n8/16") and titles[-1].startswith("encoder layer 5 (last)")
    assert "passes through unchanged" in fig.get_suptitle() and "merged" not in fig.get_suptitle()
    vitcompress.compress(model, "focus_detr", keep=0.5, scorer="attention", cascade=[1.0, 0.5, 0.5, 0.25, 0.25, 0.25])
    seen = V.trace(model, x)  # kept [8, 4, 4, 2, 2, 2]: the last level drawn once, as the last layer
    assert sorted(seen.after) == [0, 1] and seen.tokens == 2


# --------------------------------------------------------------------------- the command


@pytest.fixture
def photos(tmp_path):
    paths = []
    for i, size in enumerate([(60, 40), (50, 50)]):
        pixels = np.random.default_rng(i).integers(0, 255, size=size + (3,), dtype=np.uint8)
        paths.append(str(tmp_path / f"photo{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def png_size(path):
    with Image.open(path) as image:
        return image.format, image.size


def expected_size(rows, cols):
    return (round(cols * V.PANEL_INCHES * V.DPI), round((rows * V.PANEL_INCHES + V.HEADER_INCHES) * V.DPI))


def test_show_writes_a_png_of_the_expected_size(photos, tmp_path, capsys):
    out = str(tmp_path / "compare.png")
    assert cli.main(["show", *photos, "--methods", "tome,pitome,zero_tprune", "--flops", "0.8", "-o", out]) == 0
    assert png_size(out) == ("PNG", expected_size(rows=2, cols=4))
    out = str(tmp_path / "blocks.png")
    assert cli.main(["show", photos[0], "--method", "pitome", "--keep", "0.8", "--blocks", "1,3", "-o", out]) == 0
    assert png_size(out) == ("PNG", expected_size(rows=1, cols=4))
    out = str(tmp_path / "timm.png")  # a timm model: RGB photos resized and normalised as it takes them
    assert cli.main(["show", *photos, "--model", "vit_tiny_patch16_224", "--r", "8", "-o", out]) == 0
    assert png_size(out) == ("PNG", expected_size(rows=2, cols=2))
    printed = capsys.readouterr().out
    assert printed.count("wrote") == 3 and "vit_tiny_patch16_224 (random weights)" in printed


@pytest.mark.parametrize("argv, fix", [
    (["/no/such/photo.png"], "does not exist; give the path of an image file"),
    (["{photo}", "--method", "tokencorr"], "content-dependent number of tokens"),
    (["{photo}", "--method", "focus_detr"], "methods for ViT-like image encoders: evit, mctf, pitome, tome, zero_tprune"),
    (["{photo}", "--methods", ","], "e.g. --methods tome,pitome,zero_tprune"),
    (["{photo}", "--methods", "tome,nosuch"], "known methods:"),
    (["{photo}", "--blocks", "a,b"], "e.g. --blocks 3,6"),
    (["{photo}", "--methods", "tome,pitome", "--blocks", "2"], "give --method, not --methods"),
    (["{photo}", "--flops", "1.5"], "outside (0, 1]"),
    (["{photo}", "-o", "{tmp}/out.gif"], ".png / .pdf / .svg / .jpg"),
    (["{photo}", "--model", "resnet10t"], "supported families are"),
    (["{photo}", "--blocks", "9"], "give blocks in that range"),
])
def test_show_refuses_bad_input_in_one_line_with_exit_2(argv, fix, photos, tmp_path, capsys):
    argv = [a.format(photo=photos[0], tmp=tmp_path) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out.png")]
    try:
        code = cli.main(["show", *argv])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fix in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_make_pictures_writes_every_docs_picture(tmp_path):
    """The docs' pictures script, on the embedded model (the real ViT-S/14 is not built in tests)."""
    load_script("tools/make_pictures.py").main(["--reference", "--out", str(tmp_path)])
    names = ["show_compare.png"] + [f"show_{m}.png" for m in ("tome", "pitome", "zero_tprune")] + ["show_blocks.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert png_size(tmp_path / "show_compare.png") == ("PNG", expected_size(rows=3, cols=4))
    assert png_size(tmp_path / "show_blocks.png") == ("PNG", expected_size(rows=1, cols=7))  # 6 blocks: 0-4 + last
