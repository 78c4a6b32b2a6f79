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
from vitcompress.testing import (half_flat, llava_inputs, ramp_scorer, random_images, tiny_clip, tiny_detr, tiny_llava,
                                 tiny_vit)


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


def crop_features(model, pixels):
    """``pixels[crops, 3, H, W]`` -> ``[crops, N, D]``: each patch's visual token as the uncompressed
    LLaVA makes it (the tower's hidden state of vision_feature_layer without CLS, projected)."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        return model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])


def handed_features(model, inputs, modality, question=None):
    """The visual tokens the compressed model hands its language model for this call, per image / video."""
    with torch.no_grad():
        prepared = runtime_of(model).prepare(dict(inputs), question)
    return list(prepared["mm_encoder_outputs"][modality].pooler_output)


@pytest.mark.parametrize("kind", ["llava", "next"])
def test_llava_tokencorr_draws_the_patches_of_each_crop_its_language_model_takes(kind):
    """Each crop's drawn (non-pruned) patches, taken from the uncompressed tower, are exactly the
    tokens the language model receives (LLaVA-1.5: in order; NeXT: as a set, the anyres packing
    interleaves the crops' rows and adds newlines)."""
    model = vitcompress.compress(tiny_llava(kind), "tokencorr")
    inputs = llava_inputs(model, kind, images=half_flat)  # partial budgets: some patches kept, some not
    seen = V.trace_llava(model, inputs)
    handed = handed_features(model, inputs, "image")
    pixels = inputs["pixel_values"]
    assert seen.modality == "image" and len(seen.rows) == 2
    for u, row in enumerate(seen.rows):
        features = crop_features(model, pixels[u][None] if pixels.dim() == 4 else pixels[u])
        drawn = []
        for panel in row:
            labels = panel.regions.flatten()
            kept = labels >= 0
            assert sorted(labels[kept].tolist()) == list(range(int(kept.sum())))  # one region per token
            drawn.append(features[panel.index][kept][labels[kept].argsort()])
        drawn = torch.cat(drawn)
        tokens = handed[u]
        if kind == "next":
            tokens = tokens[(tokens != model.model.image_newline).any(dim=-1)]
            match = torch.cdist(drawn, tokens).min(dim=1)
            assert match.values.max() < 1e-4 and sorted(match.indices.tolist()) == list(range(tokens.shape[0]))
        else:
            torch.testing.assert_close(drawn, tokens, rtol=0, atol=1e-5)
        assert 0 < drawn.shape[0] < sum(p.regions.numel() for p in row)
    fig = V.draw(model, inputs)
    assert len(fig.axes) == sum(len(row) for row in seen.rows) and fig.axes[0].get_title().startswith("crop 0: ")


def test_llava_tokencorr_merge_draws_each_dropped_patch_in_the_token_of_its_most_similar_kept_patch():
    """merge=True: every patch belongs to one token; a dropped patch joins the kept patch whose key
    (tower layer key_layer=-2, averaged over heads) is most similar, computed here from a hook."""
    model = vitcompress.compress(tiny_llava("llava"), "tokencorr", merge=True)
    inputs = llava_inputs(model, "llava", images=half_flat)
    tower = model.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
    heads = model.config.vision_config.num_attention_heads
    keys = []
    handle = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.append(out.detach()))
    try:
        seen = V.trace_llava(model, inputs)
    finally:
        handle.remove()
    k = keys[0].reshape(*keys[0].shape[:2], heads, -1).mean(dim=2)[:, 1:]
    k = torch.nn.functional.normalize(k, dim=-1)
    merged = 0
    for u, (panel,) in enumerate(seen.rows):
        labels = panel.regions.flatten()
        kept = vitcompress.stats(model)["image"][u]["crops"][0]["kept"]  # what the runtime says it kept
        assert 0 < len(kept) < 64 and labels.unique().tolist() == list(range(len(kept)))  # every patch in a token
        for p in range(64):
            if p in kept:
                assert labels[p] == kept.index(p)
            else:
                merged += 1
                assert labels[p] == kept.index(max(kept, key=lambda q: float(k[u, p] @ k[u, q]))), p
    assert merged > 0


@pytest.mark.parametrize("kind, frames", [("llava", 1), ("next_video", 4), ("onevision", 4)])
def test_quota_draws_the_grid_each_frame_was_resized_to(kind, frames):
    """Per frame, the drawn grid is the one QuoTA's formulas give for the ramp scorer (computed here:
    w_i = (100 p_i)^2 normalised, n_i = int(budget w_i), h' = round(sqrt(n h / w)), w' = n // h'),
    and the tokens drawn plus the model's extra tokens are the tokens its language model takes."""
    keep = 0.5
    model = vitcompress.compress(tiny_llava(kind), "quota", keep=keep, scorer=ramp_scorer)
    inputs = llava_inputs(model, kind)
    seen = V.trace_llava(model, inputs, question="what moves?")
    modality = "image" if kind == "llava" else "video"
    handed = handed_features(model, inputs, modality, "what moves?")
    stats = vitcompress.stats(model)[modality]
    side = 8 if kind == "llava" else 4  # the tiny NeXT-Video / OneVision pool each frame's 8x8 patches to 4x4
    probs = torch.linspace(0.1, 1.0, frames).tolist()
    squares = [(100 * p) ** 2 for p in probs]
    budget = int(keep * frames * side * side)
    for u, row in enumerate(seen.rows):
        assert len(row) == frames
        drawn = 0
        for panel, p in zip(row, squares):
            n = int(budget * p / sum(squares))
            labels = panel.regions
            if n <= 0:
                assert bool((labels < 0).all()) and panel.title.endswith("dropped")
                continue
            rows = min(n, max(1, round((n * side / side) ** 0.5)))
            cols = n // rows
            assert labels.unique().tolist() == list(range(rows * cols))
            assert labels.unique(dim=0).shape[0] == rows and labels.unique(dim=1).shape[1] == cols  # a grid
            assert labels[0, -1] == cols - 1 and labels[-1, 0] == (rows - 1) * cols  # row-major, as the tokens
            drawn += rows * cols
        extra = stats[u]["extra_tokens"]
        assert drawn + extra == handed[u].reshape(-1, handed[u].shape[-1]).shape[0] == stats[u]["tokens_after"]


def test_models_that_cannot_be_drawn_are_refused_in_one_line():
    with pytest.raises(ValueError, match="vitcompress.compress"):
        V.trace(tiny_vit(), random_images(1))
    llava = vitcompress.compress(tiny_llava("llava"), "tokencorr")
    with pytest.raises(TypeError, match=r"draw it with vitcompress.visualize.draw\(model, inputs\)") as err:
        V.trace(llava, random_images(1))
    assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="as a dict") as err:
        V.trace_llava(llava, random_images(1))
    assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="trace_llava draws a LLaVA compressed with tokencorr or quota"):
        V.trace_llava(vitcompress.compress(tiny_vit(), "tome", r=2), {"input_ids": None})
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
    (["{photo}", "--method", "focus_detr"], "methods for ViT-like image encoders: " + ", ".join(vitcompress.list_methods("vit"))),
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


@pytest.fixture
def hf_dir(tmp_path):
    """A small random DINOv2 and its image processor (48x48 crops, mean/std 0.5), as save_pretrained writes them."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                       image_size=32, patch_size=4)
    path = tmp_path / "tiny_dinov2"
    transformers.Dinov2Model(config).save_pretrained(path)
    transformers.BitImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48},
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    return path


def test_show_loads_a_transformers_model_from_a_local_directory(hf_dir, photos, tmp_path, capsys):
    from vitcompress.evaluation import models

    loaded = models.load_model(f"hf:{hf_dir}", num_images=0, libraries=True)
    assert type(loaded.model).__name__ == "Dinov2Model" and loaded.input_size == (3, 48, 48)  # the processor's crop
    assert loaded.mean == loaded.std == (0.5, 0.5, 0.5)
    out = str(tmp_path / "hf.png")
    assert cli.main(["show", *photos, "--model", f"hf:{hf_dir}", "--keep", "0.7", "-o", out]) == 0
    assert png_size(out) == ("PNG", expected_size(rows=2, cols=2))
    assert f"hf:{hf_dir} (transformers weights), 2 image(s)" in capsys.readouterr().out
    for name in ("preprocessor_config.json",):  # without a saved processor: the config's size, ImageNet's mean
        (hf_dir / name).unlink()
    loaded = models.load_model(f"hf:{hf_dir}", num_images=0, libraries=True)
    assert loaded.input_size == (3, 32, 32) and loaded.mean is None
    with pytest.raises(ValueError, match="unknown model"):  # the other commands take timm names only
        models.check_model_name(f"hf:{hf_dir}")


def test_an_open_clip_name_gives_its_architecture_and_normalisation():
    import open_clip

    from vitcompress.evaluation import models

    loaded = models.load_model("open_clip:ViT-B-32", num_images=0, libraries=True)
    assert isinstance(loaded.model, open_clip.CLIP) and loaded.weights == "random weights"
    assert loaded.input_size == (3, 224, 224) and loaded.mean == tuple(open_clip.OPENAI_DATASET_MEAN)


@pytest.mark.parametrize("argv, fix", [
    (["--model", "hf:facebook/dinov2-small"], "--model hf:DIR"),
    (["--model", "open_clip:ViT-B-32/laion2b_s34b_b79k"], "--model open_clip:ViT-B-32/FILE"),
    (["--model", "open_clip:ViT-B-99"], "unknown open_clip architecture 'ViT-B-99'"),
    (["--model", "hf:"], "e.g. hf:facebook/dinov2-small"),
    (["--model", "hf:facebook/dinov2-small", "--pretrained"], "drop --pretrained"),
])
def test_show_with_the_hub_unreachable_says_how_to_load_locally_in_one_line(argv, fix, photos, tmp_path, capsys,
                                                                           monkeypatch):
    """The loaders fail as they do offline (transformers: OSError "couldn't connect"; open_clip:
    RuntimeError "Failed to download"), without waiting for the hub's retries."""
    import open_clip
    import transformers

    def offline_hf(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.\nCheck your internet connection")

    def offline_open_clip(*args, pretrained=None, **kwargs):
        if pretrained:
            raise RuntimeError(f"Failed to download weights for tag '{pretrained}': ...")
        return None

    from transformers import AutoImageProcessor  # noqa: F401  (its first import logs torch warnings to stderr)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", offline_hf)
    monkeypatch.setattr(open_clip, "create_model", offline_open_clip)
    capsys.readouterr()
    out = tmp_path / "out.png"
    try:
        code = cli.main(["show", photos[0], *argv, "-o", str(out)])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fix in err and "Traceback" not in err, err
    assert not out.exists()


def test_make_pictures_writes_every_docs_picture(tmp_path):
    """The docs' pictures script, on the embedded model (the real ViT-S/14 is not built in tests)."""
    load_script("tools/make_pictures.py").main(["--reference", "--out", str(tmp_path)])
    names = ["show_compare.png"] + [f"show_{m}.png" for m in ("tome", "pitome", "zero_tprune")] + ["show_blocks.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert png_size(tmp_path / "show_compare.png") == ("PNG", expected_size(rows=3, cols=4))
    assert png_size(tmp_path / "show_blocks.png") == ("PNG", expected_size(rows=1, cols=7))  # 6 blocks: 0-4 + last
