"""ToMe bipartite soft matching (Bolya et al., ICLR 2023), the baseline every merger compares to.

As the official code does it: the whole sequence, special tokens included, alternates into set A
(even positions) and set B (odd positions); the class token is A[0] and never a source, a
distillation token B[0] and never a destination. The ``r`` A tokens whose best B match is most
similar merge into it; the rest of A stays **in index order** (which decides the next block's
alternation) followed by all of B. Special tokens stay in front (the official code keeps the class
and distillation tokens first too).

Rules where the official code has none: register tokens take their places in the alternation like
the class token and are never merged (a register in A is never a source, one in B never a
destination); a model without a class token keeps its unmerged A tokens in score order, as the
official code does when ``class_token=False``.
"""
from typing import Optional

import torch

from ..interfaces import Plan, Signals, ViTMethod
from ..kernels import dispatch


def bipartite_soft_matching(metric: torch.Tensor, r: int, order: Optional[torch.Tensor] = None) -> Plan:
    """Merge the ``r`` best-matched tokens of set A into set B.

    ``metric[B, T, d]``; ``order[B, T]`` is the token order to alternate over (A = even positions,
    B = odd positions), the identity by default. Each A token's match is its most cosine-similar
    B token; the ``r`` A tokens with the highest match scores merge, the rest of A and all of B stay.
    """
    Bsz, T, _ = metric.shape
    if r == 0:
        return Plan(keep=torch.arange(T, device=metric.device).expand(Bsz, T))
    if order is None:
        order = torch.arange(T, device=metric.device).expand(Bsz, T)
    a_idx, b_idx = order[:, 0::2], order[:, 1::2]
    score, match = dispatch.bipartite_match(metric, metric, a_idx, b_idx)
    keep, merge_src, merge_dst = dispatch.rank_plan(score, match, r, a_idx, b_idx)  # best matches first
    return Plan(keep=keep, merge_src=merge_src, merge_dst=merge_dst)


def tome_matching(metric: torch.Tensor, r: int, num_prefix: int, class_token: bool) -> Plan:
    """One ToMe block on the reducible tokens ``metric[B, T, d]`` that follow ``num_prefix``
    special tokens: A/B alternate over the whole sequence (reducible token ``i`` sits at position
    ``num_prefix + i``), the special tokens take part in neither set's matching, and with a
    ``class_token`` the unmerged A tokens keep their index order."""
    Bsz, T, _ = metric.shape
    tokens = torch.arange(T, device=metric.device).expand(Bsz, T)
    if r == 0:
        return Plan(keep=tokens)
    first_a = num_prefix % 2  # the first reducible token is in A when the prefix is even
    a_idx, b_idx = tokens[:, first_a::2], tokens[:, 1 - first_a::2]
    # the two sets are strided views of the metric: no gathered copies
    score, match = dispatch.bipartite_match(metric[:, first_a::2], metric[:, 1 - first_a::2])
    keep, merge_src, merge_dst = dispatch.rank_plan(score, match, r, a_idx, b_idx, sort_unmerged=class_token)
    return Plan(keep=keep, merge_src=merge_src, merge_dst=merge_dst)


class ToMe(ViTMethod):
    name = "tome"
    kind = "merge"
    defaults = {"clamp": False}
    option_help = {"clamp": "remove at most what each block can (ToMe's silent per-block clamp) instead of "
                            "refusing an r too large for the model"}

    def validate(self, options) -> None:
        if not isinstance(options["clamp"], bool):
            raise TypeError(f"tome clamp={options['clamp']!r} must be True or False (default False)")

    def clamps(self, options) -> bool:
        return options["clamp"]

    def overhead_flops(self, tokens, num_prefix, remove, num_heads, head_dim, layer, num_layers, options):
        t = tokens - num_prefix
        return ((t + 1) // 2) * (t // 2) * head_dim

    def plan(self, signals: Signals, remove: int, options) -> Plan:
        return tome_matching(signals.metric, remove, signals.num_prefix,
                             class_token=signals.cls_first and signals.num_prefix > 0)
