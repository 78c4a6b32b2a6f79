"""Plain-torch references for the similarity and top-k primitives the methods use.

Each function here is the specification: a fused kernel with the same signature must agree with it.
"""
from typing import Tuple

import torch
import torch.nn.functional as F


def bipartite_match(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise max and argmax of cosine similarity between ``a[B, Na, C]`` and ``b[B, Nb, C]``.

    Returns ``score[B, Na]`` (float32) and ``index[B, Na]`` (the lowest index among ties).
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    score, index = (a @ b.transpose(-1, -2)).max(dim=-1)
    return score, index


def energy_score(x: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """PiToMe's energy ``e_i = mean_j ELU(cos(x_i, x_j) - margin, alpha)`` for ``x[B, N, C]``."""
    v = F.normalize(x.float(), dim=-1)
    sim = v @ v.transpose(-1, -2)
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row of ``scores[B, N]``, highest first;
    ties go to the lower index."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return order[:, :k]
