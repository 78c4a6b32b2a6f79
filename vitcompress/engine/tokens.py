"""Token state and the one apply path every method's plan goes through.

A method never edits tensors itself: it returns a :class:`Plan` (which reducible tokens to keep,
which to merge into which) and :func:`apply_plan` executes it. Merging is a size-weighted average
computed as a sum then a divide (gather + ``scatter_add`` in the torch path, so it exports to
ONNX/TensorRT; a one-pass Triton kernel on a GPU); there is no ``scatter_reduce("mean")`` anywhere.
"""
import functools
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..interfaces import Plan
from ..kernels import dispatch


@dataclass
class TokenState:
    """Bookkeeping that travels with the hidden states through the blocks of one forward.

    ``size[B, N, 1]``: how many original patches each token stands for (float32).
    ``source[B, N, N0]``: which original tokens each token covers (only when tracing sources).
    ``merged``: whether any merge happened yet (sizes differ from 1, proportional attention on).
    ``log_size[B, N, 1]``: ``log(size)`` as the apply path wrote it for the next block's attention
    bias (in the tokens' dtype), or None.
    ``position[B, N]``: for adapters whose attention depends on token positions (rotary embeddings,
    relative position bias), the index in the first block's sequence whose position each token
    takes -- its own, a merged token its destination's -- or None when not asked for. Under unmerge
    it is also a token's representative: a patch it carries.
    ``carrier[B, N0]`` (only under unmerge): for each token of the first block's sequence, the
    current token carrying it (>= 0), or ``-1 - i`` for row ``i`` of ``pruned`` when it was pruned.
    ``pruned``: the rows the blocks pruned, each ``[B, K, C]`` as it was when pruned (under unmerge).
    ``expanded``: the tokens last handed on are on the full grid (:func:`unmerge`), not the reduced set.
    """

    num_prefix: int
    size: torch.Tensor
    source: Optional[torch.Tensor] = None
    merged: bool = False
    log_size: Optional[torch.Tensor] = None
    position: Optional[torch.Tensor] = None
    carrier: Optional[torch.Tensor] = None
    pruned: List[torch.Tensor] = field(default_factory=list)
    expanded: bool = False

    @classmethod
    def start(cls, x: torch.Tensor, num_prefix: int, trace_source: bool = False,
              track_position: bool = False, unmerge: bool = False) -> "TokenState":
        B, N, _ = x.shape
        size = torch.ones(B, N, 1, device=x.device, dtype=torch.float32)
        source = None
        if trace_source:
            source = torch.eye(N, device=x.device, dtype=torch.float32).expand(B, N, N).contiguous()
        position = torch.arange(N, device=x.device).expand(B, N) if track_position or unmerge else None
        carrier = position if unmerge else None
        return cls(num_prefix=num_prefix, size=size, source=source, position=position, carrier=carrier)

    @property
    def reduced(self) -> bool:
        """Whether any token was merged or pruned in this forward (the tokens are not the full grid)."""
        return self.carrier is not None and self.carrier.shape[1] != self.position.shape[1]

    def attn_bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``log(size)`` as an additive SDPA mask ``[B, 1, 1, N]`` (proportional attention)."""
        if not self.merged:
            return None
        log = self.log_size
        if log is None or log.dtype != dtype:
            log = self.size.log().to(dtype)
        return log.transpose(1, 2).unsqueeze(1)


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx[B, K]`` of ``t[B, N, C]`` -> ``[B, K, C]``."""
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def apply_plan(x: torch.Tensor, state: TokenState, plan: Plan, attn_bias: bool = False) -> torch.Tensor:
    """Execute ``plan`` on ``x[B, N, C]`` and update ``state`` in place; returns the new tokens.

    Special (prefix) tokens pass through unchanged at the front. One call of the ``apply_plan``
    primitive (:mod:`vitcompress.kernels`: on a GPU one fused Triton kernel that gathers, merges
    size-weighted, divides and writes the new sizes in one pass over the tokens; elsewhere its torch
    reference, gather + ``scatter_add`` then divide), and one more for the source map when it is
    traced (a plain sum of rows, by the same primitive); tracked positions follow the kept tokens.
    With ``attn_bias`` (proportional attention follows) the same call also writes ``log(size)`` for
    the next block's attention. A plan with ``merge_weight`` (weighted sums instead of the size-weighted
    mean) runs the torch reference of that primitive on every device; one with a ``merge_norm`` (ToFu's
    MLERP) then rescales the merged tokens (:func:`.reference.merged_norms`; a torch op on every device,
    after the fused apply). A plan sets at most one of ``merge_mask``, ``merge_weight``, ``merge_norm``.
    """
    p = state.num_prefix
    merges = plan.merges
    src, dst = (plan.merge_src, plan.merge_dst) if merges else (None, None)
    log = attn_bias and (merges or state.merged)
    size, source = state.size, state.source
    if sum(f is not None for f in (plan.merge_mask, plan.merge_weight, plan.merge_norm)) > 1:
        raise ValueError("a plan sets at most one of merge_mask, merge_weight and merge_norm")
    if merges and plan.merge_mask is not None:  # sources masked off weigh nothing: they are pruned
        size = _zero_rows(size, src + p, plan.merge_mask)
        source = None if source is None else _zero_rows(source, src + p, plan.merge_mask)
    if plan.merge_weight is None:
        new_x, state.size, state.log_size = dispatch.apply_plan(x, size, plan.keep, src, dst, p, log)
    else:
        new_x, state.size, state.log_size = dispatch.apply_weighted_plan(x, size, plan.keep, src, dst,
                                                                         plan.merge_weight, p, log)
    if merges and plan.merge_norm is not None:  # MLERP: the average's direction, the inputs' norm
        new_x = dispatch.merged_norms(x, new_x, plan.keep, src, dst, p, plan.merge_norm)
    if merges:
        state.merged = True
    if source is not None:
        state.source = dispatch.apply_plan(source, None, plan.keep, src, dst, p)[0]
    if state.carrier is not None:
        _follow_carriers(x, state, plan)
    if state.position is not None:  # kept tokens keep their positions, merged sources leave theirs
        state.position = torch.cat([state.position[:, :p], state.position[:, p:].gather(1, plan.keep)], dim=1)
    return new_x


def _zero_rows(t: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t[B, N, C]`` with its rows ``rows[B, M]`` zeroed where ``mask[B, M]`` is False (a copy)."""
    index = rows.unsqueeze(-1).expand(-1, -1, t.shape[-1])
    return t.scatter(1, index, gather_tokens(t, rows) * mask.unsqueeze(-1).to(t.dtype))


def _follow_carriers(x: torch.Tensor, state: TokenState, plan: Plan) -> None:
    """Under unmerge: the tokens this plan prunes are kept as they are now (rows appended to
    ``state.pruned``), and every original token's carrier follows the plan -- a kept token to its
    new place, a merged one to its destination, a pruned one to its stored row."""
    p = state.num_prefix
    B, T = x.shape[0], x.shape[1] - p
    kept = plan.keep.shape[1]
    arange = functools.partial(torch.arange, device=x.device)
    to_new = torch.full((B, T), -1, dtype=torch.long, device=x.device)
    to_new.scatter_(1, plan.keep, (arange(kept) + p).expand(B, kept))
    merged = 0
    if plan.merges:
        merged = plan.merge_src.shape[1]
        to_new.scatter_(1, plan.merge_src, plan.merge_dst + p)
    pruned = T - kept - merged
    if pruned > 0:  # static count; their indices in token order
        rows = (to_new < 0).to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :pruned]
        stored = sum(t.shape[1] for t in state.pruned)
        state.pruned.append(gather_tokens(x[:, p:], rows))
        to_new.scatter_(1, rows, (-1 - stored - arange(pruned)).expand(B, pruned))
    if plan.merges and plan.merge_mask is not None:  # sources masked off are pruned in their image
        stored = sum(t.shape[1] for t in state.pruned)
        state.pruned.append(gather_tokens(x[:, p:], plan.merge_src))
        pruned_at = (-1 - stored - arange(merged)).expand(B, merged)
        to_new.scatter_(1, plan.merge_src, torch.where(plan.merge_mask, plan.merge_dst + p, pruned_at))
    to_new = torch.cat([arange(p).expand(B, p), to_new], dim=1)
    carrier = state.carrier
    state.carrier = torch.where(carrier >= 0, to_new.gather(1, carrier.clamp(min=0)), carrier)


def unmerge(x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """The tokens ``x[B, N, C]`` (this forward's current set) put back on the first block's full
    sequence: every token takes the value of the token that carries it, a pruned one the value it
    had when pruned. One gather (no multiply-add); ``x`` itself when nothing was reduced."""
    if not state.reduced:
        return x
    table = torch.cat([x, *state.pruned], dim=1) if state.pruned else x
    index = torch.where(state.carrier >= 0, state.carrier, x.shape[1] - 1 - state.carrier)
    return gather_tokens(table, index)
