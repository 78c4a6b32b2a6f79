"""The one reducing block: attention (fused SDPA + log-size bias) -> method -> MLP.

Adapters describe where a family keeps norm, q/k/v, projection, residual scaling and MLP
(:class:`BlockParts`); this module owns the forward. Attention probabilities are materialised only
in layers whose method asks for them; every other layer stays on ``F.scaled_dot_product_attention``.
"""
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from .methods.base import Signals
from .tokens import apply_plan

Tensor = torch.Tensor


@dataclass
class BlockParts:
    """A pre-norm transformer block, seen as the pieces the reducing forward needs.

    ``qkv(h)`` returns q, k, v as ``[B, H, N, d]`` (q/k norms applied); ``attn_out(o, h)`` maps the
    attention output ``[B, N, H*d]`` to the residual branch (output norm, gate, projection);
    ``residual1`` / ``residual2`` apply layer scale and drop-path to each branch.
    """

    norm1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]]
    attn_out: Callable[[Tensor, Tensor], Tensor]
    residual1: Callable[[Tensor], Tensor]
    norm2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    residual2: Callable[[Tensor], Tensor]
    scale: float
    attn_dropout: Callable[[], float]
    training: Callable[[], bool]


def attention(q: Tensor, k: Tensor, v: Tensor, bias, scale: float, dropout: float, need_probs: bool):
    """Multi-head attention; returns ``(output [B, H, N, d], probabilities or None)``."""
    if not need_probs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale), None
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    return F.dropout(probs, p=dropout) @ v, probs


def reducing_forward(parts: BlockParts, runtime, layer: int, x: Tensor) -> Tensor:
    """Forward of block ``layer`` under ``runtime`` (the model's :class:`~vitcompress.api.Compression`)."""
    if layer == 0:
        runtime.begin(x)
    state, schedule = runtime.state, runtime.schedule
    runtime.tokens_seen.append(int(x.shape[1]))
    remove = schedule.remove[layer]
    p = state.num_prefix

    h = parts.norm1(x)
    q, k, v = parts.qkv(h)
    bias = state.attn_bias(q.dtype) if runtime.prop_attn else None
    dropout = parts.attn_dropout() if parts.training() else 0.0
    need_probs = remove > 0 and runtime.method.needs_attention(layer, schedule.depth, runtime.options)
    o, probs = attention(q, k, v, bias, parts.scale, dropout, need_probs)
    B, H, N, d = o.shape
    x = x + parts.residual1(parts.attn_out(o.transpose(1, 2).reshape(B, N, H * d), h))

    if remove > 0:
        with torch.no_grad():
            signals = Signals(metric=k.mean(dim=1)[:, p:], x=x[:, p:], attn=probs, num_prefix=p,
                              layer=layer, num_layers=schedule.depth)
            plan = runtime.method.plan(signals, remove, runtime.options)
        x = apply_plan(x, state, plan)

    return x + parts.residual2(parts.mlp(parts.norm2(x)))
