"""CLIP image towers (open_clip and transformers) and experiments/evaluation/eval_clip.py, on tiny random models."""
import json

import pytest
import torch

import vitcompress
from conftest import load_script

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CustomTextCLIP  # noqa: E402
from open_clip.transformer import VisionTransformer  # noqa: E402

from vitcompress.testing import (OPEN_CLIP_TEXT, OPEN_CLIP_VARIANTS, OPEN_CLIP_VISION,  # noqa: E402
                                 random_images, tiny_clip, tiny_vit)

METHODS = ["tome", "pitome", "zero_tprune"]
X = random_images()


def expand_by_size(x, size):
    """Each token repeated as many times as the patches it stands for (batch of one)."""
    return x[0].repeat_interleave(size[0, :, 0].round().long(), dim=0)[None]


# --------------------------------------------------------------------------- open_clip


@pytest.mark.parametrize("variant", OPEN_CLIP_VARIANTS)
def test_open_clip_variants(variant):
    """keep=1.0 reproduces the tower, a real budget follows the schedule with encode_image's shape,
    restore is bit-exact, for every ViT method."""
    model = tiny_clip(**OPEN_CLIP_VARIANTS[variant])
    with torch.no_grad():
        ref = model.encode_image(X)
        for method in METHODS:
            vitcompress.compress(model, method, keep=1.0)
            torch.testing.assert_close(model.encode_image(X), ref, atol=1e-5, rtol=1e-5)
            vitcompress.compress(model, method, keep=0.8)
            out = model.encode_image(X)
            st = vitcompress.stats(model)
            assert out.shape == ref.shape and torch.isfinite(out).all()
            assert st["tokens_per_layer"] == st["planned_tokens_per_layer"] and st["tokens_per_layer"][-1] < 65
            assert st["family"] == "open_clip.VisionTransformer"
            vitcompress.restore(model)
            assert torch.equal(model.encode_image(X), ref)


def test_open_clip_sequence_first_layout():
    """open_clip before 3.x runs its blocks on [L, N, D]; the adapter follows the tower's layout."""
    model = tiny_clip(ls_init_value=0.1)
    model.visual.transformer.batch_first = False
    for block in model.visual.transformer.resblocks:
        block.attn.batch_first = False
    with torch.no_grad():
        ref = model.encode_image(X)
        vitcompress.compress(model, "pitome", keep=1.0)
        torch.testing.assert_close(model.encode_image(X), ref, atol=1e-5, rtol=1e-5)
        vitcompress.compress(model, "tome", r=6)
        out = model.encode_image(X)
    assert out.shape == ref.shape
    assert vitcompress.stats(model)["tokens_per_layer"] == [65, 59, 53, 47]


@pytest.mark.parametrize("cls", [CLIP, CustomTextCLIP])
def test_open_clip_text_tower_untouched(cls):
    torch.manual_seed(0)
    model = cls(16, OPEN_CLIP_VISION, OPEN_CLIP_TEXT).eval()
    text = torch.randint(0, OPEN_CLIP_TEXT["vocab_size"], (3, OPEN_CLIP_TEXT["context_length"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model.encode_text(text)
        vitcompress.compress(model, "pitome", keep=0.8)
        model(X, text)
        out = model.encode_text(text)
    assert torch.equal(out, ref)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    text_blocks = (model.text if cls is CustomTextCLIP else model).transformer.resblocks
    assert not any("forward" in block.__dict__ for block in text_blocks)


@pytest.mark.parametrize("variant,method", [("tok", "zero_tprune"), ("custom_block", "tome"), ("attn_pool", "pitome")])
def test_open_clip_flops_budget_met_as_counted(variant, method):
    model = tiny_clip(**OPEN_CLIP_VARIANTS[variant])
    base = vitcompress.count_flops(model.visual, X[:1])
    vitcompress.compress(model, method, flops=0.7)
    ratio = vitcompress.count_flops(model.visual, X[:1]) / base
    assert abs(ratio - 0.7) < 0.014, ratio


def test_open_clip_avg_pool_weights_by_size():
    """Size-weighted average of merged tokens = plain average over the patches they stand for."""
    model = tiny_clip(pool_type="avg")
    model.visual.output_tokens = True
    vitcompress.compress(model, "tome", r=8)
    with torch.no_grad():
        pooled, tokens = model.visual(X[:1])
        size = vitcompress.stats(model)["size"][:, 1:]
    assert tokens.shape[1] == 65 - 4 * 8 - 1  # output_tokens are the reduced patch tokens
    assert size.sum() == 64 and size.max() > 1
    want = expand_by_size(tokens, size).mean(dim=1) @ model.visual.proj
    torch.testing.assert_close(pooled, want, atol=1e-5, rtol=1e-5)


def test_open_clip_attentional_pooler_is_proportional():
    """The pooler over merged tokens equals the original pooler over every token repeated by its size."""
    model = tiny_clip(**OPEN_CLIP_VARIANTS["attn_pool"])
    pooler = model.visual.attn_pool
    vitcompress.compress(model, "pitome", r=8)
    captured = {}
    hook = pooler.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
    with torch.no_grad():
        model.encode_image(X[:1])
        size = vitcompress.stats(model)["size"]
        assert size.max() > 1
        want = type(pooler).forward(pooler, expand_by_size(captured["x"], size))
    hook.remove()
    torch.testing.assert_close(captured["out"], want, atol=1e-5, rtol=1e-5)


def test_open_clip_vision_transformer_alone_and_intermediates():
    torch.manual_seed(0)
    tower = VisionTransformer(32, 4, 32, 3, 2, 2.0, output_dim=16).eval()
    vitcompress.compress(tower, "zero_tprune", keep=0.8)
    with torch.no_grad():
        assert tower(X).shape == (2, 16)
        out = tower.forward_intermediates(X, output_fmt="NLC")
    schedule = tower._vitcompress.schedule
    after_each_block = list(schedule.tokens[1:]) + [schedule.final_tokens]
    assert [t.shape[1] + 1 for t in out["image_intermediates"]] == after_each_block
    with torch.no_grad():
        with pytest.raises(ValueError, match="output_fmt='NLC'"):
            tower.forward_intermediates(X)


def test_open_clip_unsupported_configurations():
    with pytest.raises(TypeError, match="scaled cosine attention"):
        vitcompress.compress(tiny_clip(scaled_cosine_attn=True), "tome", r=2)
    with pytest.raises(TypeError, match="not a VisionTransformer"):
        vitcompress.compress(CLIP(16, dict(layers=(1, 1, 1, 1), width=8, image_size=32), OPEN_CLIP_TEXT), "tome", r=2)
    tower = VisionTransformer(32, 4, 32, 2, 2, 2.0, output_dim=16, pool_type="none")
    with pytest.raises(ValueError, match="pool_type='none'"):
        vitcompress.compress(tower, "tome", r=2)
    model = vitcompress.compress(tiny_clip(), "tome", r=2)
    with pytest.raises(ValueError, match="attn_mask"):
        model.visual.transformer(torch.randn(1, 65, 32), attn_mask=torch.zeros(65, 65))


def test_pitome_margin_default_per_family():
    """PiToMe's paper margin: 0.9 on CLIP towers, 0.75 on ViT/DeiT; an explicit margin wins."""
    clip_model = vitcompress.compress(tiny_clip(), "pitome", keep=0.9)
    assert vitcompress.stats(clip_model)["options"]["margin"] == 0.9
    timm_model = vitcompress.compress(tiny_vit(), "pitome", keep=0.9)
    assert vitcompress.stats(timm_model)["options"]["margin"] == 0.75
    vitcompress.compress(clip_model, "pitome", keep=0.9, margin=0.5)
    assert vitcompress.stats(clip_model)["options"]["margin"] == 0.5


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers


HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                 image_size=32, patch_size=4)
HF_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def hf_vision(hf, attn="sdpa"):
    torch.manual_seed(0)
    return hf.CLIPVisionModel(hf.CLIPVisionConfig(**HF_VISION, attn_implementation=attn)).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_vision_model(hf, attn):
    model = hf_vision(hf, attn)
    with torch.no_grad():
        ref = model(pixel_values=X, output_hidden_states=True)
        for method in METHODS:
            vitcompress.compress(model, method, keep=1.0)
            same = model(pixel_values=X)
            torch.testing.assert_close(same.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(same.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
            vitcompress.compress(model, method, keep=0.8)
            out = model(pixel_values=X, output_hidden_states=True)
            st = vitcompress.stats(model)
            assert st["family"] == "transformers.CLIPVision"
            assert st["tokens_per_layer"] == st["planned_tokens_per_layer"]
            assert out.pooler_output.shape == ref.pooler_output.shape
            # hidden_states[i]: input of layer i (reduced by the layers before it), then the output
            counts = [h.shape[1] for h in out.hidden_states]
            assert counts[:-1] == st["planned_tokens_per_layer"] and counts[-1] == out.last_hidden_state.shape[1]
            assert counts[-1] < counts[0] == 65
            vitcompress.restore(model)
            back = model(pixel_values=X)
            assert torch.equal(back.pooler_output, ref.pooler_output)
            assert torch.equal(back.last_hidden_state, ref.last_hidden_state)


def test_hf_clip_model_text_tower_untouched(hf):
    torch.manual_seed(0)
    config = hf.CLIPConfig(vision_config=HF_VISION, text_config=HF_TEXT, projection_dim=16)
    model = hf.CLIPModel(config).eval()
    ids = torch.randint(2, 100, (3, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=X)
        vitcompress.compress(model, "pitome", keep=0.8)
        out = model(input_ids=ids, pixel_values=X)
    assert torch.equal(out.text_embeds, ref.text_embeds)
    assert out.image_embeds.shape == ref.image_embeds.shape
    assert not torch.allclose(out.image_embeds, ref.image_embeds)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("forward" in layer.__dict__ for layer in model.text_model.encoder.layers)
    assert vitcompress.stats(model)["options"]["margin"] == 0.9


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_hf_flops_budget_met_as_counted(hf, method):
    model = hf_vision(hf)
    base = vitcompress.count_flops(model, X[:1])
    vitcompress.compress(model, method, flops=0.7)
    ratio = vitcompress.count_flops(model, X[:1]) / base
    assert abs(ratio - 0.7) < 0.014, ratio


def test_hf_adapter_on_a_bare_vision_tower(hf):
    """What a LLaVA does: the adapter by name on its CLIPVisionModel, then hidden_states[-2]."""
    from vitcompress.adapters.hf_clip import HFCLIPVisionAdapter

    model = hf_vision(hf)
    adapter = HFCLIPVisionAdapter(model)
    assert (adapter.num_prefix, adapter.num_patches, adapter.depth, adapter.variant) == (1, 64, 4, "clip")
    vitcompress.compress(model, "tome", r=5)
    with torch.no_grad():
        out = model(pixel_values=X, output_hidden_states=True)
    assert out.hidden_states[-2].shape == (2, 65 - 3 * 5, 32)


def test_hf_unsupported(hf):
    model = vitcompress.compress(hf_vision(hf), "tome", r=4)
    with pytest.raises(ValueError, match="output_attentions"):
        model(pixel_values=X, output_attentions=True)
    odd = hf_vision(hf)
    for layer in odd.modules():
        if hasattr(layer, "self_attn"):
            layer.self_attn.config._attn_implementation = "paged_attention"
    with pytest.raises(ValueError, match="attention implementation 'paged_attention'"):
        vitcompress.compress(odd, "tome", r=4)
    with pytest.raises(TypeError, match="cannot compress"):
        vitcompress.compress(hf.CLIPTextModel(hf.CLIPTextConfig(**HF_TEXT)), "tome", r=4)


# --------------------------------------------------------------------------- eval_clip.py


@pytest.fixture(scope="module")
def eval_clip():
    return load_script("evaluation/eval_clip.py")


def test_recall_at_k_by_hand(eval_clip):
    # 2 images, 3 captions: captions 0, 1 belong to image 0, caption 2 to image 1
    sim = torch.tensor([[0.1, 0.9, 0.5],
                        [0.8, 0.2, 0.3]])
    owner = torch.tensor([0, 0, 1])
    r = eval_clip.recall_at_k(sim, owner, ks=(1, 2))
    # image 0: best own caption 0.9 ranks first; image 1: own caption 0.3 has 0.8 above -> rank 1
    assert (r["i2t_r1"], r["i2t_r2"]) == (0.5, 1.0)
    # caption 0: image 1 scores 0.8 > 0.1 -> rank 1; caption 1: rank 0; caption 2: 0.5 > 0.3 -> rank 1
    assert (r["t2i_r1"], r["t2i_r2"]) == (pytest.approx(1 / 3), 1.0)


def test_eval_clip_end_to_end(eval_clip, tmp_path, capsys, monkeypatch):
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
    rng = torch.Generator().manual_seed(0)

    def image(colour, path):
        noise = torch.randint(0, 30, (32, 32, 3), generator=rng)
        Image.fromarray((torch.tensor(colour) + noise).clamp(0, 255).byte().numpy()).save(path)

    for name, colour in colours.items():
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(2):
            image(colour, tmp_path / "classes" / name / f"{i}.png")
    (tmp_path / "images").mkdir()
    lines = []
    for i, (name, colour) in enumerate(colours.items()):
        image(colour, tmp_path / "images" / f"{i}.png")
        lines += [f"{i}.png#0\ta {name} square", f"{i}.png#1\tsomething {name}"]
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"embed_dim": 16, "vision_cfg": OPEN_CLIP_VISION, "text_cfg": dict(OPEN_CLIP_TEXT, vocab_size=49408)}
    (tmp_path / "tiny_clip.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    open_clip.add_model_config(tmp_path / "tiny_clip.json")
    torch.save(open_clip.create_model("tiny_clip").state_dict(), tmp_path / "tiny_clip.pt")

    compressed_encodes = []  # whether each encode_images call got a compressed model
    encode_images = eval_clip.encode_images

    def spy(model, *args, **kwargs):
        compressed_encodes.append(hasattr(model, "_vitcompress"))
        return encode_images(model, *args, **kwargs)

    monkeypatch.setattr(eval_clip, "encode_images", spy)
    out = tmp_path / "rows.json"
    assert eval_clip.main([
        "--model-config", str(tmp_path / "tiny_clip.json"), "--checkpoint", str(tmp_path / "tiny_clip.pt"),
        "--data-dir", str(tmp_path / "classes"), "--captions", str(tmp_path / "captions.tsv"),
        "--images", str(tmp_path / "images"), "--batch-size", "4", "--workers", "0", "--runs", "1",
        "--device", "cpu", "--method", "pitome", "--keep", "0.8", "--opt", "alpha=0.5", "--json", str(out),
    ]) == 0
    table = capsys.readouterr().out
    assert "i2t R@10" in table and "% base" in table and "pitome tokens per layer" in table
    base, compressed = json.loads(out.read_text())
    assert (base["model"], compressed["model"]) == ("uncompressed", "pitome")
    assert compressed["setting"] == "keep=0.8,alpha=0.5"
    for row in (base, compressed):
        assert 0 <= row["zeroshot_top1"] <= row["zeroshot_top5"] == 1.0  # 3 classes: top-5 holds them all
        for d in ("i2t", "t2i"):
            assert 0 <= row[f"{d}_r1"] <= row[f"{d}_r5"] <= row[f"{d}_r10"] == 1.0
        assert row["images_per_s"] > 0
    assert compressed["gflops"] < base["gflops"]
    assert compressed["tokens_per_layer"][0] == 65 and compressed["tokens_per_layer"][-1] < 65
    # zero-shot and retrieval images of each row go through that row's model
    assert compressed_encodes == [False, False, True, True]


def test_eval_clip_rejects_bad_captions(eval_clip, tmp_path):
    (tmp_path / "captions.tsv").write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected '<image file><TAB><caption>'"):
        eval_clip.read_captions(str(tmp_path / "captions.tsv"))


def test_compressing_the_tower_then_the_whole_clip_replaces_and_restores_exactly():
    model = tiny_clip()
    with torch.no_grad():
        ref = model.encode_image(X)
        vitcompress.compress(model.visual, "tome", r=8)
        vitcompress.compress(model, "pitome", keep=0.8)  # replaces the tower's compression
        assert vitcompress.stats(model)["method"] == "pitome" and not hasattr(model.visual, "_vitcompress")
        vitcompress.restore(model)
        assert torch.equal(model.encode_image(X), ref)
        vitcompress.compress(model, "tome", r=8)
        with pytest.raises(ValueError, match="restore on that model first"):
            vitcompress.compress(model.visual, "pitome", keep=0.8)  # would stack on the whole model's patch
        vitcompress.restore(model)
        assert torch.equal(model.encode_image(X), ref)


def test_whole_coca_compresses_its_image_tower():
    from open_clip.coca_model import CoCa
    torch.manual_seed(0)
    vision = dict(OPEN_CLIP_VISION, layers=2, attentional_pool=True, attn_pooler_queries=8, attn_pooler_heads=2)
    multimodal = dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1, attn_pooler_heads=2)
    model = CoCa(16, multimodal, OPEN_CLIP_TEXT, vision).eval()
    with torch.no_grad():
        ref = model.encode_image(X)
        vitcompress.compress(model, "tome", r=8)
        out = model.encode_image(X)
        assert out.shape == ref.shape and vitcompress.stats(model)["tokens_per_layer"] == [65, 57]
        vitcompress.restore(model)
        assert torch.equal(model.encode_image(X), ref)


def test_open_clip_gradient_checkpointing_is_refused():
    model = tiny_clip().train()
    model.visual.set_grad_checkpointing(True)  # before compress: after, the switch itself refuses
    vitcompress.compress(model, "tome", r=4)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model.encode_image(X)


def test_r_budget_clamps_at_the_smaller_token_counts_of_patch_dropout():
    """r is checked at the tower's size; patch dropout in training leaves fewer tokens, where each
    block removes at most what ToMe can (half the reducible tokens), as ToMe does."""
    model = tiny_clip(patch_dropout=0.5)
    vitcompress.compress(model, "tome", r=12)
    with torch.no_grad():
        model.encode_image(X)
    assert vitcompress.stats(model)["tokens_per_layer"] == [65, 53, 41, 29]
    model.train()
    model.encode_image(X).sum().backward()
    assert vitcompress.stats(model)["tokens_per_layer"] == [33, 21, 11, 6]  # 32 patches: 12, 10, 5, 2 removed
    with pytest.raises(ValueError, match="can remove at most"):
        vitcompress.compress(tiny_clip(), "tome", r=40)  # at the tower's own size it is an error
