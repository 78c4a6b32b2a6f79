"""Plain-torch references for the similarity, top-k and PageRank primitives the methods use.

Each function here is the specification: a fused kernel with the same signature must agree with it.
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vitcompress.chunking import chunk_count


def _float32(t: torch.Tensor):
    """Switches autocast off around the products below, which would otherwise run in half
    precision: the scores are float32, as the kernels compute them."""
    device = t.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = torch.is_autocast_enabled() if device == "cuda" else torch.is_autocast_cpu_enabled()
    return torch.autocast(device, enabled=False) if enabled else contextlib.nullcontext()


def bipartite_match(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise max and argmax of cosine similarity between ``a[B, Na, C]`` and ``b[B, Nb, C]``.

    Returns ``score[B, Na]`` (float32) and ``index[B, Na]`` (the lowest index among ties).
    """
    with _float32(a):
        a = F.normalize(a.float(), dim=-1)
        b = F.normalize(b.float(), dim=-1)
        score, index = (a @ b.transpose(-1, -2)).max(dim=-1)
    return score, index


def energy_score(x: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """PiToMe's energy ``e_i = mean_j ELU(cos(x_i, x_j) - margin, alpha)`` for ``x[B, N, C]``."""
    with _float32(x):
        v = F.normalize(x.float(), dim=-1)
        sim = v @ v.transpose(-1, -2)
        return F.elu(sim - margin, alpha=alpha).mean(dim=-1)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row of ``scores[B, N]``, highest first;
    ties go to the lower index."""
    if k < 0:
        raise ValueError(f"topk_indices: k={k} must be >= 0")
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return order[:, :k]


def pagerank_steps(attn: torch.Tensor, init: torch.Tensor, iters: int,
                   alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``iters`` weighted-PageRank steps ``s <- A^T s`` for each of ``R`` graphs ``attn[R, N, N]``
    (rows sum to 1) from ``init[R, N]``; returns float32 ``[R, N]``.

    With ``alive[R, N]`` (0/1) the graph is restricted to the alive tokens: each row is
    renormalised over the alive columns and the other tokens neither vote nor receive, i.e.
    ``s <- ((s * alive / (A @ alive)) A) * alive``.
    """
    a = attn.float()
    R, N, _ = a.shape
    s = init.float().reshape(R, 1, N)
    m = None if alive is None else alive.float().reshape(R, 1, N)
    # Each step is a matrix-vector product per graph, bound by reading A: iterate a cache-sized
    # group of graphs at a time (vitcompress.chunking).
    chunk = chunk_count(a, R, N * N * 4)
    out = []
    with _float32(a):
        for i in ((0,) if chunk == R else range(0, R, chunk)):  # no range over a symbolic batch
            a_i, s_i = a[i:i + chunk], s[i:i + chunk]
            if m is None:
                for _ in range(iters):
                    s_i = torch.bmm(s_i, a_i)  # (A^T s)^T = s^T A
            else:
                m_i = m[i:i + chunk]
                mass = torch.bmm(a_i, m_i.transpose(1, 2)).transpose(1, 2)  # each row's attention to alive tokens
                scale = m_i / mass.clamp_min(1e-12)  # renormalises the rows; 0 for the other tokens
                for _ in range(iters):
                    s_i = torch.bmm(s_i * scale, a_i) * m_i
            out.append(s_i)
    return (out[0] if len(out) == 1 else torch.cat(out)).reshape(R, N)
