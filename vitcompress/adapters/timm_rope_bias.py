"""timm ViTs whose attention depends on token positions: ``Eva`` (EVA, EVA-02: rotary position
embeddings) and ``Beit`` (BEiT, BEiT v2: relative position bias, per block or shared).

Positions of reduced tokens: every forward tracks, per token, the index in the first block's sequence
whose position it takes (``TokenState.position``, gathered by the apply path along with the tokens).
A kept token keeps its own position; a merged token takes its destination's (the token it was folded
into keeps its place, the sources' positions are dropped). Each block then applies

* EVA: the rotary embedding rows of those positions (gathered from the ``rope`` tensor the model
  passes to the block) to q and k of the patch tokens; the special tokens get no rotary embedding,
  as in timm's ``EvaAttention``. The ToMe metric (keys averaged over heads) is read after the
  rotation, as the attention sees the keys.
* BEiT: the rows and columns of the relative position bias (the block's own plus the shared one)
  at those positions; the class token's row and column follow it at index 0.

Until a block removes tokens nothing is gathered: ``keep=1.0`` uses timm's rotary embeddings and
bias as they are.

Pooling of a compressed model: the class token as before; average pooling (EVA ``avg`` /
``avgmax``, BEiT ``avg``) weighted by how many patches each token stands for; EVA's MAP pool with
``log(size)`` added to its logits, as for timm's ``VisionTransformer``. Refused, naming the
problem: EVA's post-norm blocks (``use_post_norm``) and its ``AttentionRope`` blocks (grouped-query
attention).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.blocks import BlockParts, reducing_forward
from ..engine.schedule import ViTCost
from ..interfaces import part_of
from .common import (TimmAdapter, attn_pool_cost, latest_sizes, patch_blocks, patch_flops, patch_part, per_token_flops,
                     refuse_attn_mask, size_aware_attn_pool_forward, size_weighted_pool, weighted_pool)


# --------------------------------------------------------------------------- positions of the current tokens


def rope_of_tokens(rope: torch.Tensor, position: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The rows of ``rope[..., N0, D]`` (the rotary embeddings of the first block's patch tokens; 2-4
    dims, tokens second to last) at the patch positions of ``position[B, p + N]`` -> ``[B, 1|H, N, D]``;
    ``rope`` itself while no token was removed."""
    index = position[:, num_prefix:] - num_prefix
    B, N = index.shape
    if N == rope.shape[-2]:
        return rope
    rope = rope.reshape((1,) * (4 - rope.dim()) + tuple(rope.shape))
    heads, D = rope.shape[1], rope.shape[-1]
    rope = rope.expand(B, heads, rope.shape[2], D)
    return rope.gather(2, index[:, None, :, None].expand(B, heads, N, D))


def bias_of_tokens(bias: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Rows and columns of an attention bias ``[(1,) H, N0, N0]`` over the first block's tokens at the
    positions ``position[B, N]`` -> ``[B, H, N, N]``; ``bias`` itself while no token was removed."""
    N0 = bias.shape[-1]
    if position.shape[1] == N0:
        return bias
    bias = bias.reshape(-1, N0, N0)
    return bias[:, position[:, :, None], position[:, None, :]].transpose(0, 1)


def _fused_qkv(attn, h: torch.Tensor):
    """q, k, v ``[B, H, N, d]`` of timm's EVA / BEiT attention (one projection, a zero k bias)."""
    B, N, _ = h.shape
    if attn.q_bias is None:
        qkv = attn.qkv(h)
    else:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(h) + bias if attn.qkv_bias_separate else F.linear(h, attn.qkv.weight, bias)
    return qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _scaled(gamma: Optional[torch.Tensor], drop_path: nn.Module):
    """A residual branch's layer scale (EVA and BEiT keep it as ``gamma_1`` / ``gamma_2``, or None)
    then drop-path."""
    return (lambda y: drop_path(y)) if gamma is None else (lambda y: drop_path(gamma * y))


def _common_parts(block, qkv, attn_out, position_bias=None) -> BlockParts:
    attn = block.attn
    return BlockParts(
        norm1=block.norm1, qkv=qkv, attn_out=attn_out,
        residual1=_scaled(block.gamma_1, block.drop_path1),
        norm2=block.norm2, mlp=block.mlp,
        residual2=_scaled(block.gamma_2, block.drop_path2),
        scale=attn.scale, attn_dropout=lambda: attn.attn_drop.p, training=lambda: block.training,
        position_bias=position_bias,
    )


# --------------------------------------------------------------------------- EVA / EVA-02


def _eva_parts(block, rope: Optional[torch.Tensor]) -> BlockParts:
    attn = block.attn
    from timm.layers import apply_rot_embed_cat
    p = attn.num_prefix_tokens
    half = getattr(attn, "rotate_half", False)

    def qkv(h):
        if attn.qkv is not None:
            q, k, v = _fused_qkv(attn, h)
        else:
            B, N, _ = h.shape
            q, k, v = (proj(h).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is None:
            return q, k, v
        r = rope_of_tokens(rope, part_of(block).runtime.current().tokens.position, p)
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], r, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], r, half=half)], dim=2).type_as(v)
        return q, k, v

    def attn_out(o, h):
        o = attn.norm(o)
        if attn.gate is not None:
            o = o * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(o))

    return _common_parts(block, qkv, attn_out)


def _eva_block_forward(block, x, rope=None, attn_mask=None, is_causal=False):
    refuse_attn_mask(attn_mask, is_causal)
    part = part_of(block)
    return reducing_forward(_eva_parts(block, rope), part.runtime, part.layer, x)


class TimmEvaAdapter(TimmAdapter):
    family = "timm.Eva"
    description = ("timm Eva models (eva02_*, eva_*: rotary position embeddings, SwiGLU, registers; token, avg "
                   "and MAP pooling)")
    track_position = True
    model_class = "timm.models.eva.Eva"
    supported_blocks = ("vitcompress supports timm's pre-norm EvaBlock with EvaAttention (post-norm blocks, "
                        "use_post_norm=True, and attn_type='rope' / num_kv_heads are not supported)")

    @staticmethod
    def block_types():
        from timm.models.eva import EvaAttention, EvaBlock
        return EvaBlock, EvaAttention

    def __init__(self, model):
        super().__init__(model)
        for i, block in enumerate(model.blocks):
            if block.attn.num_prefix_tokens != model.num_prefix_tokens:
                raise ValueError(f"block {i} leaves {block.attn.num_prefix_tokens} tokens without rotary embedding, "
                                 f"the model has {model.num_prefix_tokens} special tokens")
        pool = model.attn_pool
        if pool is not None and getattr(pool, "pos_embed", None) is not None:
            raise ValueError("a MAP pool with its own position embedding is not supported: it needs every patch "
                             "token in place")

    def patch(self, runtime, patcher) -> None:
        m = self.model
        patch_blocks(patcher, m.blocks, runtime, _eva_block_forward)
        if not runtime.unmerge:  # under unmerge the pools see every patch again
            if m.attn_pool is not None:
                patch_part(patcher, m.attn_pool, runtime, "forward", size_aware_attn_pool_forward)
            patch_part(patcher, m, runtime, "pool", size_weighted_pool)
        self.patch_model_methods(runtime, patcher)

    def cost(self) -> ViTCost:
        m = self.model
        block, attn = m.blocks[0], m.blocks[0].attn
        heads = attn.num_heads
        per_patch = patch_flops(m.patch_embed.proj) + per_token_flops(m.patch_embed.norm) + per_token_flops(m.norm_pre)
        fixed = self.num_prefix * per_token_flops(m.norm_pre) + per_token_flops(m.fc_norm) + per_token_flops(m.head)
        final = per_token_flops(m.norm)
        if m.attn_pool is not None:  # Eva's pool reads every token, the special ones included
            per_token, once = attn_pool_cost(m.attn_pool)
            final += per_token
            fixed += once
        attn_in = per_token_flops(block.norm1) + per_token_flops(attn.gate)
        attn_in += sum(per_token_flops(getattr(attn, name)) for name in ("qkv", "q_proj", "k_proj", "v_proj"))
        attn_in += heads * (per_token_flops(attn.q_norm) + per_token_flops(attn.k_norm))
        return ViTCost(
            depth=self.depth, dim=m.embed_dim, num_heads=heads, head_dim=attn.head_dim, per_patch=per_patch,
            per_token_attn_in=attn_in,
            per_token_attn_out=per_token_flops(attn.norm) + per_token_flops(attn.proj),
            per_token_mlp=per_token_flops(block.norm2) + per_token_flops(block.mlp),
            per_token_final=final, fixed=fixed,
        )


# --------------------------------------------------------------------------- BEiT


def _beit_parts(block, shared_bias: Optional[torch.Tensor]) -> BlockParts:
    attn = block.attn
    position_bias = None
    if attn.relative_position_bias_table is not None or shared_bias is not None:
        def position_bias(state):
            bias = shared_bias
            if attn.relative_position_bias_table is not None:
                own = attn._get_rel_pos_bias()
                bias = own if bias is None else own + bias
            if not torch.is_grad_enabled():
                # no gradient flows anyway; and torch.onnx, which decomposes a program captured under
                # no_grad with gradients on, writes SDPA wrongly when its mask requires grad
                bias = bias.detach()
            return bias_of_tokens(bias, state.position)

    return _common_parts(block, lambda h: _fused_qkv(attn, h), lambda o, h: attn.proj_drop(attn.proj(o)),
                         position_bias)


def _beit_block_forward(block, x, shared_rel_pos_bias=None):
    part = part_of(block)
    return reducing_forward(_beit_parts(block, shared_rel_pos_bias), part.runtime, part.layer, x)


def _beit_forward_head(model, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """timm's ``Beit.forward_head`` over reduced tokens: the average pool weighted by size."""
    if model.global_pool == "avg":
        x = weighted_pool(x[:, 1:], latest_sizes(model, x)[:, 1:], "avg")
    elif model.global_pool:
        x = x[:, 0]
    x = model.head_drop(model.fc_norm(x))
    return x if pre_logits else model.head(x)


class TimmBeitAdapter(TimmAdapter):
    family = "timm.Beit"
    description = ("timm Beit models (beit_*, beitv2_*: relative position bias per block or shared; token and avg "
                   "pooling)")
    track_position = True
    model_class = "timm.models.beit.Beit"
    supported_blocks = "vitcompress supports timm's beit Block with its Attention"

    @staticmethod
    def block_types():
        from timm.models.beit import Attention, Block
        return Block, Attention

    def patch(self, runtime, patcher) -> None:
        m = self.model
        patch_blocks(patcher, m.blocks, runtime, _beit_block_forward)
        if not runtime.unmerge:  # under unmerge the head sees every patch again
            patch_part(patcher, m, runtime, "forward_head", _beit_forward_head)
        self.patch_model_methods(runtime, patcher)

    def cost(self) -> ViTCost:
        m = self.model
        block, attn = m.blocks[0], m.blocks[0].attn
        return ViTCost(
            depth=self.depth, dim=m.embed_dim, num_heads=attn.num_heads,
            head_dim=attn.qkv.out_features // 3 // attn.num_heads,
            per_patch=patch_flops(m.patch_embed.proj) + per_token_flops(m.patch_embed.norm),
            per_token_attn_in=per_token_flops(block.norm1) + per_token_flops(attn.qkv),
            per_token_attn_out=per_token_flops(attn.proj),
            per_token_mlp=per_token_flops(block.norm2) + per_token_flops(block.mlp),
            per_token_final=per_token_flops(m.norm), fixed=per_token_flops(m.fc_norm) + per_token_flops(m.head),
        )
