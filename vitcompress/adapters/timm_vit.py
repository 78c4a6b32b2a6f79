"""timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, LayerScale, qk-norm, registers,
``class_token=False`` with average pooling, MAP attention pooling (SigLIP), ``dynamic_img_size``).

Pooling of a compressed model: the class token as before; average pooling weighted by how many
patches each token stands for; MAP pooling (``global_pool='map'``, ``timm.layers.AttentionPoolLatent``,
the SigLIP models) with ``log(size)`` added to its attention logits (proportional attention: a token
standing for k patches weighs as those k patches would). Refused: the ``'prr'`` pool and a MAP pool
with its own position embedding (``pos_embed='abs'``), both of which need every patch token.
"""

import inspect

import torch
import torch.nn as nn

from ..engine.blocks import BlockParts, reducing_forward
from ..engine.schedule import ViTCost
from ..interfaces import part_of
from .common import (
    ViTAdapter,
    bind,
    patch_blocks,
    patch_flops,
    patch_part,
    per_token_flops,
    plan_again_after_resize,
    refuse_grad_checkpointing,
    require_block_types,
    token_intermediates,
)

_WEIGHTED_POOLS = ("avg", "avgmax", "max")


def _timm():
    try:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError:
        return None
    return VisionTransformer, Block, Attention


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


class TimmViTAdapter(ViTAdapter):
    family = "timm.VisionTransformer"
    description = ("timm VisionTransformer models (vit_*, deit_*, vit_*_siglip_*; incl. distilled, registers, avg and "
                   "MAP pooling)")

    @staticmethod
    def matches(model) -> bool:
        classes = _timm()
        return classes is not None and isinstance(model, classes[0])

    def __init__(self, model):
        _, Block, Attention = _timm()
        self.model = model
        require_block_types(model.blocks, Block, Attention, "VisionTransformer",
                            "vitcompress supports timm's pre-norm Block with the standard Attention (post-norm, "
                            "parallel and RoPE blocks are not supported)")
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
        self.num_prefix = model.num_prefix_tokens
        self.cls_first = getattr(model, "cls_token", None) is not None  # else the prefix is registers only
        self.num_patches = model.patch_embed.num_patches
        self.depth = len(model.blocks)

    def patch(self, runtime, patcher) -> None:
        patch_blocks(patcher, self.model.blocks, runtime, _reducing_block_forward)
        if self.attn_pool is not None:
            patch_part(patcher, self.attn_pool, runtime, "forward", _size_aware_attn_pool_forward)
        elif self.model.global_pool in _WEIGHTED_POOLS and hasattr(self.model, "pool"):
            patch_part(patcher, self.model, runtime, "pool", _size_weighted_pool)
        if hasattr(self.model, "forward_intermediates"):
            patcher.set(self.model, "forward_intermediates", bind(token_intermediates, self.model))
        refuse_grad_checkpointing(patcher, self.model, "set_grad_checkpointing")
        plan_again_after_resize(patcher, self.model)

    def grad_checkpointing(self) -> bool:
        return bool(getattr(self.model, "grad_checkpointing", False))

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
        if self.attn_pool is not None:  # keys and values per pooled token, the latent queries once
            pool = self.attn_pool
            queries, width = pool.latent_len, pool.num_heads * pool.head_dim
            per_token = per_token_flops(pool.kv) + pool.num_heads * per_token_flops(pool.k_norm) + 2 * queries * width
            final += per_token
            if not m.pool_include_prefix:
                fixed -= self.num_prefix * per_token
            fixed += queries * (per_token_flops(pool.q) + pool.num_heads * per_token_flops(pool.q_norm)
                                + per_token_flops(pool.proj) + per_token_flops(pool.norm) + per_token_flops(pool.mlp))
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
    if attn_mask is not None or is_causal:
        raise ValueError("a compressed model cannot take attn_mask/is_causal (token reduction changes "
                         "the token set the mask refers to)")
    part = part_of(block)
    return reducing_forward(_block_parts(block), part.runtime, part.layer, x)


def _size_weighted_pool(model, x: torch.Tensor, pool_type=None) -> torch.Tensor:
    """timm's average pooling, weighting each token by how many patches it stands for (the sizes
    of this thread's latest forward, which produced ``x``); other pool types are timm's own."""
    pool_type = model.global_pool if pool_type is None else pool_type
    if pool_type not in _WEIGHTED_POOLS:
        return type(model).pool(model, x, pool_type)
    size = part_of(model).runtime.current().tokens.size
    if size.shape[:2] != x.shape[:2]:
        raise ValueError(f"pooling {tuple(x.shape[:2])} tokens with the sizes of the latest forward "
                         f"({tuple(size.shape[:2])}): on a compressed model call forward_head right after the "
                         "forward_features that produced its input")
    start = 0 if model.pool_include_prefix else model.num_prefix_tokens
    tokens, size = x[:, start:], size[:, start:].to(x.dtype)
    mean = (tokens * size).sum(dim=1) / size.sum(dim=1)
    if pool_type == "avg":
        return mean
    if pool_type == "max":
        return tokens.amax(dim=1)
    return 0.5 * (tokens.amax(dim=1) + mean)


def _size_aware_attn_pool_forward(pool, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """timm's ``AttentionPoolLatent`` over reduced tokens: ``log(size)`` added to its attention logits
    (the sizes of this thread's latest forward, the special tokens left out when the pool leaves them out)."""
    if attn_mask is not None:
        raise ValueError("the attention pool of a compressed model takes no attn_mask")
    state = part_of(pool).runtime.current().tokens
    B, N = x.shape[:2]
    size = state.size
    if size.shape[0] == B and size.shape[1] == N + state.num_prefix:  # pool_include_prefix=False
        size = size[:, state.num_prefix:]
    if tuple(size.shape[:2]) != (B, N):
        raise ValueError(f"pooling {(B, N)} tokens with the sizes of the latest forward "
                         f"({tuple(state.size.shape[:2])}): on a compressed model call forward_head right after the "
                         "forward_features that produced its input")
    bias = size.log().to(x.dtype).transpose(1, 2).unsqueeze(1) if state.merged else None  # [B, 1, 1, N]
    return type(pool).forward(pool, x, attn_mask=bias)
