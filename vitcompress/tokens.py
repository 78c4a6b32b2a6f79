"""Token state and the one apply path every method's plan goes through.

A method never edits tensors itself: it returns a :class:`Plan` (which reducible tokens to keep,
which to merge into which) and :func:`apply_plan` executes it. Merging is a size-weighted average
computed as gather + ``scatter_add`` (sum) then divide, so it exports to ONNX/TensorRT; there is no
``scatter_reduce("mean")`` anywhere.
"""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Plan:
    """What one reducing layer does to the reducible (non-special) tokens.

    ``keep[B, Nk]`` indexes the reducible tokens that survive, in output order.
    ``merge_src[B, Nm]`` indexes reducible tokens folded into survivors and ``merge_dst[B, Nm]``
    gives, for each, the position in ``keep`` it folds into. Tokens in neither are pruned.
    """

    keep: torch.Tensor
    merge_src: Optional[torch.Tensor] = None
    merge_dst: Optional[torch.Tensor] = None

    @property
    def merges(self) -> bool:
        return self.merge_src is not None and self.merge_src.shape[1] > 0


@dataclass
class TokenState:
    """Bookkeeping that travels with the hidden states through the blocks of one forward.

    ``size[B, N, 1]``: how many original patches each token stands for (float32).
    ``source[B, N, N0]``: which original tokens each token covers (only when tracing sources).
    ``merged``: whether any merge happened yet (sizes differ from 1, proportional attention on).
    """

    num_prefix: int
    size: torch.Tensor
    source: Optional[torch.Tensor] = None
    merged: bool = False

    @classmethod
    def start(cls, x: torch.Tensor, num_prefix: int, trace_source: bool = False) -> "TokenState":
        B, N, _ = x.shape
        size = torch.ones(B, N, 1, device=x.device, dtype=torch.float32)
        source = None
        if trace_source:
            source = torch.eye(N, device=x.device, dtype=torch.float32).expand(B, N, N).contiguous()
        return cls(num_prefix=num_prefix, size=size, source=source)

    def attn_bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``log(size)`` as an additive SDPA mask ``[B, 1, 1, N]`` (proportional attention)."""
        if not self.merged:
            return None
        return self.size.log().to(dtype).transpose(1, 2).unsqueeze(1)


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx[B, K]`` of ``t[B, N, C]`` -> ``[B, K, C]``."""
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def _merge_sum(t: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Gather the kept rows of ``t`` and add the merged rows into their destinations."""
    kept = gather_tokens(t, plan.keep)
    if plan.merges:
        moved = gather_tokens(t, plan.merge_src)
        dst = plan.merge_dst.unsqueeze(-1).expand(-1, -1, t.shape[-1])
        kept = kept.scatter_add(1, dst, moved)
    return kept


def apply_plan(x: torch.Tensor, state: TokenState, plan: Plan) -> torch.Tensor:
    """Execute ``plan`` on ``x[B, N, C]`` and update ``state`` in place; returns the new tokens.

    Special (prefix) tokens pass through untouched at the front.
    """
    p = state.num_prefix
    body, size_body = x[:, p:], state.size[:, p:]
    if plan.merges:
        weight = size_body.to(x.dtype)
        new_size = _merge_sum(size_body, plan)
        new_body = _merge_sum(body * weight, plan) / new_size.to(x.dtype)
        state.merged = True
    else:
        new_body = gather_tokens(body, plan.keep)
        new_size = gather_tokens(size_body, plan.keep)
    state.size = torch.cat([state.size[:, :p], new_size], dim=1)
    if state.source is not None:
        src = state.source
        state.source = torch.cat([src[:, :p], _merge_sum(src[:, p:], plan)], dim=1)
    return torch.cat([x[:, :p], new_body], dim=1)
