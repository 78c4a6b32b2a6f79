"""Token state and the one apply path every method's plan goes through.

A method never edits tensors itself: it returns a :class:`Plan` (which reducible tokens to keep,
which to merge into which) and :func:`apply_plan` executes it. Merging is a size-weighted average
computed as gather + ``scatter_add`` (sum) then divide, so it exports to ONNX/TensorRT; there is no
``scatter_reduce("mean")`` anywhere.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .interfaces import Plan


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


def _with_prefix(idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Indices into the reducible tokens -> indices into the whole sequence, prefix first."""
    if num_prefix == 0:
        return idx
    prefix = torch.arange(num_prefix, device=idx.device, dtype=idx.dtype).expand(idx.shape[0], num_prefix)
    return torch.cat([prefix, idx + num_prefix], dim=1)


def _merge_sum(t: torch.Tensor, keep: torch.Tensor, src: Optional[torch.Tensor],
               dst: Optional[torch.Tensor]) -> torch.Tensor:
    """Gather rows ``keep`` of ``t`` and add rows ``src`` into output positions ``dst``."""
    kept = gather_tokens(t, keep)
    if src is not None:
        kept.scatter_add_(1, dst.unsqueeze(-1).expand(-1, -1, t.shape[-1]), gather_tokens(t, src))
    return kept


def apply_plan(x: torch.Tensor, state: TokenState, plan: Plan) -> torch.Tensor:
    """Execute ``plan`` on ``x[B, N, C]`` and update ``state`` in place; returns the new tokens.

    Special (prefix) tokens pass through unchanged at the front. Every tensor is gathered once over
    the whole sequence (prefix included), so a block adds as few passes over the tokens as it can.
    """
    p = state.num_prefix
    keep = _with_prefix(plan.keep, p)
    src = dst = None
    if plan.merges:
        src, dst = plan.merge_src + p, plan.merge_dst + p
        weighted = x * state.size.to(x.dtype)
        state.size = _merge_sum(state.size, keep, src, dst)
        new_x = _merge_sum(weighted, keep, src, dst).div_(state.size.to(x.dtype))
        state.merged = True
    else:
        new_x = gather_tokens(x, keep)
        state.size = gather_tokens(state.size, keep)
    if state.source is not None:
        state.source = _merge_sum(state.source, keep, src, dst)
    return new_x
