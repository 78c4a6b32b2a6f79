"""The timm adapter across ViT variants and execution modes."""
import pytest
import timm
import torch

import vitcompress
from vitcompress.testing import tiny_vit

VARIANTS = {
    "cls": dict(),
    "qk_norm+layerscale": dict(qk_norm=True, init_values=1e-2),
    "registers": dict(reg_tokens=4),
    "avg_pool_no_cls": dict(class_token=False, global_pool="avg", fc_norm=True),
    "avg_pool_with_cls": dict(global_pool="avg"),
    "no_embed_class": dict(no_embed_class=True, reg_tokens=2),
}


def run(model, x, method, **budget):
    with torch.no_grad():
        vitcompress.compress(model, method, trace_source=True, **budget)
        out = model(x)
        st = vitcompress.stats(model)
        vitcompress.restore(model)
    return out, st


def assert_prefix_alone(source, prefix):
    """Each special token's source row is its own one-hot, and no other token covers it."""
    eye = torch.eye(source.shape[-1])[:prefix]
    for b in range(source.shape[0]):
        assert torch.equal(source[b, :prefix], eye)
        assert torch.equal(source[b, prefix:, :prefix], torch.zeros_like(source[b, prefix:, :prefix]))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_variants_keep_special_tokens_and_schedule(variant, method):
    model = tiny_vit(**VARIANTS[variant])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    out, st = run(model, x, method, keep=0.8)
    prefix = model.num_prefix_tokens
    assert out.shape == ref.shape
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"]
    assert st["tokens_per_layer"][-1] < 64 + prefix
    source = st["source"]
    assert_prefix_alone(source, prefix)
    assert torch.equal(source.sum(dim=1), torch.ones(2, 64 + prefix))  # every patch in exactly one token
    same, _ = run(model, x, method, keep=1.0)
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=0)


def test_distilled_deit_keeps_cls_and_dist():
    model = timm.create_model("deit_tiny_distilled_patch16_224").eval()
    assert model.num_prefix_tokens == 2
    out, st = run(model, torch.randn(1, 3, 224, 224), "pitome", keep=0.85)
    assert out.shape == (1, 1000)
    assert_prefix_alone(st["source"], 2)


def test_avg_pool_weights_tokens_by_size():
    model = tiny_vit(**VARIANTS["avg_pool_no_cls"])
    x = torch.randn(2, 3, 32, 32)
    vitcompress.compress(model, "tome", r=6)
    with torch.no_grad():
        feats = model.forward_features(x)
        size = vitcompress.stats(model)["size"]
        pooled = model.forward_head(feats, pre_logits=True)
    vitcompress.restore(model)
    want = model.fc_norm((feats * size).sum(1) / size.sum(1))
    torch.testing.assert_close(pooled, want)
    assert not torch.allclose(pooled, model.fc_norm(feats.mean(1)), atol=1e-4)


def test_inference_mode_and_batch_one():
    model = tiny_vit()
    vitcompress.compress(model, "pitome", keep=0.8)
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert vitcompress.stats(model)["tokens_per_layer"] == vitcompress.stats(model)["planned_tokens_per_layer"]


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_train_mode_gradients_reach_parameters(method):
    model = tiny_vit(drop_path_rate=0.1, attn_drop_rate=0.1).train()
    vitcompress.compress(model, method, keep=0.8)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name in ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "head.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bfloat16_autocast():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        vitcompress.compress(model, "pitome", keep=1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            same = model(x)
        vitcompress.compress(model, "pitome", keep=0.8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert vitcompress.stats(model)["tokens_per_layer"] == vitcompress.stats(model)["planned_tokens_per_layer"]
    torch.testing.assert_close(same.float(), ref, atol=0.1, rtol=0.05)


def test_gradient_checkpointing_is_refused_while_gradients_are_on():
    """Turned on before compress (turning it on after is refused by the switch itself)."""
    model = tiny_vit().train()
    model.set_grad_checkpointing(True)
    vitcompress.compress(model, "tome", r=4)
    with pytest.raises(RuntimeError, match="set_grad_checkpointing\\(False\\)"):
        model(torch.randn(2, 3, 32, 32))
    with torch.no_grad():  # nothing is recomputed without gradients
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model.set_grad_checkpointing(False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_pool_types_and_forward_head_after_another_forward():
    model = tiny_vit(**VARIANTS["avg_pool_with_cls"])
    x = torch.randn(2, 3, 32, 32)
    vitcompress.compress(model, "tome", r=6)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.equal(model.pool(feats, pool_type="token"), feats[:, 0])  # timm's own for non-weighted pools
        model.forward_features(x[:1])  # another forward: the sizes no longer describe feats
        with pytest.raises(ValueError, match="right after the forward_features"):
            model.forward_head(feats)


def test_intermediates_are_token_lists_after_compress():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    vitcompress.compress(model, "tome", r=6)
    with torch.no_grad():
        with pytest.raises(ValueError, match="output_fmt='NLC'"):
            model.forward_intermediates(x)
        with pytest.raises(ValueError, match="reshape=False"):
            model.get_intermediate_layers(x, n=2, reshape=True)
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        layers = model.get_intermediate_layers(x, n=2)
    # each block's output without CLS: 64 patches less 6 per block; the final tokens with CLS
    assert [t.shape[1] for t in inter] == [58, 52, 46, 40] and final.shape[1] == 41
    assert [t.shape[1] for t in layers] == [46, 40]
