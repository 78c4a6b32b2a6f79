"""ToMe bipartite soft matching (Bolya et al., ICLR 2023), the baseline every merger compares to."""
from typing import Optional

import torch

from vitcompress.kernels import dispatch

from ..interfaces import Plan, Signals, ViTMethod


def bipartite_soft_matching(metric: torch.Tensor, r: int, order: Optional[torch.Tensor] = None) -> Plan:
    """Merge the ``r`` best-matched tokens of set A into set B.

    ``metric[B, T, d]``; ``order[B, T]`` is the token order to alternate over (A = even positions,
    B = odd positions), the identity by default. Each A token's match is its most cosine-similar
    B token; the ``r`` A tokens with the highest match scores merge, the rest of A and all of B stay.
    """
    Bsz, T, d = metric.shape
    if r == 0:
        return Plan(keep=torch.arange(T, device=metric.device).expand(Bsz, T))
    if order is None:
        order = torch.arange(T, device=metric.device).expand(Bsz, T)
    a_idx, b_idx = order[:, 0::2], order[:, 1::2]
    gather = lambda idx: metric.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
    score, match = dispatch.bipartite_match(gather(a_idx), gather(b_idx))
    ranked = dispatch.topk_indices(score, score.shape[1])  # best matches first, ties to the lower index
    src, unmerged = ranked[:, :r], ranked[:, r:]
    keep = torch.cat([a_idx.gather(1, unmerged), b_idx], dim=1)
    merge_src = a_idx.gather(1, src)
    merge_dst = unmerged.shape[1] + match.gather(1, src)
    return Plan(keep=keep, merge_src=merge_src, merge_dst=merge_dst)


class ToMe(ViTMethod):
    name = "tome"
    kind = "merge"
    defaults = {}

    def overhead_flops(self, tokens, num_prefix, remove, num_heads, head_dim, layer, num_layers, options):
        t = tokens - num_prefix
        return ((t + 1) // 2) * (t // 2) * head_dim

    def plan(self, signals: Signals, remove: int, options) -> Plan:
        return bipartite_soft_matching(signals.metric, remove)
