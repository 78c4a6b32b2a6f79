"""timm EVA / EVA-02 (rotary position embeddings) and BEiT (relative position bias): every token keeps
its own position (a merged token its destination's), the rotary rows and the bias rows and columns
follow the kept tokens. Pruned forwards are checked against independent computations that run timm's
own attention modules on the rotary embeddings / bias entries of the kept tokens."""
from unittest import mock

import pytest
import torch

import vitcompress
from vitcompress.adapters import find_adapter
from vitcompress.interfaces import runtime_of
from vitcompress.methods import get
from vitcompress.engine.schedule import build_schedule

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
METHODS = ("tome", "pitome", "zero_tprune")


def eva02():
    """The ``eva02_tiny_patch14_224`` architecture (rotary 'cat' embeddings, SwiGLU, avg pool), shrunk."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, **TINY).eval()


def eva_registers():
    """A plain ``Eva`` with rotary embeddings, a class token, two registers and MAP pooling."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    return Eva(**TINY, use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=2, global_pool="map").eval()


def beit(**kwargs):
    """A BEiT with random relative position bias tables (timm starts them at zero)."""
    from timm.models.beit import Beit

    torch.manual_seed(0)
    model = Beit(**TINY, use_abs_pos_emb=False, init_values=0.1, **kwargs).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_()
    return model


MODELS = {"eva02": eva02, "eva_registers": eva_registers,
          "beit": lambda: beit(use_rel_pos_bias=True),
          "beit_shared": lambda: beit(use_shared_rel_pos_bias=True, global_pool="token"),
          "beit_both": lambda: beit(use_rel_pos_bias=True, use_shared_rel_pos_bias=True)}


def features(model, x):
    """Pooled features: timm scales these models' classifiers to 1e-3 at init, logits would hide errors."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("eva_registers", "beit_shared")
                                  else n for n in MODELS])
def test_keep_one_and_r_zero_equal_the_uncompressed_model(name):
    model = MODELS[name]()
    with torch.no_grad():
        ref = features(model, X)
        for method in METHODS:
            vitcompress.compress(model, method, keep=1.0)
            torch.testing.assert_close(features(model, X), ref, atol=1e-5, rtol=0)
        vitcompress.compress(model, "tome", r=0)
        torch.testing.assert_close(features(model, X), ref, atol=1e-5, rtol=0)


# every method on one EVA and one BEiT; the other variants with tome by default, the rest slow
REDUCE_CASES = [pytest.param(name, method, id=f"{name}-{method}",
                             marks=() if name in ("eva02", "beit") or method == "tome" else pytest.mark.slow)
                for name in MODELS for method in METHODS]


@pytest.mark.parametrize("name,method", REDUCE_CASES)
def test_reduce_restore_and_special_tokens(name, method):
    """Tokens per layer as planned; the special tokens are never reduced (each stands for itself
    alone and no other token covers it); a token's position is one of the patches it covers (a
    merged token: its destination's); restore is bit-exact."""
    model = MODELS[name]()
    p = model.num_prefix_tokens
    with torch.no_grad():
        ref = features(model, X)
        vitcompress.compress(model, method, keep=0.8, trace_source=True)
        out = features(model, X)
        st = vitcompress.stats(model)
        position = runtime_of(model).last_forward().tokens.position
        vitcompress.restore(model)
        back = features(model, X)
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"]
    assert st["planned_tokens_per_layer"][-1] < st["planned_tokens_per_layer"][0]
    source, size = st["source"], st["size"]
    assert torch.equal(source[:, :p], torch.eye(source.shape[2])[:p].expand(len(X), -1, -1))
    assert not source[:, p:, :p].any()
    assert torch.equal(source.sum(-1, keepdim=True), size)
    assert torch.equal(position[:, :p], torch.arange(p).expand(len(X), -1))
    assert (source.gather(2, position[..., None]) == 1).all()
    if get(method).kind == "merge":
        assert size.max() > 1
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    assert torch.equal(back, ref)


@pytest.mark.parametrize("name", ["eva02", "beit"])
def test_batch_one_and_bf16_autocast(name):
    model = vitcompress.compress(MODELS[name](), "tome", keep=0.8)
    with torch.no_grad():
        both = features(model, X)
        one = features(model, X[:1])
        assert vitcompress.stats(model)["tokens_per_layer"] == vitcompress.stats(model)["planned_tokens_per_layer"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = features(model, X)
        st = vitcompress.stats(model)
    torch.testing.assert_close(one, both[:1], atol=1e-5, rtol=0)
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"]
    assert torch.isfinite(half).all()
    assert torch.nn.functional.cosine_similarity(half.float(), both).min() > 0.98


@pytest.mark.parametrize("name", ["eva02", pytest.param("eva_registers", marks=pytest.mark.slow), "beit_both"])
def test_flops_counted_and_target_met(name):
    model = MODELS[name]()
    adapter = find_adapter(model)
    base = vitcompress.count_flops(model, X[:1])
    uncompressed = build_schedule(get("tome"), {}, "r", 0, adapter.num_patches, adapter.num_prefix, adapter.depth)
    assert adapter.cost().flops(uncompressed) == base  # counted as fvcore counts them
    vitcompress.compress(model, "pitome", flops=0.7)
    assert abs(vitcompress.count_flops(model, X[:1]) / base - 0.7) < 0.7 * 0.02


# --------------------------------------------------------------------------- independent computations of pruning


def pruned_run(model, x, keep=0.9):
    """zero_tprune (pruning only) on ``model``: its features and the kept indices of every reducing
    layer (reducible tokens, as the plans gave them); the model is restored afterwards."""
    method, plans = get("zero_tprune"), {}
    plan = method.plan

    def recording(signals, remove, options):
        out = plan(signals, remove, options)
        assert not out.merges
        plans[signals.layer] = out.keep.clone()
        return out

    with mock.patch.object(method, "plan", recording), torch.no_grad():
        vitcompress.compress(model, "zero_tprune", keep=keep)
        out = features(model, x)
        vitcompress.restore(model)
    assert plans
    return out, plans


def rows(t, index):
    """Per image: the rows ``index[b]`` of ``t[b]``."""
    return torch.stack([t[b][index[b]] for b in range(len(index))])


def block_with_pruning(block, h, attention, keep, p):
    """One timm block as the compressed model runs it: attention residual, prune, MLP residual."""
    a = attention(block.norm1(h))
    h = h + (a if block.gamma_1 is None else block.gamma_1 * a)
    if keep is not None:
        h = torch.cat([h[:, :p], rows(h[:, p:], keep)], dim=1)
    m = block.mlp(block.norm2(h))
    return h + (m if block.gamma_2 is None else block.gamma_2 * m)


@pytest.mark.parametrize("name", ["eva02", "eva_registers"])
def test_eva_pruning_equals_gathering_the_rotary_embeddings_of_the_kept_tokens(name):
    model = MODELS[name]()
    out, plans = pruned_run(model, X)
    p = model.num_prefix_tokens
    with torch.no_grad():
        h, rope = model._pos_embed(model.patch_embed(X))  # rope [N0, D]: one row per patch
        h = model.norm_pre(h)
        patch = torch.arange(h.shape[1] - p).expand(len(X), -1)  # the original patch of each patch token
        for i, block in enumerate(model.blocks):
            r = rows(rope.expand(len(X), -1, -1), patch)[:, None]  # [B, 1, N, D], as timm's patch dropout passes it
            h = block_with_pruning(block, h, lambda t: block.attn(t, rope=r), plans.get(i), p)
            if i in plans:
                patch = rows(patch, plans[i])
        want = model.forward_head(model.norm(h), pre_logits=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["beit", "beit_shared", "beit_both"])
def test_beit_pruning_equals_the_bias_of_the_kept_tokens(name):
    """The block's own bias read from its table at the relative positions of the kept tokens, the
    shared one indexed per image; timm's Attention runs with them."""
    model = MODELS[name]()
    out, plans = pruned_run(model, X)
    with torch.no_grad():
        h = model.patch_embed(X)
        h = torch.cat([model.cls_token.expand(len(X), -1, -1), h], dim=1)
        shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None  # [H, N0, N0]
        pos = torch.arange(h.shape[1]).expand(len(X), -1)  # the original index of each token, class token 0
        for i, block in enumerate(model.blocks):
            attn = block.attn
            own = shared_now = None
            if attn.relative_position_bias_table is not None:
                index = torch.stack([attn.relative_position_index[q][:, q] for q in pos])  # [B, N, N]
                own = attn.relative_position_bias_table[index].permute(0, 3, 1, 2)
            if shared is not None:
                shared_now = torch.stack([shared[:, q][:, :, q] for q in pos])
            with mock.patch.object(attn, "_get_rel_pos_bias", lambda: own):
                h = block_with_pruning(block, h, lambda t: attn(t, shared_rel_pos_bias=shared_now), plans.get(i), 1)
            if i in plans:
                pos = torch.cat([pos[:, :1], 1 + rows(pos[:, 1:] - 1, plans[i])], dim=1)
        want = model.forward_head(model.norm(h), pre_logits=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- refusals


def test_refusals_name_the_problem():
    from timm.models.eva import Eva

    with pytest.raises(TypeError, match="use_post_norm"):
        vitcompress.compress(Eva(**TINY, use_rot_pos_emb=True, use_post_norm=True), "tome", r=2)
    model = vitcompress.compress(eva02(), "tome", r=4)
    with pytest.raises(ValueError, match="attn_mask"):
        model(X, attn_mask=torch.zeros(65, 65))
    model = vitcompress.compress(MODELS["beit"](), "tome", r=4)
    with torch.no_grad():
        feats = model.forward_features(X)
        model.forward_features(X[:1])
        with pytest.raises(ValueError, match="right after the forward_features"):
            model.forward_head(feats)


def test_intermediates_and_other_input_sizes():
    """forward_intermediates gives the reduced tokens (NLC only); EVA's dynamic_img_size plans and
    gathers the rotary rows of each input size."""
    import timm

    model = vitcompress.compress(MODELS["beit"](), "tome", keep=0.8)
    with torch.no_grad():
        inter = model.forward_intermediates(X, output_fmt="NLC", intermediates_only=True)
        planned = vitcompress.stats(model)["planned_tokens_per_layer"]
        assert [t.shape[1] + 1 for t in inter] == planned[1:] + [vitcompress.stats(model)["size"].shape[1]]
        with pytest.raises(ValueError, match="output_fmt='NLC'"):
            model.forward_intermediates(X)
        torch.manual_seed(0)
        model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, dynamic_img_size=True, **TINY).eval()
        x = torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(2))
        ref = features(model, x)
        vitcompress.compress(model, "tome", keep=1.0)
        torch.testing.assert_close(features(model, x), ref, atol=1e-5, rtol=0)
        vitcompress.compress(model, "tome", keep=0.8)
        features(model, x)
    st = vitcompress.stats(model)
    assert st["tokens_per_layer"] == st["planned_tokens_per_layer"] and st["tokens_per_layer"][0] == 1 + 12 * 10
