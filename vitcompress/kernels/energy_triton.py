"""Fused PiToMe energy: ``e_i = mean_j ELU(cos(x_i, x_j) - margin, alpha)`` without the N x N matrix.

One program owns ``BLOCK_M`` tokens and sweeps all ``N`` tokens of the same image in
``BLOCK_N`` tiles: raw dot products by ``tl.dot`` (float32 at IEEE precision; float16 / bfloat16
inputs on tensor cores, whose products are exact and sums float32) over ``BLOCK_C``
channel slices, scaled into cosines by the inverse norms, shifted by the margin, passed through
ELU and summed into a per-row accumulator; masked columns add zero. The mean runs over every
``j``, ``i`` included, as in the reference. Agreement with
:func:`vitcompress.kernels.reference.energy_score` is to float32 rounding (~1e-7 absolute), and
duplicate tokens get bit-identical energies.
"""
import torch
import triton
import triton.language as tl

from ._triton_utils import (
    as_native,
    block,
    check_launchable,
    device_guard,
    dot_dtype,
    is_interpreted,
)

EPS = 1e-12  # F.normalize's default
#: largest (rows, columns, channels) tile on a GPU
MAX_BLOCKS = (64, 64, 64)
#: under TRITON_INTERPRET=1 every op costs Python overhead, so fewer, larger tiles run faster
MAX_BLOCKS_INTERPRETED = (256, 256, 128)


@triton.jit
def _energy_score_kernel(
    x_ptr, e_ptr,
    N, C, n_mblocks, margin, alpha,
    s_xb, s_xn, s_xc, s_eb, s_en,
    EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = (pid // n_mblocks).to(tl.int64)
    offs_m = (pid % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    x_base = x_ptr + batch * s_xb
    m_rows = x_base + offs_m[:, None] * s_xn
    chan = tl.arange(0, BLOCK_C)

    sq_m = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + chan
        xm = tl.load(m_rows + offs_c[None, :] * s_xc, mask=mask_m[:, None] & (offs_c[None, :] < C), other=0.0)
        xm = xm.to(tl.float32)
        sq_m += xm * xm
    inv_m = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq_m, axis=1)), EPS)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        n_rows = x_base + offs_n[:, None] * s_xn
        dot = tl.zeros([BLOCK_M, BLOCK_N], dtype=DOT_DTYPE)
        sq_n = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + chan
            mask_c = offs_c[None, :] < C
            xm = tl.load(m_rows + offs_c[None, :] * s_xc, mask=mask_m[:, None] & mask_c, other=0.0)
            xn = tl.load(n_rows + offs_c[None, :] * s_xc, mask=mask_n[:, None] & mask_c, other=0.0)
            if NATIVE_DOT:  # half-precision inputs: exact products, float32 sums, on tensor cores
                dot = tl.dot(xm, tl.trans(xn), dot)
            else:
                dot = tl.dot(xm.to(DOT_DTYPE), tl.trans(xn.to(DOT_DTYPE)), dot, input_precision="ieee")
            xn = xn.to(tl.float32)
            sq_n += xn * xn
        inv_n = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq_n, axis=1)), EPS)
        z = dot.to(tl.float32) * inv_m[:, None] * inv_n[None, :] - margin
        f = tl.where(z > 0, z, alpha * (tl.exp(tl.minimum(z, 0.0)) - 1.0))
        acc += tl.where(mask_n[None, :], f, 0.0)

    e = tl.sum(acc, axis=1) / N
    tl.store(e_ptr + batch * s_eb + offs_m * s_en, e, mask=mask_m)


def energy_score(x: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """PiToMe's energy ``e_i = mean_j ELU(cos(x_i, x_j) - margin, alpha)`` for ``x[B, N, C]``.

    Returns ``e[B, N]`` in float32; float32 / float16 / bfloat16 inputs are computed in float32.
    """
    if x.dim() != 3:
        raise ValueError(f"energy_score expects x[B, N, C], got {tuple(x.shape)}")
    kernel = _energy_score_kernel
    check_launchable(kernel, x)
    x = as_native(x)
    Bsz, N, C = x.shape
    e = torch.empty((Bsz, N), dtype=torch.float32, device=x.device)
    if Bsz == 0 or N == 0:
        return e
    max_m, max_n, max_c = MAX_BLOCKS_INTERPRETED if is_interpreted(kernel) else MAX_BLOCKS
    BLOCK_M, BLOCK_N, BLOCK_C = block(N, 16, max_m), block(N, 16, max_n), block(C, 16, max_c)
    n_mblocks = triton.cdiv(N, BLOCK_M)
    with device_guard(x):
        kernel[(Bsz * n_mblocks,)](
            x, e, N, C, n_mblocks, float(margin), float(alpha),
            x.stride(0), x.stride(1), x.stride(2), e.stride(0), e.stride(1),
            EPS=EPS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, DOT_DTYPE=dot_dtype(kernel),
            NATIVE_DOT=x.dtype != torch.float32 and not is_interpreted(kernel), num_warps=4,
        )
    return e
