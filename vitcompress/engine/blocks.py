"""The one reducing block: attention (fused SDPA + log-size bias) -> method -> MLP.

Adapters describe where a family keeps norm, q/k/v, projection, residual scaling and MLP
(:class:`BlockParts`); this module owns the forward. Attention probabilities are materialised only
in layers whose method asks for them; every other layer stays on ``F.scaled_dot_product_attention``.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F

from ..interfaces import Signals
from .attention import softmax_attention
from .schedule import Schedule
from .tokens import TokenState, apply_plan, gather_tokens, unmerge

Tensor = torch.Tensor


@dataclass
class ForwardState:
    """The state of one forward of a compressed ViT-like model: the tokens' bookkeeping, the
    schedule for this input's size and the tokens that entered each block."""

    tokens: TokenState
    schedule: Schedule
    tokens_seen: List[int] = field(default_factory=list)
    # under unmerge: the blocks whose output goes back on the full grid (the last, and the
    # intermediates a caller reads)
    unmerge_after: FrozenSet[int] = frozenset()


class BlockRuntime(Protocol):
    """What the reducing blocks read of the model's runtime (:class:`vitcompress.runtimes.vit.ViTRuntime`)."""

    method: Any
    options: Dict[str, Any]
    adapter: Any
    prop_attn: bool

    def begin(self, x: Tensor) -> ForwardState: ...

    def current(self) -> ForwardState: ...


@dataclass
class BlockParts:
    """A pre-norm transformer block, seen as the pieces the reducing forward needs.

    ``qkv(h)`` returns q, k, v as ``[B, H, N, d]`` (q/k norms applied); ``attn_out(o, h)`` maps the
    attention output ``[B, N, H*d]`` to the residual branch (output norm, gate, projection);
    ``residual1`` / ``residual2`` apply layer scale and drop-path to each branch. ``position_bias``,
    when a family has one (BEiT's relative position bias), maps the forward's :class:`TokenState` to
    the additive attention bias of the current tokens, broadcastable to ``[B, H, N, N]``.
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
    position_bias: Optional[Callable[[TokenState], Tensor]] = None


def attention(q: Tensor, k: Tensor, v: Tensor, bias, scale: float, dropout: float, need_probs: bool):
    """Multi-head attention; returns ``(output [B, H, N, d], probabilities or None)``."""
    if not need_probs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale), None
    return softmax_attention(q, k, v, scale=scale, bias=bias, dropout=dropout)


def reducing_forward(parts: BlockParts, runtime: BlockRuntime, layer: int, x: Tensor) -> Tensor:
    """Forward of block ``layer`` under ``runtime``: block 0 starts this forward's state (kept
    per thread by the runtime), the others continue it. Under unmerge, a block in the forward's
    ``unmerge_after`` hands on its output on the full grid, and the next block takes its tokens back
    from it (each token from a patch it carries: exact)."""
    forward = runtime.begin(x) if layer == 0 else runtime.current()
    if len(forward.tokens_seen) != layer:
        raise RuntimeError(f"block {len(forward.tokens_seen)} of this compressed model did not run under vitcompress "
                           "(replaced or re-created after compress?): call vitcompress.compress(model, ...) again "
                           "after changing the model's blocks")
    state = forward.tokens
    if state.expanded:
        x = gather_tokens(x, state.position)
        state.expanded = False
    forward.tokens_seen.append(int(x.shape[1]))
    x = _attend_and_reduce(parts, runtime, forward, layer, x)
    x = x + parts.residual2(parts.mlp(parts.norm2(x)))
    if layer in forward.unmerge_after and state.reduced:
        state.expanded = True
        return unmerge(x, state)
    return x


def _attend_and_reduce(parts: BlockParts, runtime: BlockRuntime, forward: ForwardState, layer: int, x: Tensor) -> Tensor:
    """The attention residual, then the block's reduction. A function of its own so that q, k, v
    and the attention probabilities are freed before the MLP runs, as in an unpatched block."""
    state, schedule = forward.tokens, forward.schedule
    remove = schedule.remove[layer]
    p = state.num_prefix

    h = parts.norm1(x)
    q, k, v = parts.qkv(h)
    bias = state.attn_bias(q.dtype) if runtime.prop_attn else None
    if parts.position_bias is not None:
        extra = parts.position_bias(state).to(q.dtype)
        bias = extra if bias is None else bias + extra
    dropout = parts.attn_dropout() if parts.training() else 0.0
    need_probs = remove > 0 and runtime.method.needs_attention(layer, schedule.depth, runtime.options)
    o, probs = attention(q, k, v, bias, parts.scale, dropout, need_probs)
    B, H, N, d = o.shape
    x = x + parts.residual1(parts.attn_out(o.transpose(1, 2).reshape(B, N, H * d), h))
    if remove == 0:
        return x
    with torch.no_grad():
        signals = Signals(metric=k.mean(dim=1)[:, p:], x=x[:, p:], attn=probs, num_prefix=p,
                          layer=layer, num_layers=schedule.depth,
                          cls_first=runtime.adapter.cls_first, v=v, size=state.size[:, p:, 0])
        plan = runtime.method.plan(signals, remove, runtime.options)
    return apply_plan(x, state, plan, attn_bias=runtime.prop_attn)
