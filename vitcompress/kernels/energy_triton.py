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

from ._triton_utils import (as_native, check_launchable, cosine_tile, device_guard, dot_dtype, inverse_norms,
                            is_interpreted, tile_sizes)

#: largest (rows, columns, channels) tile on a GPU
MAX_BLOCKS = (64, 64, 64)
#: under TRITON_INTERPRET=1 every op costs Python overhead, so fewer, larger tiles run faster
MAX_BLOCKS_INTERPRETED = (256, 256, 128)


@triton.jit
def _energy_score_kernel(
    x_ptr, e_ptr,
    N, C, n_mblocks, margin, alpha,
    s_xb, s_xn, s_xc, s_eb, s_en,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = (pid // n_mblocks).to(tl.int64)
    offs_m = (pid % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    x_base = x_ptr + batch * s_xb
    m_rows = x_base + offs_m[:, None] * s_xn
    inv_m = inverse_norms(m_rows, mask_m, C, s_xc, BLOCK_M, BLOCK_C)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        n_rows = x_base + offs_n[:, None] * s_xn
        z = cosine_tile(m_rows, mask_m, inv_m, n_rows, mask_n, C, s_xc, s_xc, BLOCK_M, BLOCK_N, BLOCK_C,
                        DOT_DTYPE, NATIVE_DOT) - margin
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
    BLOCK_M, BLOCK_N, BLOCK_C = tile_sizes(kernel, (N, N, C), MAX_BLOCKS, MAX_BLOCKS_INTERPRETED)
    n_mblocks = triton.cdiv(N, BLOCK_M)
    with device_guard(x):
        kernel[(Bsz * n_mblocks,)](
            x, e, N, C, n_mblocks, float(margin), float(alpha),
            x.stride(0), x.stride(1), x.stride(2), e.stride(0), e.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, DOT_DTYPE=dot_dtype(kernel),
            NATIVE_DOT=x.dtype != torch.float32 and not is_interpreted(kernel), num_warps=4,
        )
    return e
