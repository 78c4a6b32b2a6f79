"""PiToMe: spectrum-preserving token merging by energy score (Tran et al., NeurIPS 2024).

Tokens in dense, mutually similar regions have high energy and are safe to merge; low-energy
tokens (isolated, informative) are protected. In the first half of the layers the reference code
runs ToMe's bipartite matching over the energy-sorted order; that is the default here too.
"""
import math

import torch

from ..interfaces import Plan, Signals, ViTMethod
from ..kernels import dispatch
from .tome import bipartite_soft_matching


def margin_at(layer: int, num_layers: int, margin0: float) -> float:
    """The margin schedule ``m_l = m0 * (1 - l / L)``: strict early, lenient late."""
    return margin0 * (1.0 - layer / num_layers)


def energy_scores(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """``E_i = mean_j ELU(cos(k_i, k_j) - margin, alpha)`` for ``metric[B, T, d]``."""
    return dispatch.energy_score(metric, margin, alpha)


def pitome_merge(metric: torch.Tensor, r: int, margin: float, alpha: float = 1.0,
                 bipartite_order: bool = False) -> Plan:
    """One PiToMe layer: merge ``r`` tokens of ``metric[B, T, d]``.

    The ``2r`` highest-energy tokens are mergeable and split alternately into A and B; every A
    token merges into its most similar B token. Low-energy tokens are kept as they are.
    With ``bipartite_order`` ToMe's matching runs over all tokens in energy order instead.
    """
    if r == 0:
        return bipartite_soft_matching(metric, 0)
    energy = energy_scores(metric, margin, alpha)
    order = dispatch.topk_indices(energy, energy.shape[1])
    if bipartite_order:
        return bipartite_soft_matching(metric, r, order=order)
    mergeable, protected = order[:, : 2 * r], order[:, 2 * r:]
    a_idx, b_idx = mergeable[:, 0::2], mergeable[:, 1::2]
    _, match = dispatch.bipartite_match(metric, metric, a_idx, b_idx)
    keep = torch.cat([protected, b_idx], dim=1)
    return Plan(keep=keep, merge_src=a_idx, merge_dst=protected.shape[1] + match)


def in_first_half(layer: int, num_layers: int) -> bool:
    """Whether block ``layer`` is in the first half, where PiToMe's reference code matches like
    ToMe: ``ceil(L / 2)`` blocks, so the middle block of an odd depth counts as first half."""
    return layer < math.ceil(num_layers / 2)


class PiToMe(ViTMethod):
    name = "pitome"
    kind = "merge"
    defaults = {"margin": 0.75, "alpha": 1.0, "bipartite_first_half": True}
    family_defaults = {"clip": {"margin": 0.9}}  # the paper's setting for CLIP towers
    option_help = {
        "margin": "energy margin m0 of the first block (m_l = m0 (1 - l/L)); 0.75 for ViT/DeiT, 0.9 for CLIP",
        "alpha": "ELU alpha of the energy score",
        "bipartite_first_half": "ToMe matching over the energy order in the first half of the blocks, "
                                "as the reference code does",
    }

    def remove_for_keep(self, tokens, num_prefix, keep) -> int:
        """The official count: ``floor(T - T * keep)`` of the ``T`` reducible tokens entering the
        block (their ``ratio`` is our ``keep``; the official ``pitome_vision`` drops the class token
        before counting, and so do we with every special token)."""
        return math.floor(tokens - tokens * keep)

    def validate(self, options) -> None:
        if not 0.0 <= options["margin"] <= 1.0:
            raise ValueError(f"pitome margin={options['margin']} must lie in [0, 1] (0.75 for ViT/DeiT, 0.9 for CLIP)")
        if options["alpha"] <= 0:
            raise ValueError(f"pitome alpha={options['alpha']} must be positive (default 1.0)")

    def overhead_flops(self, tokens, num_prefix, remove, num_heads, head_dim, layer, num_layers, options):
        t = tokens - num_prefix
        energy = t * t * head_dim  # the full T x T similarity behind the energies
        if options["bipartite_first_half"] and in_first_half(layer, num_layers):
            return energy + ((t + 1) // 2) * (t // 2) * head_dim
        return energy + remove * remove * head_dim

    def plan(self, signals: Signals, remove: int, options) -> Plan:
        margin = margin_at(signals.layer, signals.num_layers, options["margin"])
        first_half = in_first_half(signals.layer, signals.num_layers)
        return pitome_merge(signals.metric, remove, margin, options["alpha"],
                            bipartite_order=options["bipartite_first_half"] and first_half)
