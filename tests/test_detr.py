"""DETR (transformers) with Focus-DETR foreground token scoring, the scorer's training script and
the COCO evaluation script, on tiny random detectors (no downloads)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("pycocotools")

import vitcompress  # noqa: E402
from vitcompress.adapters.detr import encoder_inputs, encoder_layer_parts, encoder_position_embeddings  # noqa: E402
from vitcompress.evaluation.coco import (CocoDetection, bbox_ap, collate, detections, fcos_assign,  # noqa: E402
                              foreground_targets, load_coco, loader)
from vitcompress.interfaces import runtime_of  # noqa: E402
from vitcompress.methods.focus_detr import (PAPER_CASCADE, FocusScorer, cascade_for_depth,  # noqa: E402
                                            dual_attention_tokens, foreground_logits, save_scorer)
from vitcompress.profile.detr import count_encoder_flops  # noqa: E402
from vitcompress.testing import (DETR_D_MODEL, DETR_FFN, DETR_HEADS, DETR_LABELS, random_scorer_head,  # noqa: E402
                                 tiny_detr, tiny_vit)
from conftest import load_script  # noqa: E402


def run(model, x, mask=None):
    with torch.no_grad():
        return model(pixel_values=x, pixel_mask=mask)


def counts(n, rho, cascade=PAPER_CASCADE):
    kept = max(1, math.floor(n * rho + 1e-9))
    return [max(1, math.floor(kept * c + 1e-9)) for c in cascade]


# ----------------------------------------------------------------------------- the adapter

@pytest.mark.parametrize("scorer", ["norm", "attention", "learned"])
def test_output_shapes_unchanged_and_tokens_follow_the_cascade(scorer):
    model = tiny_detr()
    x = torch.randn(2, 3, 64, 80)  # 8 x 10 = 80 encoder tokens
    ref = run(model, x)
    extra = {"scorer_module": random_scorer_head()} if scorer == "learned" else {}
    vitcompress.compress(model, "focus_detr", scorer=scorer, **extra)
    out = run(model, x)
    st = vitcompress.stats(model)
    for name in ("logits", "pred_boxes", "last_hidden_state", "encoder_last_hidden_state"):
        assert getattr(out, name).shape == getattr(ref, name).shape, name
        assert torch.isfinite(getattr(out, name)).all()
    assert st["rho"] == 0.5 and st["cascade"] == list(PAPER_CASCADE) and st["encoder_tokens"] == [80, 80]
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"] == [40, 32, 24, 24, 16, 8]
    assert st["kept_per_image"] == [[40, 32, 24, 24, 16, 8]] * 2
    assert st["dual_tokens_per_layer"] == [40, 32, 24, 24, 16, 8]  # dual_k=300 caps at the kept count
    assert not torch.allclose(out.logits, ref.logits, atol=1e-4)


def test_keep_all_without_dual_attention_matches_the_original():
    model = tiny_detr()
    x = torch.randn(2, 3, 64, 80)
    ref = run(model, x)
    vitcompress.compress(model, "focus_detr", keep=1.0, cascade=[1.0] * 6, dual_k=0)
    out = run(model, x)
    torch.testing.assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=1e-5, rtol=0)


def test_restore_is_bit_exact():
    model = tiny_detr()
    x = torch.randn(2, 3, 64, 80)
    before = run(model, x)
    vitcompress.compress(model, "focus_detr", keep=0.4, scorer="attention")
    compressed = run(model, x)
    vitcompress.restore(model)
    after = run(model, x)
    assert not torch.allclose(compressed.logits, before.logits, atol=1e-4)
    for name in ("logits", "pred_boxes", "encoder_last_hidden_state"):
        assert torch.equal(getattr(after, name), getattr(before, name)), name
    assert "forward" not in model.model.encoder.__dict__ and runtime_of(model) is None


def test_hooks_registered_while_compressed_survive_restore():
    model = tiny_detr()
    x = torch.randn(1, 3, 64, 80)
    before = run(model, x)
    vitcompress.compress(model, "focus_detr", keep=0.5)
    compressed = run(model, x)
    encoder, fired = model.model.encoder, []
    handles = [model.register_forward_pre_hook(lambda m, args: fired.append("model pre")),
               encoder.register_forward_pre_hook(lambda m, args, kwargs: fired.append("encoder pre"), with_kwargs=True),
               encoder.register_forward_hook(lambda m, args, out: fired.append("encoder")),
               model.register_forward_hook(lambda m, args, out: fired.append("model"))]
    order = ["model pre", "encoder pre", "encoder", "model"]
    assert torch.equal(run(model, x).logits, compressed.logits) and fired == order
    vitcompress.restore(model)
    fired.clear()
    after = run(model, x)
    assert fired == order
    for name in ("logits", "pred_boxes", "encoder_last_hidden_state"):
        assert torch.equal(getattr(after, name), getattr(before, name)), name
    for handle in handles:
        handle.remove()
    fired.clear()
    assert torch.equal(run(model, x).logits, before.logits) and fired == []


@pytest.mark.parametrize("scorer", ["attention", "learned"])
def test_threads_through_one_compressed_detr_get_their_own_outputs_and_counts(scorer):
    """Each thread's forwards give exactly its sequential output, and ``stats`` in that thread
    reports its own forward's token counts (images padded differently keep different counts)."""
    from test_threads import THREADS, run_concurrently

    model = tiny_detr()
    extra = {"scorer_module": random_scorer_head()} if scorer == "learned" else {}
    vitcompress.compress(model, "focus_detr", keep=0.5, scorer=scorer, dual_k=20, **extra)
    g = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(THREADS):
        x, mask = torch.randn(1 + i % 2, 3, 64, 80, generator=g), None
        if i % 4 in (1, 2):  # the last image padded on the right (8 x 8 tokens) or at the bottom (6 x 10)
            mask = torch.ones(x.shape[0], 64, 80, dtype=torch.long)
            if i % 4 == 1:
                mask[-1, :, 64:] = 0
            else:
                mask[-1, 48:] = 0
        inputs.append((x, mask))
    counted = ("encoder_tokens", "kept_per_image", "tokens_per_layer", "dual_tokens_per_layer")

    def forward(m, inp):
        out = run(m, *inp)
        st = vitcompress.stats(m)
        return [out.logits, out.pred_boxes, out.encoder_last_hidden_state], {k: st[k] for k in counted}

    expected = [forward(model, inp) for inp in inputs]
    assert len({str(counts) for _, counts in expected}) == 4  # batch sizes and paddings give distinct counts
    for i, runs in enumerate(run_concurrently(model, inputs, forward)):
        for (outs, counts), _ in runs:
            assert all(torch.equal(o, e) for o, e in zip(outs, expected[i][0])), f"thread {i} got another output"
            assert counts == expected[i][1], f"thread {i} saw the token counts of another forward"


@pytest.mark.parametrize("clone", ["deepcopy", "torch.save"])
def test_a_copy_of_a_compressed_detr_is_independent(clone, tmp_path):
    import copy

    model = tiny_detr()
    x = torch.randn(1, 3, 64, 80)
    before = run(model, x)
    vitcompress.compress(model, "focus_detr", scorer="learned", scorer_module=random_scorer_head())
    out = run(model, x)
    if clone == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "detr.pt")
        twin = torch.load(tmp_path / "detr.pt", weights_only=False)
    assert torch.equal(run(twin, x).logits, out.logits)
    weight = twin.model.encoder.layers[0].self_attn.v_proj.weight
    with torch.no_grad():  # the copy's patched encoder runs the copy's own layers, not the original's
        weight.mul_(2)
        assert not torch.allclose(run(twin, x).logits, out.logits, atol=1e-4)
        weight.div_(2)
    vitcompress.restore(twin)
    assert torch.equal(run(twin, x).logits, before.logits)
    assert torch.equal(run(model, x).logits, out.logits)  # the original is still compressed


def layer_flops(n, C=DETR_D_MODEL, F=DETR_FFN):
    """One post-norm DETR encoder layer on n tokens, as fvcore counts it (norms: 5 per element)."""
    return 4 * n * C * C + 2 * n * n * C + 2 * 5 * n * C + 2 * n * C * F


def dual_flops(d, n, C=DETR_D_MODEL, classes=DETR_LABELS + 1):
    """Class head on the layer's n tokens, then self-attention + norm on the d selected ones."""
    return n * C * classes + 4 * d * C * C + 2 * d * d * C + 5 * d * C


def head_flops(n, C=DETR_D_MODEL, h=DETR_D_MODEL):
    return 5 * n * C + n * (C * h + h * h // 2 + h // 2 * h // 4 + h // 4)


@pytest.mark.parametrize("scorer,dual_k", [("learned", 300), ("attention", 5), ("norm", 0)])
def test_encoder_flops_fall_as_the_cascade_says(scorer, dual_k):
    model = tiny_detr()
    x = torch.randn(1, 3, 64, 80)
    N = 80
    base = count_encoder_flops(model, x)
    assert base == 6 * layer_flops(N)
    extra = {"scorer_module": random_scorer_head()} if scorer == "learned" else {}
    vitcompress.compress(model, "focus_detr", keep=0.5, scorer=scorer, dual_k=dual_k, **extra)
    counted = count_encoder_flops(model, x)
    tokens = counts(N, 0.5)
    want = sum(layer_flops(n) for n in tokens)
    if dual_k:
        want += sum(dual_flops(min(dual_k, n), n) for n in tokens)
    want += {"learned": head_flops(N), "attention": 2 * N * DETR_D_MODEL ** 2 + N * N * DETR_D_MODEL, "norm": 0}[scorer]
    assert counted == want
    assert counted < base
    if scorer == "norm":  # without scoring or dual overhead the saving is the cascade's alone
        assert counted / base == pytest.approx(sum(layer_flops(n) for n in tokens) / (6 * layer_flops(N)))


def test_encoder_flops_are_a_detrs():
    with pytest.raises(TypeError, match="take a DETR model, not a timm.VisionTransformer model"):
        count_encoder_flops(tiny_vit(), torch.randn(1, 3, 32, 32))


def test_other_encoder_depths_stretch_the_cascade():
    assert cascade_for_depth(6) == PAPER_CASCADE
    assert cascade_for_depth(3) == (1.0, 0.6, 0.2)
    assert cascade_for_depth(1) == (1.0,)
    long = cascade_for_depth(11)
    assert long[0] == 1.0 and long[-1] == 0.2 and all(b <= a for a, b in zip(long, long[1:]))
    assert long[2] == pytest.approx(0.8)  # relative depth 0.2 is the paper's second layer
    model = tiny_detr(encoder_layers=3)
    vitcompress.compress(model, "focus_detr", keep=0.5)
    run(model, torch.randn(1, 3, 64, 80))
    assert vitcompress.stats(model)["tokens_per_layer"] == [40, 24, 8]


def conv_backbone(model):
    """The module returning [(feature map, mask)]: the backbone in transformers 5.x, its conv_encoder in 4.x."""
    return getattr(model.model.backbone, "conv_encoder", model.model.backbone)


class PaddedFeatures:
    """Backbone hook: the batch's feature maps are each image's own (computed alone), zero-padded
    areas filled with large noise (which the encoder must ignore), the batch's masks kept."""

    def __init__(self, maps):
        self.maps = maps

    def __call__(self, module, args, output):
        (fmap, mask), = output
        padded = torch.randn_like(fmap) * 10
        for b, m in enumerate(self.maps):
            padded[b, :, : m.shape[-2], : m.shape[-1]] = m[0]
            assert mask[b, : m.shape[-2], : m.shape[-1]].all() and mask[b].sum() == m.shape[-2] * m.shape[-1]
        return [(padded, mask)]


@pytest.mark.parametrize("keep,scorer", [(1.0, "norm"), (0.5, "attention"), (0.5, "learned")])
def test_padding_is_respected(keep, scorer):
    model = tiny_detr()
    extra = {"scorer_module": random_scorer_head()} if scorer == "learned" else {}
    vitcompress.compress(model, "focus_detr", keep=keep, scorer=scorer, **extra)
    big, small = torch.randn(1, 3, 64, 80), torch.randn(1, 3, 48, 64)  # 8 x 10 and 6 x 8 tokens
    alone, maps = [], []
    for img in (big, small):
        handle = conv_backbone(model).register_forward_hook(lambda m, a, out: maps.append(out[0][0]))
        alone.append(run(model, img))
        handle.remove()
    x = torch.zeros(2, 3, 64, 80)
    mask = torch.zeros(2, 64, 80, dtype=torch.long)
    for b, img in enumerate((big, small)):
        x[b, :, : img.shape[2], : img.shape[3]] = img[0]
        mask[b, : img.shape[2], : img.shape[3]] = 1
    handle = conv_backbone(model).register_forward_hook(PaddedFeatures(maps))
    batch = run(model, x, mask)
    handle.remove()
    st = vitcompress.stats(model)
    assert st["encoder_tokens"] == [80, 48]
    assert st["kept_per_image"] == [counts(80, keep), counts(48, keep)]
    for b in range(2):
        torch.testing.assert_close(batch.logits[b], alone[b].logits[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(batch.pred_boxes[b], alone[b].pred_boxes[0], atol=1e-4, rtol=0)
    enc = batch.encoder_last_hidden_state[1].reshape(8, 10, DETR_D_MODEL)[:6, :8].reshape(48, DETR_D_MODEL)
    torch.testing.assert_close(enc, alone[1].encoder_last_hidden_state[0], atol=1e-4, rtol=0)


def test_dual_attention_takes_the_top_tokens_by_class_times_foreground():
    fg = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.5]])
    cls = torch.tensor([[0.1, 0.9, 0.9, 0.5, 0.9]])  # products .09 .72 .09 .35 .45
    valid = torch.tensor([[True, True, True, True, False]])
    idx, ok = dual_attention_tokens(fg, cls, valid, 3)
    assert idx.tolist() == [[1, 3, 0]] or idx.tolist() == [[1, 3, 2]]  # .09 tie
    assert ok.all()
    idx, ok = dual_attention_tokens(fg, None, valid, 10)  # capped at the layer's tokens; no class head
    assert idx[0, :4].tolist() == [0, 1, 3, 2] and ok.tolist() == [[True] * 4 + [False]]
    model = tiny_detr()
    x = torch.randn(1, 3, 64, 80)
    vitcompress.compress(model, "focus_detr", dual_k=5)
    with_dual = run(model, x).logits
    assert vitcompress.stats(model)["dual_tokens_per_layer"] == [5] * 6
    vitcompress.compress(model, "focus_detr", dual_k=0)
    without = run(model, x).logits
    assert vitcompress.stats(model)["dual_tokens_per_layer"] == []
    assert not torch.allclose(with_dual, without, atol=1e-5)


@pytest.mark.parametrize("scorer", ["attention", "learned"])
def test_bfloat16_autocast(scorer):
    model = tiny_detr()
    x = torch.randn(2, 3, 64, 80)
    head = random_scorer_head()
    weights = {k: v.clone() for k, v in head.state_dict().items()}
    extra = {"scorer_module": head} if scorer == "learned" else {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run(model, x)
        vitcompress.compress(model, "focus_detr", keep=0.5, scorer=scorer, dual_k=10, **extra)
        out = run(model, x)
    assert out.encoder_last_hidden_state.dtype == ref.encoder_last_hidden_state.dtype
    assert out.logits.shape == ref.logits.shape and torch.isfinite(out.logits.float()).all()
    assert vitcompress.stats(model)["tokens_per_layer"] == counts(80, 0.5)
    # the trained head is not cast (and its weights not rounded) to the autocast dtype
    assert all(torch.equal(v, weights[k]) for k, v in head.state_dict().items())


def test_train_mode_gradients_reach_the_encoder():
    model = tiny_detr().train()
    vitcompress.compress(model, "focus_detr", keep=0.5, dual_k=8)
    out = model(pixel_values=torch.randn(2, 3, 64, 80))
    (out.logits.logsumexp(-1).sum() + out.pred_boxes.sum()).backward()
    last = encoder_layer_parts(model.model.encoder.layers[5], 5, DETR_HEADS, 0.0)
    weights = {"first q_proj": model.model.encoder.layers[0].self_attn.q_proj.weight, "last fc2": last.fc2.weight,
               "input_projection": model.model.input_projection.weight,
               "class head": model.class_labels_classifier.weight}
    for name, weight in weights.items():
        assert weight.grad is not None and weight.grad.abs().sum() > 0, name


def test_detr_model_without_class_head_and_hidden_states():
    model = tiny_detr(cls=transformers.DetrModel)
    x = torch.randn(1, 3, 64, 80)
    vitcompress.compress(model, "focus_detr", keep=0.5)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 10, DETR_D_MODEL)
    assert len(out.encoder_hidden_states) == 7
    assert torch.equal(out.encoder_hidden_states[-1], out.encoder_last_hidden_state)
    changed = (out.encoder_hidden_states[-1] != out.encoder_hidden_states[-2]).any(-1).sum().item()
    assert changed == 8  # the last layer ran on 0.2 x 40 tokens; the others passed through


def other_layout(layer):
    """The same encoder layer rebuilt in the other transformers layout: 5.x (``self_attn.o_proj``,
    fc1/fc2 in ``mlp``) from 4.x (``self_attn.out_proj``, fc1/fc2 on the layer), or back."""
    attn = layer.self_attn
    new5 = hasattr(layer, "mlp")
    ffn = layer.mlp if new5 else layer
    other = nn.Module()
    other.self_attn = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(other.self_attn, name, getattr(attn, name))
    setattr(other.self_attn, "out_proj" if new5 else "o_proj", attn.o_proj if new5 else attn.out_proj)
    other_ffn = other if new5 else nn.Module()
    if not new5:
        other.mlp = other_ffn
    other_ffn.fc1, other_ffn.fc2, other_ffn.activation_fn = ffn.fc1, ffn.fc2, ffn.activation_fn
    other_ffn.activation_dropout = ffn.activation_dropout
    other.dropout = layer.dropout
    other.self_attn_layer_norm, other.final_layer_norm = layer.self_attn_layer_norm, layer.final_layer_norm
    return other.eval()


def hf_layer(layer, x, pos):
    """The installed transformers' own forward of an encoder layer (5.x returns a tensor, 4.x a tuple)."""
    if hasattr(layer, "mlp"):
        return layer(x, None, spatial_position_embeddings=pos)
    return layer(x, None, object_queries=pos)[0]


def test_both_transformers_layer_layouts_and_argument_names():
    """Both layer layouts give the installed transformers' layer, and the compressed encoder takes the
    position embeddings under 5.x's name and 4.x's ``object_queries``, returning dicts or tuples."""
    model = tiny_detr()
    layer = model.model.encoder.layers[0]
    x, pos = torch.randn(2, 7, DETR_D_MODEL), torch.randn(2, 7, DETR_D_MODEL)
    with torch.no_grad():
        want = hf_layer(layer, x, pos)
        for variant in (layer, other_layout(layer)):
            got = encoder_layer_parts(variant, 0, DETR_HEADS, 0.0).forward(x, pos, None)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    inputs = encoder_inputs(model, torch.randn(1, 3, 64, 80))
    pos = encoder_position_embeddings(inputs)
    vitcompress.compress(model, "focus_detr")
    with torch.no_grad():
        new = model.model.encoder(inputs["inputs_embeds"], inputs["attention_mask"], spatial_position_embeddings=pos)
        legacy = model.model.encoder(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                                     object_queries=pos, return_dict=False)
    assert torch.equal(new.last_hidden_state, legacy[0])


def test_clear_errors(tmp_path):
    assert vitcompress.list_methods("detr") == ["focus_detr"] and "focus_detr" not in vitcompress.list_methods("vit")
    detr = tiny_detr()
    with pytest.raises(TypeError, match="'focus_detr' reduces detr models"):
        vitcompress.compress(tiny_vit(), "focus_detr")
    with pytest.raises(TypeError, match="'tome' reduces vit models.*takes: focus_detr"):
        vitcompress.compress(detr, "tome", r=2)
    with pytest.raises(ValueError, match="takes keep= .*flops= is not supported"):
        vitcompress.compress(detr, "focus_detr", flops=0.5)
    with pytest.raises(ValueError, match="r= is not supported"):
        vitcompress.compress(detr, "focus_detr", r=4)
    with pytest.raises(ValueError, match="outside .*encoder.s tokens kept, rho"):
        vitcompress.compress(detr, "focus_detr", keep=1.5)
    with pytest.raises(ValueError, match="needs exactly one of scorer_path"):
        vitcompress.compress(detr, "focus_detr", scorer="learned")
    with pytest.raises(ValueError, match="pass scorer='learned'"):
        vitcompress.compress(detr, "focus_detr", scorer_path="head.pt")
    with pytest.raises(ValueError, match="choose one of"):
        vitcompress.compress(detr, "focus_detr", scorer="magic")
    with pytest.raises(ValueError, match="3 ratios but the encoder has 6 layers"):
        vitcompress.compress(detr, "focus_detr", cascade=[1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match="non-increasing"):
        vitcompress.compress(detr, "focus_detr", cascade=[1.0, 0.5, 0.6, 0.4, 0.2, 0.1])
    with pytest.raises(TypeError, match="one per encoder layer"):
        vitcompress.compress(detr, "focus_detr", cascade=0.5)
    with pytest.raises(ValueError, match="dual_k"):
        vitcompress.compress(detr, "focus_detr", dual_k=-1)
    wide = tmp_path / "wide.pt"
    save_scorer(FocusScorer(64), str(wide))
    with pytest.raises(ValueError, match="trained for 64-dim tokens but .* d_model=32"):
        vitcompress.compress(detr, "focus_detr", scorer="learned", scorer_path=str(wide))
    torch.save({"weights": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a Focus-DETR scorer file"):
        vitcompress.compress(detr, "focus_detr", scorer="learned", scorer_path=str(tmp_path / "junk.pt"))
    assert runtime_of(detr) is None  # nothing was patched by the failed calls
    vitcompress.compress(detr, "focus_detr")
    with pytest.raises(ValueError, match="cannot return attentions"):
        detr(pixel_values=torch.randn(1, 3, 64, 80), output_attentions=True)
    vitcompress.restore(detr)
    detr.model.encoder.layers[2].mlp = nn.Identity()
    with pytest.raises(TypeError, match="encoder layer 2 .* not supported"):
        vitcompress.compress(detr, "focus_detr")


# ----------------------------------------------------------------------------- the scorer head

def test_top_down_modulation_across_levels():
    torch.manual_seed(0)
    head = FocusScorer(16, num_levels=3).eval()
    with torch.no_grad():
        head.alpha.copy_(torch.tensor([0.5, -0.25]))
    levels = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2)]
    masks = [torch.ones(2, *lv.shape[-2:], dtype=torch.bool) for lv in levels]
    masks[0][1, :, 6:] = False  # image 1 is padded on the finest level
    with torch.no_grad():
        got = foreground_logits(head, levels, masks)

        def alone(x, m):
            B, C, H, W = x.shape
            return head(x.flatten(2).transpose(1, 2), m.reshape(B, -1)).reshape(B, H, W)

        def up(s, size):
            return torch.nn.functional.interpolate(s[:, None], size=size, mode="bilinear", align_corners=True)

        s2 = alone(levels[2], masks[2])
        s1 = alone(levels[1] * (1 + up(s2, (4, 4)) * -0.25), masks[1])
        s0 = alone(levels[0] * (1 + up(s1, (8, 8)) * 0.5), masks[0])
    for g, w in zip(got, (s0, s1, s2)):
        torch.testing.assert_close(g, w)
    # the global half averages real tokens only: padded positions do not change real scores
    noisy = [levels[0].clone(), levels[1], levels[2]]
    noisy[0][1, :, :, 6:] = 100.0
    with torch.no_grad():
        again = foreground_logits(head, noisy, masks)
    torch.testing.assert_close(again[0][1, :, :6], got[0][1, :, :6])
    # without modulation (alpha = 0) each level is scored on its own
    with torch.no_grad():
        head.alpha.zero_()
        flat = foreground_logits(head, levels, masks)
        torch.testing.assert_close(flat[0], alone(levels[0], masks[0]))
    with pytest.raises(ValueError, match="3 feature level"):
        foreground_logits(head, levels[:2])


def test_fcos_assignment_on_hand_made_boxes():
    # a 4 x 4 grid of stride 8: locations at pixels 4, 12, 20, 28 on each axis
    big = [0.0, 0.0, 32.0, 32.0]
    small = [8.0, 8.0, 24.0, 24.0]  # inside big: the smaller box wins its 4 central locations
    edge = [12.0, 0.0, 20.0, 8.0]  # x=12 on its left edge, x=20 on its right: no location strictly inside
    got = fcos_assign(torch.tensor([big, small, edge]), [(4, 4)], [8])[0]
    assert got.tolist() == [[0, 0, 0, 0],
                            [0, 1, 1, 0],
                            [0, 1, 1, 0],
                            [0, 0, 0, 0]]
    corner = [0.0, 0.0, 14.0, 14.0]  # covers (4, 4), (12, 4), (4, 12), (12, 12)
    got = fcos_assign(torch.tensor([corner]), [(4, 4)], [8])[0]
    assert (got == 0).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert fcos_assign(torch.zeros(0, 4), [(2, 3)], [8])[0].tolist() == [[-1] * 3] * 2
    # three levels with FCOS's size ranges: (0, 64] at stride 8 (20 x 20), (64, 128] at stride 16
    # (10 x 10) and, the coarsest, everything beyond 128 px at stride 32 (5 x 5)
    large = [0.0, 0.0, 160.0, 160.0]  # the farthest side is at least 80 px from any location: never level 1
    tiny = [70.0, 70.0, 90.0, 90.0]  # at most 20 px: never level 2
    fine, middle, coarse = fcos_assign(torch.tensor([large, tiny]), [(20, 20), (10, 10), (5, 5)], [8, 16, 32])
    assert (fine == 1).nonzero().tolist() == [[9, 9], [9, 10], [10, 9], [10, 10]]  # pixels 76 and 84
    assert (fine == 0).sum() == 0
    # on level 2 large needs every side within 128 px: locations 40..120, i.e. indices 2..7
    want = torch.full((10, 10), -1)
    want[2:8, 2:8] = 0
    assert torch.equal(middle, want)
    # on level 3 (centres 16, 48, ..., 144) a side is beyond 128 px only from the outer ring
    ring = torch.zeros(5, 5, dtype=torch.bool)
    ring[[0, -1], :] = True
    ring[:, [0, -1]] = True
    assert torch.equal(coarse, torch.where(ring, 0, -1))
    # the coarsest level's range is open-ended: a box larger than every range still finds a level
    huge = fcos_assign(torch.tensor([[0.0, 0.0, 600.0, 600.0]]), [(80, 80), (40, 40), (20, 20)], [8, 16, 32])
    assert [int((level == 0).sum()) for level in huge] == [0, 0, 19 * 19]  # centres 16..592 inside


def test_foreground_targets_use_the_backbone_stride():
    # 100 px at stride 8 give ceil(100 / 8) = 13 locations, centred at 4, 12, ..., 92, 100
    box = {"boxes": torch.tensor([[90.0, 0.0, 100.0, 8.0]])}
    target = foreground_targets([box], (1, 13), (8, 100), torch.ones(1, 1, 13))
    assert target[0].nonzero().flatten().tolist() == [11]  # the location at 92 px, not at 100 / 13 * 12


# ----------------------------------------------------------------------------- training and evaluation

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 80, 230)]


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """Six images (64 x 64 and 64 x 80) of coloured rectangles on grey noise, a COCO json, and a
    tiny DETR saved as a config + state_dict."""
    from PIL import Image

    root = tmp_path_factory.mktemp("coco")
    g = torch.Generator().manual_seed(0)
    images, anns = [], []
    for i in range(6):
        h, w = 64, 64 if i % 2 else 80
        pixels = (110 + 20 * torch.rand(h, w, 3, generator=g)).to(torch.uint8)
        for k in range(1 + i % 2):
            bw, bh = [int(v) for v in torch.randint(14, 30, (2,), generator=g)]
            x0 = int(torch.randint(0, w - bw, (1,), generator=g))
            y0 = int(torch.randint(0, h - bh, (1,), generator=g))
            cat = (i + k) % 3 + 1
            pixels[y0:y0 + bh, x0:x0 + bw] = torch.tensor(COLOURS[cat - 1], dtype=torch.uint8)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x0, y0, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
        Image.fromarray(pixels.numpy()).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
    cats = [{"id": c, "name": n} for c, n in ((1, "red"), (2, "green"), (3, "blue"))]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    model = tiny_detr(num_labels=4)  # class index = category id (0 unused)
    with torch.no_grad():  # features about as large as a trained detector's, not drowned by the position embeddings
        model.model.input_projection.weight.mul_(30.0)
    model.config.to_json_file(str(root / "config.json"))
    torch.save(model.state_dict(), root / "detr.pt")
    return root


def oracle_outputs(targets, num_queries=3, num_labels=4):
    """DETR outputs that are exactly the ground truth: normalised (cx, cy, w, h) boxes of the
    resized, unpadded image and confident logits for their labels (the rest: no object)."""
    logits = torch.full((len(targets), num_queries, num_labels + 1), -10.0)
    boxes = torch.full((len(targets), num_queries, 4), 0.5)
    for b, t in enumerate(targets):
        h, w = t["size"]
        for q, (box, label) in enumerate(zip(t["boxes"], t["labels"])):
            x0, y0, x1, y1 = box.tolist()
            boxes[b, q] = torch.tensor([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
            logits[b, q, label] = 10.0
    return logits, boxes


def test_perfect_detections_score_ap_one(coco_set):
    data = CocoDetection(str(coco_set), str(coco_set / "ann.json"), size=48, max_size=64)
    batch = collate([data[i] for i in range(len(data))])
    pixel_values, pixel_mask, targets = batch
    assert pixel_values.shape == (6, 3, 48, 60) and pixel_mask[1].sum() == 48 * 48
    coco = load_coco(str(coco_set / "ann.json"))
    logits, boxes = oracle_outputs(targets)
    results = detections(logits, boxes, targets)
    assert len(results) == 6 * 3
    assert bbox_ap(coco, results) == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
    shifted = detections(logits, boxes + torch.tensor([0.2, 0.0, 0.0, 0.0]), targets)
    assert bbox_ap(coco, shifted)["AP"] < 0.5


def test_eval_coco_scores_an_oracle_detector_ap_one(coco_set):
    """eval_coco's own path (padded batches of mixed sizes -> model -> detections -> AP) with a
    detector that outputs the ground truth of each image it is given."""
    data = CocoDetection(str(coco_set), str(coco_set / "ann.json"), size=48, max_size=64)
    truth = [data[i][1] for i in range(len(data))]
    seen = []

    def oracle(pixel_values, pixel_mask):
        targets = truth[len(seen):len(seen) + pixel_values.shape[0]]
        for b, t in enumerate(targets):  # the real pixels of each image are where the mask says
            assert int(pixel_mask[b].sum()) == t["size"][0] * t["size"][1]
        seen.extend(targets)
        logits, boxes = oracle_outputs(targets)
        return SimpleNamespace(logits=logits, pred_boxes=boxes)

    results = load_script("evaluation/eval_coco.py").predict(oracle, loader(data, 4, workers=0), torch.device("cpu"), False, "oracle")
    assert len(seen) == 6
    assert bbox_ap(data.coco, results, data.ids) == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})


def test_scorer_training_loss_falls_and_eval_coco_runs(coco_set, tmp_path):
    common = ["--config", str(coco_set / "config.json"), "--checkpoint", str(coco_set / "detr.pt"),
              "--data-dir", str(coco_set), "--annotations", str(coco_set / "ann.json"),
              "--size", "64", "--max-size", "80", "--workers", "0"]
    head_path = tmp_path / "head.pt"
    losses = load_script("training/train_focus_scorer.py").main(
        common + ["--epochs", "12", "--lr", "1e-2", "--batch-size", "3", "--device", "cpu", "--output", str(head_path)])
    assert len(losses) == 12 and losses[-1] < 0.6 * losses[0]

    # the trained head ranks foreground first: its kept half holds nearly all foreground locations
    model = tiny_detr(num_labels=4)
    model.load_state_dict(torch.load(coco_set / "detr.pt", weights_only=True))
    vitcompress.compress(model, "focus_detr", scorer="learned", scorer_path=str(head_path))
    data = CocoDetection(str(coco_set), str(coco_set / "ann.json"), size=64, max_size=80)
    pixel_values, pixel_mask, targets = collate([data[i] for i in range(len(data))])
    rt = runtime_of(model)
    inputs = encoder_inputs(model, pixel_values, pixel_mask)
    valid = inputs["attention_mask"].bool()
    rank, _ = rt.method.token_scores(rt.options, rt.prepared, inputs["inputs_embeds"],
                                     encoder_position_embeddings(inputs), valid, None)
    idx, slot_valid, _ = rt.method.layer_sets(rank, valid, 0.5, rt.cascade)[0]
    target = foreground_targets(targets, (8, 10), (64, 80), valid.reshape(6, 8, 10))
    recall = (target.gather(1, idx) * slot_valid).sum() / target.sum()
    assert recall > 0.9  # keeping a random half would give 0.5

    rows = load_script("evaluation/eval_coco.py").main(common + ["--keep", "0.5", "--scorer", "learned",
                                                   "--scorer-path", str(head_path), "--batch-size", "3",
                                                   "--runs", "1", "--flops-images", "2", "--device", "cpu"])
    assert [r["model"] for r in rows] == ["uncompressed", "focus_detr keep=0.5"]
    for r in rows:
        assert 0.0 <= r["AP"] <= 1.0 and 0.0 <= r["AP50"] <= 1.0 and 0.0 <= r["AP75"] <= 1.0
        assert r["images_per_s"] > 0
    assert rows[1]["encoder_gflops"] < rows[0]["encoder_gflops"]
    assert rows[1]["tokens_per_layer"] == counts(80, 0.5)


def test_bench_detr_encoder_runs(coco_set):
    out = load_script("benchmarks/bench_detr_encoder.py").main(
        ["--config", str(coco_set / "config.json"), "--checkpoint", str(coco_set / "detr.pt"),
         "--height", "64", "--width", "80", "--runs", "1", "--device", "cpu"])
    tokens = counts(80, 0.5)
    assert out["gflops"]["uncompressed"] == pytest.approx(6 * layer_flops(80) / 1e9)
    assert out["gflops"]["norm, dual_k=0"] == pytest.approx(sum(layer_flops(n) for n in tokens) / 1e9)
    assert all(out["gflops"][name] < out["gflops"]["uncompressed"] for name in out["tokens"])
    assert out["tokens"]["learned"] == (tokens, tokens) and all(s["throughput"] > 0 for s in out["speed"].values())


def test_checkpoint_directory_loads_without_fetching_a_backbone(tmp_path):
    from vitcompress.evaluation.coco import load_detr
    model = tiny_detr(num_labels=4)
    model.config.use_pretrained_backbone = True  # as a hub-derived config says on transformers 4.x
    model.save_pretrained(str(tmp_path))
    loaded = load_detr(checkpoint=str(tmp_path))
    assert not getattr(loaded.config, "use_pretrained_backbone", False)  # transformers 5 dropped the flag
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
