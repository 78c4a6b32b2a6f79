"""Fused cosine bipartite matching: row-wise max / argmax of ``cos(a_i, b_j)`` without the Na x Nb matrix.

One program owns ``BLOCK_M`` rows of ``a`` and sweeps ``b`` in ``BLOCK_N`` tiles. For each tile it
accumulates the raw dot products (``tl.dot`` over ``BLOCK_C`` slices of the channels, float32 at
IEEE precision -- no TF32) and the squared norms of the ``b`` rows, scales the tile into cosines,
and folds its max / argmax into a running best. The tile lives in registers only; memory sees
``a``, ``b`` and the two ``[B, Na]`` outputs.

Agreement with :func:`vitcompress.kernels.reference.bipartite_match`: scores to float32 rounding
(the normalisation is applied to the dot product, not to the inputs, so the last bits can
differ); indices exactly, with ties (exactly equal cosines, e.g. duplicate tokens) going to the
lowest index: ``tl.max(..., return_indices=True)`` breaks ties to the left within a tile and a
later tile replaces the running best only when strictly greater.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._triton_utils import as_native, check_launchable, cosine_tile, device_guard, dot_dtype, inverse_norms, tile_sizes

#: largest (rows of a, rows of b, channels) tile on a GPU
MAX_BLOCKS = (64, 64, 64)
#: under TRITON_INTERPRET=1 every op costs Python overhead, so fewer, larger tiles run faster
MAX_BLOCKS_INTERPRETED = (256, 256, 128)


@triton.jit
def _bipartite_match_kernel(
    a_ptr, b_ptr, ai_ptr, bi_ptr, score_ptr, index_ptr,
    Na, Nb, C, n_mblocks,
    s_ab, s_an, s_ac, s_bb, s_bn, s_bc, s_aib, s_ain, s_bib, s_bin, s_sb, s_sn, s_ib, s_in,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, A_IDX: tl.constexpr, B_IDX: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = (pid // n_mblocks).to(tl.int64)
    offs_m = (pid % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Na
    if A_IDX:  # the rows of a named by a_idx: read in place, no gathered copy
        rows_m = tl.load(ai_ptr + batch * s_aib + offs_m * s_ain, mask=mask_m, other=0).to(tl.int64)
    else:
        rows_m = offs_m
    a_rows = a_ptr + batch * s_ab + rows_m[:, None] * s_an
    b_base = b_ptr + batch * s_bb
    inv_a = inverse_norms(a_rows, mask_m, C, s_ac, BLOCK_M, BLOCK_C)  # once per program

    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(0, Nb, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Nb
        if B_IDX:
            rows_n = tl.load(bi_ptr + batch * s_bib + offs_n * s_bin, mask=mask_n, other=0).to(tl.int64)
        else:
            rows_n = offs_n
        b_rows = b_base + rows_n[:, None] * s_bn
        cos = cosine_tile(a_rows, mask_m, inv_a, b_rows, mask_n, C, s_ac, s_bc, BLOCK_M, BLOCK_N, BLOCK_C,
                          DOT_DTYPE, False)
        cos = tl.where(mask_n[None, :], cos, float("-inf"))
        tile_best, tile_idx = tl.max(cos, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strict: an earlier tile keeps its ties
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx + n0, best_idx)

    tl.store(score_ptr + batch * s_sb + offs_m * s_sn, best, mask=mask_m)
    tl.store(index_ptr + batch * s_ib + offs_m * s_in, best_idx.to(tl.int64), mask=mask_m)


def bipartite_match(a: torch.Tensor, b: torch.Tensor, a_idx: Optional[torch.Tensor] = None,
                    b_idx: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise max and argmax of cosine similarity between ``a[B, Na, C]`` and ``b[B, Nb, C]``
    (or their rows ``a_idx[B, Na]`` / ``b_idx[B, Nb]``, read in place).

    Returns ``score[B, Na]`` (float32) and ``index[B, Na]`` (int64, the lowest index among ties).
    float32 / float16 / bfloat16 inputs are read as they are and computed in float32.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"bipartite_match expects a[B, Na, C] and b[B, Nb, C], got {tuple(a.shape)} and {tuple(b.shape)}")
    for name, idx, t in (("a_idx", a_idx, a), ("b_idx", b_idx, b)):
        if idx is not None and (idx.dim() != 2 or idx.shape[0] != t.shape[0]):
            raise ValueError(f"bipartite_match: {name} must be [B, K] indices, got {tuple(idx.shape)}")
    Bsz, C = a.shape[0], a.shape[2]
    Na = a.shape[1] if a_idx is None else a_idx.shape[1]
    Nb = b.shape[1] if b_idx is None else b_idx.shape[1]
    if Nb == 0 and Na > 0:
        raise ValueError("bipartite_match: b has no tokens, so no row of a has a match")
    kernel = _bipartite_match_kernel
    check_launchable(kernel, *(t for t in (a, b, a_idx, b_idx) if t is not None))
    a, b = as_native(a), as_native(b)
    ai = a_idx if a_idx is not None else a  # any tensor when unused
    bi = b_idx if b_idx is not None else b
    score = torch.empty((Bsz, Na), dtype=torch.float32, device=a.device)
    index = torch.empty((Bsz, Na), dtype=torch.int64, device=a.device)
    if Bsz == 0 or Na == 0:
        return score, index
    BLOCK_M, BLOCK_N, BLOCK_C = tile_sizes(kernel, (Na, Nb, C), MAX_BLOCKS, MAX_BLOCKS_INTERPRETED)
    n_mblocks = triton.cdiv(Na, BLOCK_M)
    with device_guard(a):
        kernel[(Bsz * n_mblocks,)](
            a, b, ai, bi, score, index, Na, Nb, C, n_mblocks,
            a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
            ai.stride(0), ai.stride(1), bi.stride(0), bi.stride(1),
            score.stride(0), score.stride(1), index.stride(0), index.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, DOT_DTYPE=dot_dtype(kernel),
            A_IDX=a_idx is not None, B_IDX=b_idx is not None, num_warps=4,
        )
    return score, index
