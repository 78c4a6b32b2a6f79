"""Fused weighted PageRank: each graph's attention matrix is read from memory once.

The torch reference runs ``iters`` batched matrix-vector products, and every one of them reads
every ``[N, N]`` attention matrix again: 30 steps in an early Zero-TPrune block are 30 passes over
``[B, H, N, N]``. Here one program owns one graph (one head of one image): it loads the matrix
into registers once (in its own dtype, so a half-precision matrix takes half the space), computes
the alive rows' renormalisation from it, and runs all the steps on chip. Rows up to
:data:`MAX_N` tokens (a padded 256: ViT-S/B at 224 px) run here; longer ones go to the reference.
Agreement with :func:`vitcompress.kernels.reference.pagerank_steps` is to float32 rounding.

:func:`pagerank_scores` is Zero-TPrune's whole importance score in one launch: one program per
image builds the initial distribution (and, on the survivors of a stage, the graph's alive tokens
from their indices), runs the steps for each head in turn, applies the variance-based head filter
and aggregates the heads (root-mean-square or mean) -- what the reference does in some thirty
small torch ops (:func:`vitcompress.kernels.reference.pagerank_scores`), to float32 rounding.
"""
import torch
import triton
import triton.language as tl

from . import reference
from ._triton_utils import check_launchable, device_guard

MAX_N = 256


@triton.jit
def _pagerank_iterations(a, s, alive, iters, HAS_ALIVE: tl.constexpr):
    """``iters`` steps ``s <- A^T s`` of one graph ``a[BLOCK, BLOCK]`` held in registers; with
    ``HAS_ALIVE`` on the tokens where ``alive`` is 1 only, each row renormalised over them (as
    :func:`vitcompress.kernels.reference.pagerank_steps` does)."""
    if HAS_ALIVE:
        mass = tl.sum(a.to(tl.float32) * alive[None, :], axis=1)  # each row's attention to alive tokens
        scale = alive / tl.maximum(mass, 1e-12)
        for _ in range(iters):
            s = tl.sum(a.to(tl.float32) * (s * scale)[:, None], axis=0) * alive
    else:
        for _ in range(iters):
            s = tl.sum(a.to(tl.float32) * s[:, None], axis=0)
    return s


@triton.jit
def _pagerank_kernel(a_ptr, s_ptr, m_ptr, out_ptr, N, iters,
                     s_ar, s_ai, s_aj, s_sr, s_sn, s_mr, s_mn, s_or, s_on,
                     HAS_ALIVE: tl.constexpr, BLOCK: tl.constexpr):
    graph = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    a = tl.load(a_ptr + graph * s_ar + offs[:, None] * s_ai + offs[None, :] * s_aj,
                mask=ok[:, None] & ok[None, :], other=0.0)
    s = tl.load(s_ptr + graph * s_sr + offs * s_sn, mask=ok, other=0.0).to(tl.float32)
    if HAS_ALIVE:
        alive = tl.load(m_ptr + graph * s_mr + offs * s_mn, mask=ok, other=0.0).to(tl.float32)
    else:
        alive = s  # unused
    s = _pagerank_iterations(a, s, alive, iters, HAS_ALIVE)
    tl.store(out_ptr + graph * s_or + offs * s_on, s, mask=ok)


def pagerank_steps(attn: torch.Tensor, init: torch.Tensor, iters: int, alive=None) -> torch.Tensor:
    """Same contract as :func:`vitcompress.kernels.reference.pagerank_steps`."""
    if attn.dim() != 3 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"pagerank_steps expects attn[R, N, N], got {tuple(attn.shape)}")
    R, N, _ = attn.shape
    if N > MAX_N:
        return reference.pagerank_steps(attn, init, iters, alive)
    check_launchable(_pagerank_kernel, attn, init)
    s = init.float()
    out = torch.empty((R, N), dtype=torch.float32, device=attn.device)
    if R == 0 or N == 0:
        return out
    m = s if alive is None else alive.float()  # any tensor of the right shape when unused
    block = max(16, triton.next_power_of_2(N))
    with device_guard(attn):
        _pagerank_kernel[(R,)](
            attn, s, m, out, N, int(iters),
            attn.stride(0), attn.stride(1), attn.stride(2), s.stride(0), s.stride(1),
            m.stride(0), m.stride(1), out.stride(0), out.stride(1),
            HAS_ALIVE=alive is not None, BLOCK=block, num_warps=16 if block > 128 else 4,
        )
    return out


@triton.jit
def _pagerank_scores_kernel(a_ptr, alive_ptr, out_ptr, H, N, K, P, iters, var_min, var_max,
                            s_ab, s_ah, s_ai, s_aj, s_lb, s_lk, s_ob, s_ok,
                            HAS_ALIVE: tl.constexpr, CLS_SQRT: tl.constexpr, HEAD_FILTER: tl.constexpr,
                            RMS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    if HAS_ALIVE:  # the graph: the special tokens and the reducible tokens listed in alive
        ks = tl.arange(0, BLOCK_K)
        ok_k = ks < K
        pos = tl.load(alive_ptr + b * s_lb + ks * s_lk, mask=ok_k, other=-1) + P
        hit = (offs[:, None] == pos[None, :]) & ok_k[None, :]  # [BLOCK, BLOCK_K]: token t is alive[k]
        w = tl.where(ok & ((tl.max(hit.to(tl.int32), axis=1) > 0) | (offs < P)), 1.0, 0.0)
    else:
        w = tl.where(ok, 1.0, 0.0)
    n = tl.sum(w, axis=0)
    # the initial distribution (initial_scores), normalised again over the graph (weighted_pagerank)
    s0 = w
    if CLS_SQRT:
        s0 = tl.where((offs == 0) & (P > 0), s0 * tl.sqrt(n), s0)
    s0 = s0 / tl.sum(s0, axis=0)
    s0 = s0 * w
    s0 = s0 / tl.sum(s0, axis=0)

    acc_all = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kept = tl.zeros([BLOCK], dtype=tl.float32)
    kept = n * 0.0  # heads that pass the filter
    for h in range(H):
        a = tl.load(a_ptr + b * s_ab + h * s_ah + offs[:, None] * s_ai + offs[None, :] * s_aj,
                    mask=ok[:, None] & ok[None, :], other=0.0)
        s = _pagerank_iterations(a, s0, w, iters, HAS_ALIVE)
        if RMS:
            val = s * s
        else:
            val = s
        acc_all += val
        if HEAD_FILTER:  # population variance of n * s over the graph
            x = s * n
            mean = tl.sum(x * w, axis=0) / n
            d = x - mean
            var = tl.sum(d * d * w, axis=0) / n
            passes = (var >= var_min) & (var <= var_max)
            acc_kept += tl.where(passes, val, 0.0)
            kept += tl.where(passes, 1.0, 0.0)
    if HEAD_FILTER:
        res = tl.where(kept > 0, acc_kept / tl.maximum(kept, 1.0), acc_all / H)
    else:
        res = acc_all / H
    if RMS:
        res = tl.sqrt(res)
    if HAS_ALIVE:  # the alive tokens' scores, in alive's order
        got = tl.sum(tl.where(hit, res[:, None], 0.0), axis=0)
        tl.store(out_ptr + b * s_ob + ks * s_ok, got, mask=ok_k)
    else:
        tl.store(out_ptr + b * s_ob + (offs - P) * s_ok, res, mask=ok & (offs >= P))


def pagerank_scores(attn: torch.Tensor, iters: int, num_prefix: int, cls_sqrt: bool = True, alive=None,
                    var_min: float = 0.01, var_max: float = 0.7, head_filter: bool = True,
                    aggregate: str = "rms") -> torch.Tensor:
    """Same contract as :func:`vitcompress.kernels.reference.pagerank_scores`: Zero-TPrune's whole
    importance score in one launch, one program per image (its heads one after the other, each
    head's attention read once, in its own dtype). Graphs above :data:`MAX_N` tokens use the
    reference."""
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"pagerank_scores expects attn[B, H, N, N], got {tuple(attn.shape)}")
    if aggregate not in ("rms", "mean"):
        raise ValueError(f"aggregate={aggregate!r}: use 'rms' or 'mean'")
    B, H, N, _ = attn.shape
    P = int(num_prefix)
    if alive is not None and (alive.dim() != 2 or alive.shape[0] != B):
        raise ValueError(f"pagerank_scores: alive must be [B, K] indices, got {tuple(alive.shape)}")
    if N > MAX_N or H == 0:
        return reference.pagerank_scores(attn, iters, num_prefix, cls_sqrt, alive, var_min, var_max, head_filter,
                                         aggregate)
    check_launchable(_pagerank_scores_kernel, *(t for t in (attn, alive) if t is not None))
    K = N - P if alive is None else alive.shape[1]
    out = torch.empty((B, K), dtype=torch.float32, device=attn.device)
    if B == 0 or K == 0:
        return out
    lv = alive if alive is not None else out  # any tensor when unused
    block = max(16, triton.next_power_of_2(N))
    with device_guard(attn):
        _pagerank_scores_kernel[(B,)](
            attn, lv, out, H, N, K, P, int(iters), float(var_min), float(var_max),
            attn.stride(0), attn.stride(1), attn.stride(2), attn.stride(3), lv.stride(0), lv.stride(1),
            out.stride(0), out.stride(1),
            HAS_ALIVE=alive is not None, CLS_SQRT=bool(cls_sqrt), HEAD_FILTER=bool(head_filter),
            RMS=aggregate == "rms", BLOCK=block, BLOCK_K=max(16, triton.next_power_of_2(K)),
            num_warps=16 if block > 128 else 4,
        )
    return out
