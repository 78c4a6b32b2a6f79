"""Plain-torch references for the primitives the methods and the apply path use: similarity
max/argmax, energy, top-k, ranking a bipartite match into a plan, PageRank (steps, and Zero-TPrune's
whole importance score), and executing a plan.

Each function here is the specification: a fused kernel with the same signature must agree with it.
"""
import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .chunking import chunk_count


def _float32(t: torch.Tensor):
    """Switches autocast off around the products below, which would otherwise run in half
    precision: the scores are float32, as the kernels compute them."""
    device = t.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = torch.is_autocast_enabled() if device == "cuda" else torch.is_autocast_cpu_enabled()
    except RuntimeError:  # a device without autocast (meta: shape-only forwards)
        enabled = False
    return torch.autocast(device, enabled=False) if enabled else contextlib.nullcontext()


def _rows(t: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows ``idx[B, K]`` of ``t[B, N, C]`` (all rows without ``idx``)."""
    return t if idx is None else t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def bipartite_match(a: torch.Tensor, b: torch.Tensor, a_idx: Optional[torch.Tensor] = None,
                    b_idx: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise max and argmax of cosine similarity between ``a[B, Na, C]`` and ``b[B, Nb, C]``.

    With ``a_idx[B, Ka]`` (``b_idx[B, Kb]``) the rows ``a[:, a_idx]`` (``b[:, b_idx]``) take part
    instead, without a gathered copy in the fused kernel. Returns ``score[B, Na]`` (float32) and
    ``index[B, Na]`` (into the rows of ``b`` taking part; the lowest index among ties).
    """
    a, b = _rows(a, a_idx), _rows(b, b_idx)
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


def rank_plan(score: torch.Tensor, match: Optional[torch.Tensor], r: int, a_idx: torch.Tensor, b_idx: torch.Tensor,
              sort_unmerged: bool = False, b_first: bool = False
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Ranks a bipartite match into a plan: the ``r`` tokens of set A with the highest ``score[B, Na]``
    (ties to the lower position) are taken out, the rest of A stays (by score, or in position order
    with ``sort_unmerged``) beside all of set B.

    ``a_idx[B, Na]`` / ``b_idx[B, Nb]`` are the tokens of the two sets; ``match[B, Na]`` is each A
    token's position in B (or None). Returns ``keep`` (``[kept A, B]``, or ``[B, kept A]`` with
    ``b_first``), ``src = a_idx`` of the ``r`` taken out (best first) and ``dst``, where each of
    them lands in ``keep`` (its B token's position; None without ``match``).
    """
    Na = score.shape[1]
    ranked = topk_indices(score, Na)
    src, unmerged = ranked[:, :r], ranked[:, r:]
    if sort_unmerged:
        unmerged = torch.sort(unmerged, dim=1, stable=True).values
    kept_a = a_idx.gather(1, unmerged)
    keep = torch.cat([b_idx, kept_a] if b_first else [kept_a, b_idx], dim=1)
    dst = None
    if match is not None:
        dst = match.gather(1, src) if b_first else unmerged.shape[1] + match.gather(1, src)
    return keep, a_idx.gather(1, src), dst


def apply_plan(x: torch.Tensor, size: Optional[torch.Tensor], keep: torch.Tensor,
               merge_src: Optional[torch.Tensor] = None, merge_dst: Optional[torch.Tensor] = None,
               num_prefix: int = 0, log_size: bool = False
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Executes a plan on ``x[B, N, C]``: the ``num_prefix`` special rows first, unchanged, then the
    reducible rows ``keep[B, K]`` (indices after the prefix), with rows ``merge_src[B, M]`` added
    into kept positions ``merge_dst[B, M]``.

    With sizes ``size[B, N, 1]`` (float32) the merge is size-weighted -- every output row is
    ``sum(size_i * x_i) / sum(size_i)`` over the rows it gathers -- and the new sizes are returned;
    without (``size=None``, e.g. the source map) rows are plainly summed and None is returned in
    their place. Without merges it is a gather. Sum then divide (``scatter_add``): ONNX and
    TensorRT run it, unlike ``scatter_reduce("mean")``. With ``log_size`` (and sizes) the third
    result is ``log(new sizes)`` in ``x``'s dtype, the next block's proportional-attention bias;
    None otherwise.
    """
    keep = _with_prefix(keep, num_prefix)
    merges = merge_src is not None and merge_src.shape[1] > 0
    if not merges:
        new_x, new_size = _rows(x, keep), (None if size is None else _rows(size, keep))
    else:
        src, dst = merge_src + num_prefix, merge_dst + num_prefix
        if size is None:
            new_x, new_size = _merge_sum(x, keep, src, dst), None
        else:
            weighted = x * size.to(x.dtype)
            new_size = _merge_sum(size, keep, src, dst)
            new_x = _merge_sum(weighted, keep, src, dst).div_(new_size.to(x.dtype))
    log = new_size.log().to(x.dtype) if log_size and new_size is not None else None
    return new_x, new_size, log


def apply_weighted_plan(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor, merge_src: Optional[torch.Tensor],
                        merge_dst: Optional[torch.Tensor], weight: torch.Tensor, num_prefix: int = 0,
                        log_size: bool = False
                        ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """:func:`apply_plan` with each output row the plain sum ``sum(weight_i * x_i)`` of the rows it
    gathers, ``weight[B, T]`` one per reducible row (the special rows pass unchanged); the caller
    chooses whether the weights of a row's group sum to 1. Sizes ``size[B, N, 1]`` still add up."""
    weight = weight.to(x.dtype).unsqueeze(-1)
    if num_prefix:
        weight = torch.cat([weight.new_ones(weight.shape[0], num_prefix, 1), weight], dim=1)
    new_x = apply_plan(x * weight, None, keep, merge_src, merge_dst, num_prefix)[0]
    new_size = apply_plan(size, None, keep, merge_src, merge_dst, num_prefix)[0]
    return new_x, new_size, (new_size.log().to(x.dtype) if log_size else None)


def merged_norms(x: torch.Tensor, merged: torch.Tensor, keep: torch.Tensor, merge_src: torch.Tensor,
                 merge_dst: torch.Tensor, num_prefix: int = 0, how: str = "max") -> torch.Tensor:
    """MLERP (ToFu, Kim et al. 2024) on ``merged``, the output of :func:`apply_plan` for the same
    plan on ``x``: every kept row that received merges keeps its direction (the size-weighted
    average) and is rescaled to the largest norm among the rows of ``x`` folded into it (its own
    and its sources'); rows without merges and the prefix are returned unchanged. Norms in
    float32, the rescale in ``merged``'s dtype (no float32 copy of the tokens). The per-destination
    maximum is a masked max over a ``[B, K, M]`` comparison (no ``scatter_reduce``, which
    ONNX/TensorRT cannot run)."""
    if how != "max":
        raise ValueError(f"merge_norm={how!r}: the one rule is 'max' (MLERP)")
    p = num_prefix
    norms = torch.linalg.vector_norm(x[:, p:], dim=-1, dtype=torch.float32)  # [B, T]
    kept_norm, src_norm = norms.gather(1, keep), norms.gather(1, merge_src)  # [B, K], [B, M]
    slots = torch.arange(keep.shape[1], device=keep.device).view(1, -1, 1)
    hit = merge_dst.unsqueeze(1) == slots  # [B, K, M]: source m folds into kept row k
    src_max = torch.where(hit, src_norm.unsqueeze(1), torch.zeros((), device=x.device)).amax(dim=-1)
    target = torch.maximum(kept_norm, src_max)
    body = merged[:, p:]
    body_norm = torch.linalg.vector_norm(body, dim=-1, dtype=torch.float32)
    scale = target / body_norm.clamp_min(torch.finfo(torch.float32).tiny)
    rescaled = body * scale.unsqueeze(-1).to(body.dtype)
    body = torch.where(hit.any(dim=-1, keepdim=True), rescaled, body)
    return torch.cat([merged[:, :p], body], dim=1) if p else body


def _with_prefix(idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Indices into the reducible tokens -> indices into the whole sequence, prefix first."""
    if num_prefix == 0:
        return idx
    prefix = torch.arange(num_prefix, device=idx.device, dtype=idx.dtype).expand(idx.shape[0], num_prefix)
    return torch.cat([prefix, idx + num_prefix], dim=1)


def _merge_sum(t: torch.Tensor, keep: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Gather rows ``keep`` of ``t`` and add rows ``src`` into output positions ``dst``."""
    kept = _rows(t, keep)
    kept.scatter_add_(1, dst.unsqueeze(-1).expand(-1, -1, t.shape[-1]), _rows(t, src))
    return kept


def pagerank_steps(attn: torch.Tensor, init: torch.Tensor, iters: int,
                   alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``iters`` weighted-PageRank steps ``s <- A^T s`` for each of ``R`` graphs ``attn[R, N, N]``
    (rows sum to 1) from ``init[R, N]``; returns float32 ``[R, N]``.

    With ``alive[R, N]`` (0/1) the graph is restricted to the alive tokens: each row is
    renormalised over the alive columns and the other tokens neither vote nor receive, i.e.
    ``s <- ((s * alive / (A @ alive)) A) * alive``.
    """
    R, N, _ = attn.shape
    s = init.float().reshape(R, 1, N)
    m = None if alive is None else alive.float().reshape(R, 1, N)
    # Each step is a matrix-vector product per graph, bound by reading A: iterate a cache-sized
    # group of graphs at a time (vitcompress.kernels.chunking), converted to float32 a group at a time.
    chunk = chunk_count(attn, R, N * N * 4)
    out = []
    with _float32(attn):
        for i in ((0,) if chunk == R else range(0, R, chunk)):  # no range over a symbolic batch
            a_i, s_i = attn[i:i + chunk].float(), s[i:i + chunk]
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


# ----------------------------------------------------------------- Zero-TPrune's importance score
# The pieces of vitcompress.methods.zero_tprune (which documents them); here so that the reference
# of the fused score below is plain torch.


def initial_scores(num_tokens: int, num_prefix: int, cls_init: str = "sqrt", device=None,
                   alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    if alive is None:
        s = torch.ones(num_tokens, device=device, dtype=torch.float32)
        n = num_tokens
    else:
        s = alive.to(device=device, dtype=torch.float32)
        n = s.sum(dim=-1, keepdim=True)
    if cls_init == "sqrt" and num_prefix > 0:
        s = s.clone()
        s[..., 0] = s[..., 0] * (n.sqrt().squeeze(-1) if torch.is_tensor(n) else math.sqrt(n))
    return s / s.sum(dim=-1, keepdim=True)


def weighted_pagerank(attn: torch.Tensor, iters: int, init: Optional[torch.Tensor] = None,
                      alive: Optional[torch.Tensor] = None, steps=pagerank_steps) -> torch.Tensor:
    B, H, N, _ = attn.shape
    if init is None:
        s = attn.new_ones(B, H, N, dtype=torch.float32)
    else:
        s = init.to(device=attn.device, dtype=torch.float32)
        s = (s[:, None, :] if s.dim() == 2 else s).expand(B, H, N)
    m = None if alive is None else alive.to(device=attn.device, dtype=torch.float32)[:, None, :].expand(B, H, N)
    if m is not None:
        s = s * m
    s = s / s.sum(dim=-1, keepdim=True)
    if iters == 0:
        return s
    out = steps(attn.reshape(B * H, N, N), s.reshape(B * H, N), iters, None if m is None else m.reshape(B * H, N))
    return out.reshape(B, H, N)


def head_variance(scores: torch.Tensor, alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    if alive is None:
        return (scores * scores.shape[-1]).var(dim=-1, unbiased=False)
    w = alive.to(scores.dtype)[:, None, :]
    n = w.sum(dim=-1)
    x = scores * n[..., None]
    mean = (x * w).sum(dim=-1) / n
    return ((x - mean[..., None]).square() * w).sum(dim=-1) / n


def head_mask(scores: torch.Tensor, var_min: float = 0.01, var_max: float = 0.7,
              alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    var = head_variance(scores, alive)
    mask = (var >= var_min) & (var <= var_max)
    none = ~mask.any(dim=-1, keepdim=True)
    return mask | none


def aggregate_heads(scores: torch.Tensor, mask: Optional[torch.Tensor] = None, how: str = "rms") -> torch.Tensor:
    w = torch.ones(scores.shape[:2], device=scores.device, dtype=scores.dtype) if mask is None else mask.to(scores.dtype)
    count = w.sum(dim=1, keepdim=True).clamp_min(1.0)
    w = w.unsqueeze(-1)
    if how == "rms":
        return ((scores.square() * w).sum(dim=1) / count).sqrt()
    if how == "mean":
        return (scores * w).sum(dim=1) / count
    raise ValueError(f"aggregate={how!r}: use 'rms' or 'mean'")


def alive_mask(alive: torch.Tensor, num_tokens: int, num_prefix: int) -> torch.Tensor:
    """``[B, num_tokens]`` bool: the special tokens and the reducible tokens listed in ``alive[B, K]``."""
    B = alive.shape[0]
    body = torch.zeros(B, num_tokens - num_prefix, device=alive.device, dtype=torch.float32).scatter(
        1, alive, torch.ones_like(alive, dtype=torch.float32))
    return torch.cat([body.new_ones(B, num_prefix), body], dim=1) > 0


def pagerank_scores(attn: torch.Tensor, iters: int, num_prefix: int, cls_sqrt: bool = True,
                    alive: Optional[torch.Tensor] = None, var_min: float = 0.01, var_max: float = 0.7,
                    head_filter: bool = True, aggregate: str = "rms") -> torch.Tensor:
    """Zero-TPrune's importance of the reducible tokens, in one call: per head of ``attn[B, H, N, N]``
    (the ``num_prefix`` special tokens first) ``iters`` weighted-PageRank steps from the initial
    distribution (uniform; the first special token ``sqrt(n)``-fold with ``cls_sqrt``), the
    variance-based head filter (``head_filter``; heads whose ``n * s`` variance lies outside
    ``[var_min, var_max]`` are left out, all of them when none passes) and the aggregation over the
    heads (``"rms"`` or ``"mean"``).

    ``alive[B, K]`` (indices of reducible tokens) restricts the graph to the special tokens and
    those (each row renormalised over them) and returns their scores ``[B, K]`` in ``alive``'s
    order; without it all ``N - num_prefix`` reducible tokens are scored. Float32.
    """
    B, H, N, _ = attn.shape
    mask = None if alive is None else alive_mask(alive, N, num_prefix)
    init = initial_scores(N, num_prefix, "sqrt" if cls_sqrt else "uniform", attn.device, mask)
    s = weighted_pagerank(attn, iters, init, mask)
    heads = head_mask(s, var_min, var_max, mask) if head_filter else None
    out = aggregate_heads(s, heads, aggregate)[:, num_prefix:]
    return out if alive is None else out.gather(1, alive)
