"""Fused weighted-PageRank steps: each graph's attention matrix is read from memory once.

The torch reference runs ``iters`` batched matrix-vector products, and every one of them reads
every ``[N, N]`` attention matrix again: 30 steps in an early Zero-TPrune block are 30 passes over
``[B, H, N, N]``. Here one program owns one graph (one head of one image): it loads the matrix
into registers once (in its own dtype, so a half-precision matrix takes half the space), computes
the alive rows' renormalisation from it, and runs all the steps on chip. Rows up to
:data:`MAX_N` tokens (a padded 256: ViT-S/B at 224 px) run here; longer ones go to the reference.
Agreement with :func:`vitcompress.kernels.reference.pagerank_steps` is to float32 rounding.
"""
import torch
import triton
import triton.language as tl

from . import reference
from ._triton_utils import check_launchable, device_guard

MAX_N = 256


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
        mass = tl.sum(a.to(tl.float32) * alive[None, :], axis=1)  # each row's attention to alive tokens
        scale = alive / tl.maximum(mass, 1e-12)
        for _ in range(iters):
            s = tl.sum(a.to(tl.float32) * (s * scale)[:, None], axis=0) * alive
    else:
        for _ in range(iters):
            s = tl.sum(a.to(tl.float32) * s[:, None], axis=0)
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
