"""timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, LayerScale, qk-norm, registers,
``class_token=False`` with average pooling, MAP attention pooling (SigLIP), ``dynamic_img_size``).

Pooling of a compressed model: the class token as before; average pooling weighted by how many
patches each token stands for; MAP pooling (``global_pool='map'``, ``timm.layers.AttentionPoolLatent``,
the SigLIP models) with ``log(size)`` added to its attention logits (proportional attention: a token
standing for k patches weighs as those k patches would). Refused: the ``'prr'`` pool and a MAP pool
with its own position embedding (``pos_embed='abs'``), both of which need every patch token.
"""

import inspect

import torch.nn as nn

from ..engine.blocks import BlockParts, reducing_forward
from ..engine.schedule import ViTCost
from ..interfaces import part_of
from .common import (WEIGHTED_POOLS, TimmAdapter, attn_pool_cost, patch_blocks, patch_flops, patch_part,
                     per_token_flops, refuse_attn_mask, size_aware_attn_pool_forward, size_weighted_pool)


def _block_parts(block) -> BlockParts:
    attn = block.attn
    gate = getattr(attn, "gate", None)
    out_norm = getattr(attn, "norm", None) or nn.Identity()

    def qkv(h):
        B, N, _ = h.shape
        q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def attn_out(o, h):
        o = out_norm(o)
        if gate is not None:
            o = o * gate(h).sigmoid()
        return attn.proj_drop(attn.proj(o))

    return BlockParts(
        norm1=block.norm1, qkv=qkv, attn_out=attn_out,
        residual1=lambda y: block.drop_path1(block.ls1(y)),
        norm2=block.norm2, mlp=block.mlp,
        residual2=lambda y: block.drop_path2(block.ls2(y)),
        scale=attn.scale, attn_dropout=lambda: attn.attn_drop.p, training=lambda: block.training,
    )


class TimmViTAdapter(TimmAdapter):
    family = "timm.VisionTransformer"
    description = ("timm VisionTransformer models (vit_*, deit_*, vit_*_siglip_*; incl. distilled, registers, avg and "
                   "MAP pooling)")
    model_class = "timm.models.vision_transformer.VisionTransformer"
    supported_blocks = ("vitcompress supports timm's pre-norm Block with the standard Attention (post-norm, "
                        "parallel and RoPE blocks are not supported)")

    @staticmethod
    def block_types():
        from timm.layers import Attention
        from timm.models.vision_transformer import Block
        return Block, Attention

    def __init__(self, model):
        super().__init__(model)
        pool = getattr(model, "attn_pool", None)
        if pool is not None and (type(pool).__name__ != "AttentionPoolLatent" or getattr(pool, "pos_embed", None)
                                 is not None):
            what = "a MAP pool with its own position embedding" if type(pool).__name__ == "AttentionPoolLatent" \
                else f"global_pool={model.global_pool!r} ({type(pool).__name__})"
            raise ValueError(f"{what} is not supported: it needs every patch token in place; use a model with "
                             "token, avg or MAP ('map') pooling")
        if pool is not None and "attn_mask" not in inspect.signature(type(pool).forward).parameters:
            raise ValueError("this timm's AttentionPoolLatent takes no attn_mask, which the size-aware MAP pool "
                             "needs; upgrade timm (pip install -U timm) to compress MAP-pooled models")
        self.attn_pool = pool

    def patch(self, runtime, patcher) -> None:
        patch_blocks(patcher, self.model.blocks, runtime, _reducing_block_forward)
        if runtime.unmerge:  # under unmerge the pools see every patch again
            pass
        elif self.attn_pool is not None:
            patch_part(patcher, self.attn_pool, runtime, "forward", size_aware_attn_pool_forward)
        elif self.model.global_pool in WEIGHTED_POOLS and hasattr(self.model, "pool"):
            patch_part(patcher, self.model, runtime, "pool", size_weighted_pool)
        self.patch_model_methods(runtime, patcher)

    def cost(self) -> ViTCost:
        m = self.model
        attn = m.blocks[0].attn
        block = m.blocks[0]
        proj = m.patch_embed.proj
        heads = attn.num_heads
        per_patch = patch_flops(proj)
        per_patch += per_token_flops(getattr(m.patch_embed, "norm", None)) + per_token_flops(m.norm_pre)
        fixed = self.num_prefix * per_token_flops(m.norm_pre) + per_token_flops(m.fc_norm)
        fixed += per_token_flops(m.head) + per_token_flops(getattr(m, "head_dist", None))
        final = per_token_flops(m.norm)
        if self.attn_pool is not None:
            per_token, once = attn_pool_cost(self.attn_pool)
            final += per_token
            if not m.pool_include_prefix:
                fixed -= self.num_prefix * per_token
            fixed += once
        attn_in = per_token_flops(block.norm1) + per_token_flops(attn.qkv) + per_token_flops(getattr(attn, "gate", None))
        attn_in += heads * (per_token_flops(attn.q_norm) + per_token_flops(attn.k_norm))
        return ViTCost(
            depth=self.depth, dim=m.embed_dim, num_heads=heads, head_dim=attn.head_dim, per_patch=per_patch,
            per_token_attn_in=attn_in,
            per_token_attn_out=per_token_flops(getattr(attn, "norm", None)) + per_token_flops(attn.proj),
            per_token_mlp=per_token_flops(block.norm2) + per_token_flops(block.mlp),
            per_token_final=final, fixed=fixed,
        )


def _reducing_block_forward(block, x, attn_mask=None, is_causal=False):
    refuse_attn_mask(attn_mask, is_causal)
    part = part_of(block)
    return reducing_forward(_block_parts(block), part.runtime, part.layer, x)
