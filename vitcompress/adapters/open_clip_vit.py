"""open_clip image towers: a whole ``open_clip.model.CLIP`` / ``CustomTextCLIP`` (only its
``.visual`` tower is reduced; the text tower is never touched) or an
``open_clip.transformer.VisionTransformer`` on its own.

Every block is mapped onto the shared reducing block: ``ResidualAttentionBlock`` (attention by
``nn.MultiheadAttention``: ``in_proj`` / ``out_proj``) and ``CustomResidualAttentionBlock``
(open_clip's own ``Attention``: qk-norm, per-head scale, inner and post-attention norms, MLP norm),
LayerScale (``ls_1`` / ``ls_2``) included. Blocks see the layout open_clip hands them:
batch-first when the tower's ``Transformer.batch_first`` is set (open_clip 3.x), sequence-first
(``[L, N, D]``) in older releases; either way the reducing block works batch-first.

Pooling of a compressed tower (the class token is never reduced):

* ``pool_type="tok"``: the class token, as before.
* ``pool_type="avg"``: the mean of the patch tokens, each weighted by how many patches it stands for.
* attentional pooler (``attentional_pool=True``, the CoCa tower): its queries attend to the reduced
  tokens with ``log(size)`` added to the attention logits, so a merged token receives the weight
  the patches it stands for would receive together (proportional attention; exact when the merged
  patches were identical). The ``"parallel"`` / ``"cascade"`` poolers (marked untested upstream)
  are refused.
* ``output_tokens=True``: the returned tokens are the reduced ones (fewer than the patches, no
  longer on the patch grid); their sizes are ``vitcompress.stats(model)["size"][:, 1:]`` after the
  forward. ``forward_intermediates`` works with ``output_fmt="NLC"`` only, for the same reason.

Refused with an error naming the fix: a timm trunk (compress ``model.visual.trunk`` with the timm
adapter), a ResNet tower, scaled cosine attention, cross-attention blocks, ``pool_type="none"``
without a pooler, an ``attn_mask`` passed to the blocks, and gradient checkpointing while gradients
are on (the recomputed blocks would see the token state of the finished forward).
"""
import math

import torch.nn as nn
import torch.nn.functional as F

from ..engine.blocks import BlockParts, reducing_forward
from ..engine.schedule import ViTCost
from ..interfaces import part_of
from .common import (PatchedMethod, ViTAdapter, family_class, identity, patch_blocks, patch_flops, patch_part,
                     per_token_flops, refuse_grad_checkpointing, token_intermediates)


#: the whole models (whose ``.visual`` is the image tower) and the tower itself
_MODEL_CLASSES = ("open_clip.model.CLIP", "open_clip.model.CustomTextCLIP", "open_clip.coca_model.CoCa",
                  "open_clip.transformer.VisionTransformer")


def _open_clip():
    from open_clip import model, transformer
    return model, transformer


def _whole_models(model_mod) -> tuple:
    """open_clip's two-tower model classes, whose ``.visual`` is the image tower."""
    classes = (model_mod.CLIP, model_mod.CustomTextCLIP)
    try:
        from open_clip.coca_model import CoCa
    except ImportError:
        return classes
    return classes + (CoCa,)


def _mha_parts(block) -> BlockParts:
    attn = block.attn
    heads, head_dim = attn.num_heads, attn.head_dim

    def qkv(h):
        B, N, _ = h.shape
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        return qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    return BlockParts(
        norm1=block.ln_1, qkv=qkv, attn_out=lambda o, h: attn.out_proj(o), residual1=block.ls_1,
        norm2=block.ln_2, mlp=block.mlp, residual2=block.ls_2,
        scale=head_dim ** -0.5, attn_dropout=lambda: attn.dropout, training=lambda: block.training,
    )



def _custom_parts(block) -> BlockParts:
    attn = block.attn
    heads, head_dim = attn.num_heads, attn.head_dim
    # qk-norm, inner and post-attention norms exist since open_clip 3.0
    ln_q, ln_k = getattr(attn, "ln_q", identity), getattr(attn, "ln_k", identity)
    ln_inner, ln_attn = getattr(attn, "ln_inner", identity), getattr(block, "ln_attn", identity)

    def qkv(h):
        B, N, _ = h.shape
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return ln_q(q), ln_k(k), v

    def attn_out(o, h):
        if attn.head_scale is not None:
            B, N, _ = o.shape
            o = (o.reshape(B, N, heads, head_dim) * attn.head_scale.reshape(heads, 1)).reshape(B, N, -1)
        return attn.out_drop(attn.out_proj(ln_inner(o)))

    return BlockParts(
        norm1=block.ln_1, qkv=qkv, attn_out=attn_out, residual1=lambda y: block.ls_1(ln_attn(y)),
        norm2=block.ln_2, mlp=block.mlp, residual2=block.ls_2,
        scale=attn.scale, attn_dropout=lambda: attn.attn_drop.p, training=lambda: block.training,
    )


def _check_block(i: int, block, transformer_mod) -> None:
    where = f"block {i} of the image tower"
    if type(block) is transformer_mod.ResidualAttentionBlock:
        attn = block.attn
        if hasattr(block, "ln_1_kv"):
            raise TypeError(f"{where} is a cross-attention block; vitcompress reduces self-attention towers only")
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise TypeError(f"{where} uses nn.MultiheadAttention with separate q/k/v sizes, bias_kv or "
                            "add_zero_attn; vitcompress supports the packed in_proj attention open_clip builds")
        return
    if type(block) is transformer_mod.CustomResidualAttentionBlock and type(block.attn) is transformer_mod.Attention:
        if block.attn.logit_scale is not None:
            raise TypeError(f"{where} uses scaled cosine attention (scaled_cosine_attn=True), which vitcompress "
                            "does not map onto its attention; use a tower without it")
        return
    raise TypeError(f"{where} is a {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}; "
                    "vitcompress supports open_clip's ResidualAttentionBlock and CustomResidualAttentionBlock")


def _tower(model, model_mod, transformer_mod):
    """The ``VisionTransformer`` to reduce, or a clear error for towers without one."""
    visual = model.visual if isinstance(model, _whole_models(model_mod)) else model
    if isinstance(visual, transformer_mod.VisionTransformer):
        return visual
    name = type(visual).__name__
    if hasattr(visual, "trunk"):
        raise TypeError(f"this CLIP's image tower is a timm model ({type(visual.trunk).__name__}); compress "
                        "its trunk instead: vitcompress.compress(model.visual.trunk, ...)")
    raise TypeError(f"this CLIP's image tower is a {name}, not a VisionTransformer: it has no token "
                    "sequence to reduce")


class OpenCLIPVisionAdapter(ViTAdapter):
    family = "open_clip.VisionTransformer"
    description = "open_clip CLIP / CustomTextCLIP / CoCa (image tower) and open_clip VisionTransformer"
    variant = "clip"

    @staticmethod
    def matches(model) -> bool:
        return family_class(model, _MODEL_CLASSES) is not None

    def __init__(self, model):
        model_mod, transformer_mod = _open_clip()
        self.model = model
        self.visual = visual = _tower(model, model_mod, transformer_mod)
        for i, block in enumerate(visual.transformer.resblocks):
            _check_block(i, block, transformer_mod)
        if visual.attn_pool is not None and getattr(visual, "attn_pool_contrastive", None) is not None:
            raise ValueError(f"the {visual.attn_pool_type!r} attentional pooler (marked untested in open_clip) is "
                             "not supported; use a tower with token, average or CoCa-style attentional pooling")
        if visual.attn_pool is None and visual.pool_type not in ("tok", "avg"):
            raise ValueError(f"pool_type={visual.pool_type!r} returns every token; token reduction would change "
                             "the output's shape. Use a tower with pool_type 'tok' or 'avg'")
        self.batch_first = getattr(visual.transformer, "batch_first", False)
        self.num_prefix = 1
        self.num_patches = math.prod(visual.grid_size)
        self.depth = len(visual.transformer.resblocks)

    def patch(self, runtime, patcher) -> None:
        visual = self.visual
        blocks = visual.transformer.resblocks
        # open_clip builds every block of a tower from one class
        mha = isinstance(blocks[0].attn, nn.MultiheadAttention)
        forward = _reducing_block_forward if mha else _reducing_custom_block_forward
        patch_blocks(patcher, blocks, runtime, forward, details=self.batch_first)
        if runtime.unmerge:  # the pools see every patch again
            pass
        elif visual.attn_pool is not None:
            patch_part(patcher, visual.attn_pool, runtime, "forward", _size_aware_pooler_forward)
        elif visual.pool_type == "avg":
            patch_part(patcher, visual, runtime, "_global_pool", _size_weighted_global_pool)
        if hasattr(visual, "forward_intermediates"):
            patcher.set(visual, "forward_intermediates", PatchedMethod(token_intermediates, visual, runtime))
        refuse_grad_checkpointing(patcher, visual, "set_grad_checkpointing")  # a whole CLIP's switch calls it

    def grad_checkpointing(self) -> bool:
        return bool(getattr(self.visual.transformer, "grad_checkpointing", False))

    def cost(self) -> ViTCost:
        v = self.visual
        block = v.transformer.resblocks[0]
        attn = block.attn
        width, heads = v.conv1.out_channels, attn.num_heads
        conv = v.conv1
        per_patch = patch_flops(conv)
        per_patch += per_token_flops(v.ln_pre)
        attn_in = per_token_flops(block.ln_1) + 3 * width * width  # in_proj is a bare weight
        attn_out = per_token_flops(attn.out_proj)
        if not isinstance(attn, nn.MultiheadAttention):  # open_clip's own Attention and its norms
            norm = lambda owner, name: per_token_flops(getattr(owner, name, None))
            attn_in += heads * (norm(attn, "ln_q") + norm(attn, "ln_k"))
            attn_out += norm(attn, "ln_inner") + norm(block, "ln_attn")
        final, fixed = self._pooling_cost()
        return ViTCost(
            depth=self.depth, dim=width, num_heads=heads, head_dim=width // heads, per_patch=per_patch,
            per_token_attn_in=attn_in, per_token_attn_out=attn_out,
            per_token_mlp=per_token_flops(block.ln_2) + per_token_flops(block.mlp),
            per_token_final=final, fixed=self.num_prefix * per_token_flops(v.ln_pre) + fixed,
        )

    def _pooling_cost(self):
        """(FLOPs per token leaving the last block, fixed FLOPs) of pooling, final norm and projection."""
        v = self.visual
        out_dim = v.proj.shape[1] if v.proj is not None else 0
        pool = v.attn_pool
        if pool is None:
            proj = v.proj.shape[0] * out_dim if v.proj is not None else 0
            if v.final_ln_after_pool:
                return 0, per_token_flops(v.ln_post) + proj
            return per_token_flops(v.ln_post), proj
        # Keys and values are projected per token; every query attends to every token.
        queries, d_model = pool.query.shape
        per_token = per_token_flops(pool.ln_k) + 2 * pool.attn.kdim * d_model + 2 * queries * d_model
        fixed = queries * (per_token_flops(pool.ln_q) + 2 * d_model * d_model + per_token_flops(v.ln_post))
        return per_token, fixed + d_model * out_dim


def _reduce(block, parts: BlockParts, x, attn_mask):
    if attn_mask is not None:
        raise ValueError("a compressed open_clip tower cannot take attn_mask (token reduction changes the "
                         "token set the mask refers to)")
    part = part_of(block)
    batch_first = part.details
    if not batch_first:
        x = x.transpose(0, 1)
    x = reducing_forward(parts, part.runtime, part.layer, x)
    return x if batch_first else x.transpose(0, 1)


def _reducing_block_forward(block, q_x, k_x=None, v_x=None, attn_mask=None):
    """``ResidualAttentionBlock.forward`` with token reduction (self-attention only)."""
    if k_x is not None or v_x is not None:
        raise ValueError("a compressed open_clip image block takes no separate keys/values (k_x, v_x)")
    return _reduce(block, _mha_parts(block), q_x, attn_mask)


def _reducing_custom_block_forward(block, x, attn_mask=None):
    """``CustomResidualAttentionBlock.forward`` with token reduction."""
    return _reduce(block, _custom_parts(block), x, attn_mask)


def _size_weighted_global_pool(visual, x):
    """open_clip's average pooling (``pool_type="avg"``), weighting each patch token by its size."""
    tokens = x[:, 1:]
    size = part_of(visual).runtime.current().tokens.size[:, 1:].to(x.dtype)
    return (tokens * size).sum(dim=1) / size.sum(dim=1), tokens


def _size_aware_pooler_forward(pooler, x):
    """``AttentionalPooler.forward`` over reduced tokens: ``log(size)`` biases each token's logits."""
    state = part_of(pooler).runtime.current().tokens
    x = pooler.ln_k(x)
    B, S = x.shape[:2]
    q = pooler.ln_q(pooler.query)
    mask = None
    if state.merged:
        heads, queries = pooler.attn.num_heads, q.shape[0]
        mask = state.size.log().to(x.dtype).reshape(B, 1, 1, S).expand(B, heads, queries, S)
        mask = mask.reshape(B * heads, queries, S)
    if pooler.attn.batch_first:
        return pooler.attn(q.unsqueeze(0).expand(B, -1, -1), x, x, need_weights=False, attn_mask=mask)[0]
    x = x.transpose(0, 1)
    out = pooler.attn(q.unsqueeze(1).expand(-1, B, -1), x, x, need_weights=False, attn_mask=mask)[0]
    return out.transpose(0, 1)
