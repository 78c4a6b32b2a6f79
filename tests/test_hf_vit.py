"""transformers vision encoders (ViT, DeiT, DINOv2 with and without registers, SigLIP) through
vitcompress/adapters/hf_vit.py, on tiny random models (no downloads)."""
import copy
import io

import pytest
import torch

import vitcompress
from vitcompress.adapters import find_adapter
from vitcompress.methods import get as get_method
from vitcompress.engine.schedule import build_schedule

hf = pytest.importorskip("transformers")

METHODS = ["tome", "pitome", "zero_tprune"]
LAYERS = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=4)
VIT = dict(LAYERS, intermediate_size=64)
DINO = dict(LAYERS, mlp_ratio=2, layerscale_value=0.5)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def build(family, attn="sdpa"):
    """A tiny random model of ``family`` -> (model, output key, special tokens)."""
    if family == "dinov2_registers" and not hasattr(hf, "Dinov2WithRegistersModel"):
        pytest.skip(f"transformers {hf.__version__} has no Dinov2WithRegisters")
    torch.manual_seed(0)
    a = dict(attn_implementation=attn)
    if family == "vit":
        return hf.ViTForImageClassification(hf.ViTConfig(**VIT, num_labels=5, **a)).eval(), "logits", 1
    if family == "vit_model":
        return hf.ViTModel(hf.ViTConfig(**VIT, **a)).eval(), "pooler_output", 1
    if family == "deit":
        return hf.DeiTForImageClassificationWithTeacher(hf.DeiTConfig(**VIT, num_labels=5, **a)).eval(), "logits", 2
    if family == "dinov2":
        return hf.Dinov2ForImageClassification(hf.Dinov2Config(**DINO, num_labels=5, **a)).eval(), "logits", 1
    if family == "dinov2_swiglu":
        return hf.Dinov2Model(hf.Dinov2Config(**DINO, use_swiglu_ffn=True, **a)).eval(), "pooler_output", 1
    if family == "dinov2_registers":
        config = hf.Dinov2WithRegistersConfig(**DINO, num_register_tokens=2, num_labels=5, **a)
        return hf.Dinov2WithRegistersForImageClassification(config).eval(), "logits", 3
    if family == "siglip":
        return hf.SiglipVisionModel(hf.SiglipVisionConfig(**VIT, **a)).eval(), "pooler_output", 0
    if family == "siglip_classifier":
        config = hf.SiglipConfig(vision_config=VIT, text_config=TEXT, num_labels=5, **a)
        return hf.SiglipForImageClassification(config).eval(), "logits", 0
    raise KeyError(family)


TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
FAMILIES = ["vit", "vit_model", "deit", "dinov2", "dinov2_swiglu", "dinov2_registers", "siglip", "siglip_classifier"]


def assert_prefix_alone(source, prefix):
    """Each special token's source row is its own one-hot, and no other token covers it."""
    eye = torch.eye(source.shape[-1])[:prefix]
    for b in range(source.shape[0]):
        assert torch.equal(source[b, :prefix], eye)
        assert not source[b, prefix:, :prefix].any()


def expand_by_size(x, size):
    """Each token of a batch of one repeated as many times as the patches it stands for."""
    return x[0].repeat_interleave(size[0, :, 0].round().long(), dim=0)[None]


# --------------------------------------------------------------------------- every family, every method


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, method):
    """keep=1.0 is the uncompressed model; keep=0.8 follows the schedule, keeps the special tokens
    alone, reports hidden states with the planned counts; restore is bit-exact."""
    model, key, prefix = build(family)
    with torch.no_grad():
        ref = model(X, output_hidden_states=True)
        vitcompress.compress(model, method, keep=1.0)
        same = model(X)
        torch.testing.assert_close(same[key], ref[key], atol=1e-5, rtol=0)
        vitcompress.compress(model, method, keep=0.8, trace_source=True)
        out = model(X, output_hidden_states=True)
        st = vitcompress.stats(model)
        vitcompress.restore(model)
        back = model(X)
    assert st["family"].startswith("transformers.") and st["method"] == method
    assert out[key].shape == ref[key].shape
    planned = st["planned_tokens_per_layer"]
    assert st["tokens_per_layer"] == planned and planned[0] == 64 + prefix and planned[-1] < planned[0]
    # hidden_states[i]: the input of layer i (reduced by the layers before it), then the last layer's output
    counts = [h.shape[1] for h in out.hidden_states]
    assert counts[:-1] == planned and len(counts) == len(ref.hidden_states)
    assert counts[-1] == st["size"].shape[1] < planned[-1]
    source = st["source"]
    assert_prefix_alone(source, prefix)
    covered = source.sum(dim=1)  # merging: every patch in exactly one token; pruning: in one or none
    assert torch.equal(covered, torch.ones(2, 64 + prefix)) if get_method(method).kind == "merge" else \
        covered.max() == 1 and covered.sum() < 2 * (64 + prefix)
    assert torch.equal(back[key], ref[key])


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_agree(family):
    eager, key, _ = build(family, "eager")
    sdpa, _, _ = build(family, "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        outs = [vitcompress.compress(m, "tome", keep=0.8)(X)[key] for m in (eager, sdpa)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert vitcompress.stats(eager)["tokens_per_layer"] == vitcompress.stats(sdpa)["tokens_per_layer"]


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2_registers", "siglip"])
def test_batch_one_and_bfloat16_autocast(family):
    model, key, _ = build(family)
    with torch.no_grad():
        ref = model(X)[key]
        vitcompress.compress(model, "pitome", keep=0.8)
        one = model(X[:1])[key]
        assert one.shape == ref[:1].shape and torch.isfinite(one).all()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(X)[key]
        st = vitcompress.stats(model)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        assert st["tokens_per_layer"] == st["planned_tokens_per_layer"] != [st["planned_tokens_per_layer"][0]] * 4
        vitcompress.compress(model, "pitome", keep=1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            same = model(X)[key]
    torch.testing.assert_close(same.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("family", ["vit", "deit", "siglip", "dinov2"])
def test_other_input_sizes(family):
    """interpolate_pos_encoding=True (DINOv2 always interpolates): the schedule is planned for the size."""
    model, key, prefix = build(family)
    x = torch.randn(1, 3, 48, 40)
    kwargs = {} if family.startswith("dinov2") else dict(interpolate_pos_encoding=True)
    with torch.no_grad():
        ref = model(x, **kwargs)[key]
        vitcompress.compress(model, "tome", keep=0.8)
        out = model(x, **kwargs)[key]
        st = vitcompress.stats(model)
        vitcompress.restore(model)
        assert torch.equal(model(x, **kwargs)[key], ref)
    assert out.shape == ref.shape
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"] and st["tokens_per_layer"][0] == 120 + prefix


# --------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("family", FAMILIES)
def test_planned_flops_are_what_count_flops_counts(family):
    """The adapter's cost model of the uncompressed model equals fvcore's count (what flops= targets)."""
    model, _, _ = build(family)
    adapter = find_adapter(model)
    schedule = build_schedule(get_method("tome"), {}, "r", 0, adapter.num_patches, adapter.num_prefix, adapter.depth)
    planned, counted = adapter.cost().flops(schedule), vitcompress.count_flops(model, X[:1])
    assert planned == counted


@pytest.mark.parametrize("family,method", [("vit", "tome"), ("deit", "zero_tprune"), ("dinov2_registers", "pitome"),
                                           ("siglip", "tome"), ("dinov2", "zero_tprune")])
def test_flops_budget_met_as_counted(family, method):
    model, _, _ = build(family)
    base = vitcompress.count_flops(model, X[:1])
    vitcompress.compress(model, method, flops=0.7)
    ratio = vitcompress.count_flops(model, X[:1]) / base
    assert abs(ratio - 0.7) < 0.014, ratio


# --------------------------------------------------------------------------- pooling


def test_siglip_pooling_head_is_proportional():
    """A token standing for k patches weighs in SigLIP's attention-pooling head as k copies of it
    would (the original head over every token repeated by its size), and as the explicit formula
    softmax(q.k / sqrt(d) + log size) says."""
    model, _, _ = build("siglip")
    head = find_adapter(model).head
    captured = {}
    hook = head.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
    vitcompress.compress(model, "tome", r=8)
    with torch.no_grad():
        model(X[:1])
        hook.remove()
        size = vitcompress.stats(model)["size"]
        assert size.max() > 1 and size.sum() == 64
        vitcompress.restore(model)
        want = head(expand_by_size(captured["x"], size))
        # explicit: one probe query, per head softmax over tokens with log(size) added
        x, mha = captured["x"][0], head.attention
        d, H = mha.embed_dim, mha.num_heads
        wq, wk, wv = mha.in_proj_weight.split(d)
        bq, bk, bv = mha.in_proj_bias.split(d)
        q = (head.probe[0] @ wq.T + bq).view(1, H, d // H).transpose(0, 1)  # [H, 1, d/H]
        k = (x @ wk.T + bk).view(-1, H, d // H).transpose(0, 1)
        v = (x @ wv.T + bv).view(-1, H, d // H).transpose(0, 1)
        a = (q @ k.transpose(1, 2) / (d // H) ** 0.5 + size[0, :, 0].log()).softmax(dim=-1)
        o = mha.out_proj((a @ v).transpose(0, 1).reshape(1, d))
        explicit = (o + head.mlp(head.layernorm(o)))[None]
    torch.testing.assert_close(captured["out"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured["out"], explicit[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["dinov2", "dinov2_registers", "siglip_classifier"])
def test_mean_pooling_classifiers_weight_tokens_by_size(family):
    """Dinov2(WithRegisters)ForImageClassification: CLS + mean of the patch tokens (registers left
    out); SiglipForImageClassification: mean of all tokens -- the mean weighted by token size."""
    model, _, prefix = build(family)
    vitcompress.compress(model, "tome", r=8)
    with torch.no_grad():
        out = model(X, output_hidden_states=True)
        size = vitcompress.stats(model)["size"]
        assert size.max() > 1
        backbone = model.vision_model if family.startswith("siglip") else getattr(
            model, "dinov2", getattr(model, "dinov2_with_registers", None))
        tokens = backbone.layernorm(out.hidden_states[-1]) if not family.startswith("siglip") else \
            backbone.post_layernorm(out.hidden_states[-1])
        patches, weights = tokens[:, prefix:], size[:, prefix:]
        mean = (patches * weights).sum(1) / weights.sum(1)
        features = torch.cat([tokens[:, 0], mean], dim=1) if prefix else mean
        torch.testing.assert_close(out.logits, model.classifier(features), atol=1e-5, rtol=1e-5)
        unweighted = torch.cat([tokens[:, 0], patches.mean(1)], dim=1) if prefix else patches.mean(1)
        assert not torch.allclose(out.logits, model.classifier(unweighted), atol=1e-4)
        as_tuple = model(X, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
        loss = model(X, labels=torch.tensor([0, 3])).loss
        assert loss is not None and torch.isfinite(loss)


def test_siglip_model_reduces_the_image_tower_only():
    torch.manual_seed(0)
    model = hf.SiglipModel(hf.SiglipConfig(vision_config=VIT, text_config=TEXT)).eval()
    ids = torch.randint(2, 100, (3, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=X)
        vitcompress.compress(model, "pitome", keep=0.8)
        out = model(input_ids=ids, pixel_values=X)
        feats = model.get_image_features(pixel_values=X)
    assert torch.equal(out.text_embeds, ref.text_embeds)
    assert out.image_embeds.shape == ref.image_embeds.shape and not torch.allclose(out.image_embeds, ref.image_embeds)
    assert getattr(feats, "pooler_output", feats).shape == (2, 32)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("forward" in layer.__dict__ for layer in model.text_model.encoder.layers)
    st = vitcompress.stats(model)
    assert st["options"]["margin"] == 0.9 and st["family"] == "transformers.Siglip"  # PiToMe's CLIP margin
    with torch.no_grad():
        vitcompress.restore(model)
        assert torch.equal(model(input_ids=ids, pixel_values=X).image_embeds, ref.image_embeds)


# --------------------------------------------------------------------------- the adapters agree


def test_tome_on_transformers_vit_equals_tome_on_the_same_weights_in_timm():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    config = hf.ViTConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3,
                          image_size=32, patch_size=4, layer_norm_eps=1e-6, hidden_act="gelu")
    model = hf.ViTModel(config, add_pooling_layer=False).eval()
    timm_vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, mlp_ratio=2,
                                 num_classes=0).eval()
    emb = model.embeddings
    state = {"cls_token": emb.cls_token, "pos_embed": emb.position_embeddings,
             "patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
             "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
             "norm.weight": model.layernorm.weight, "norm.bias": model.layernorm.bias}
    for i, layout in enumerate(find_adapter(model).layouts):
        layer = model.layers[i] if hasattr(model, "layers") else model.encoder.layer[i]
        p = f"blocks.{i}."
        state.update({p + "norm1.weight": layout.norm1.weight, p + "norm1.bias": layout.norm1.bias,
                      p + "norm2.weight": layout.norm2.weight, p + "norm2.bias": layout.norm2.bias,
                      p + "attn.qkv.weight": torch.cat([layout.q.weight, layout.k.weight, layout.v.weight]),
                      p + "attn.qkv.bias": torch.cat([layout.q.bias, layout.k.bias, layout.v.bias]),
                      p + "attn.proj.weight": layout.out.weight, p + "attn.proj.bias": layout.out.bias})
        fc1, fc2 = (layer.mlp.fc1, layer.mlp.fc2) if hasattr(layer, "mlp") else (layer.intermediate.dense,
                                                                              layer.output.dense)
        state.update({p + "mlp.fc1.weight": fc1.weight, p + "mlp.fc1.bias": fc1.bias,
                      p + "mlp.fc2.weight": fc2.weight, p + "mlp.fc2.bias": fc2.bias})
    timm_vit.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    with torch.no_grad():
        torch.testing.assert_close(timm_vit.forward_features(X), model(X).last_hidden_state, atol=1e-5, rtol=0)
        for method in ("tome", "pitome"):
            a = vitcompress.compress(model, method, r=6)(X).last_hidden_state
            b = vitcompress.compress(timm_vit, method, r=6).forward_features(X)
            assert vitcompress.stats(model)["tokens_per_layer"] == vitcompress.stats(timm_vit)["tokens_per_layer"]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the rest


def test_copies_of_a_compressed_model_run_on_their_own():
    model, key, _ = build("dinov2")
    vitcompress.compress(model, "tome", r=6)
    with torch.no_grad():
        want = model(X)[key]
        clone = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for other in (clone, loaded):
            assert torch.equal(other(X)[key], want)
            vitcompress.restore(other)
        vitcompress.restore(model)
        assert torch.equal(clone(X)[key], model(X)[key])


def test_train_mode_gradients_reach_the_layers():
    torch.manual_seed(0)
    model = hf.ViTForImageClassification(hf.ViTConfig(**VIT, num_labels=5, hidden_dropout_prob=0.1,
                                                      attention_probs_dropout_prob=0.1)).train()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    vitcompress.compress(model, "tome", keep=0.8)
    if find_adapter(model).tuple_outputs:  # 4.x checkpoints layer.__call__: refused, with the fix
        with pytest.raises(RuntimeError, match="gradient_checkpointing_disable"):
            model(X, labels=torch.tensor([0, 1]))
        model.gradient_checkpointing_disable()
    # (5.x checkpoints the class's forward, which a patched layer bypasses: nothing to refuse)
    loss = model(X, labels=torch.tensor([0, 1])).loss
    loss.backward()
    for name, p in model.named_parameters():
        if ".layers.0." in name or ".layer.0." in name or name.startswith("classifier"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_refused_with_the_fix():
    model, _, _ = build("vit")
    vitcompress.compress(model, "tome", r=4)
    with pytest.raises(ValueError, match="output_attentions"):
        model(X, output_attentions=True)
    inner = model.vit
    with pytest.raises(ValueError, match="attention or head mask"):
        (inner.layers[0] if hasattr(inner, "layers") else inner.encoder.layer[0])(torch.randn(1, 65, 32),
                                                                                  torch.zeros(1, 1, 65, 65))
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="reconstructs the image"):
        vitcompress.compress(hf.ViTForMaskedImageModeling(hf.ViTConfig(**VIT, encoder_stride=4)), "tome", r=2)
    with pytest.raises(ValueError, match="compress it with unmerge=True"):
        vitcompress.compress(hf.Dinov2Backbone(hf.Dinov2Config(**DINO)), "tome", r=2)
    odd, _, _ = build("vit")
    odd.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attention implementation 'flex_attention'"):
        vitcompress.compress(odd, "tome", r=2)
    with pytest.raises(TypeError, match=r"compress\(model\.vision\[0\]"):
        vitcompress.compress(torch.nn.ModuleDict({"vision": torch.nn.ModuleList([build("siglip")[0]])}), "tome", r=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_counts_of_each_family(family):
    model, _, prefix = build(family)
    adapter = find_adapter(model)
    assert (adapter.num_prefix, adapter.num_patches, adapter.depth) == (prefix, 64, 4)
    assert adapter.cls_first == (prefix > 0)
    assert adapter.variant == ("clip" if family.startswith("siglip") else None)
