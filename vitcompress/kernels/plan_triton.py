"""Ranking a bipartite match into a plan, in one launch per batch.

ToMe's last steps after the similarity max/argmax -- sort the A tokens by their best score, take the
``r`` best out, keep the rest (by score, or back in position order), put them beside set B and say
where each taken token lands -- are half a dozen small torch ops (sort, two gathers, a sort, a cat,
an add). Here one program owns one image (or a few, when their rows are short): it sorts the row's
scores in registers (the bitonic sort
of :mod:`.topk_triton`, with the same distinct keys, so ties go to the lower position exactly as
the reference's stable sort does) and writes ``keep``, ``src`` and ``dst`` directly. Indices are
integers, so the kernel agrees with :func:`vitcompress.kernels.reference.rank_plan` exactly.
Rows longer than :data:`MAX_ROW` use the reference.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._triton_utils import as_native, block, check_launchable, device_guard
from .topk_triton import descending_keys, key_index, rows_per_program, sort_keys_descending

MAX_ROW = 4096


@triton.jit
def _rank_plan_kernel(score_ptr, match_ptr, ai_ptr, bi_ptr, keep_ptr, src_ptr, dst_ptr, Bsz, Na, Nb, r,
                      s_sb, s_sn, s_mb, s_mn, s_aib, s_ain, s_bib, s_bin, s_kb, s_kn, s_rb, s_rn, s_db, s_dn,
                      HAS_MATCH: tl.constexpr, SORT_UNMERGED: tl.constexpr, B_FIRST: tl.constexpr,
                      ROWS: tl.constexpr, LOG_A: tl.constexpr, BLOCK_B: tl.constexpr):
    BLOCK_A: tl.constexpr = 2**LOG_A
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # images
    row_ok = rows < Bsz
    b = rows.to(tl.int64)[:, None]
    offs = tl.arange(0, BLOCK_A)
    pos = offs[None, :]
    ok = row_ok[:, None] & (pos < Na)
    s = tl.load(score_ptr + b * s_sb + pos * s_sn, mask=ok, other=0.0).to(tl.float32)
    key = descending_keys(s, pos, ok)
    top = sort_keys_descending(key, offs, ROWS, LOG_A)
    at_rank = key_index(top).to(tl.int64)  # the A position ranked pos-th (for pos < Na)
    n_kept = Na - r
    a_base = Nb if B_FIRST else 0  # where the kept A tokens start in keep
    b_base = 0 if B_FIRST else n_kept

    taken = ok & (pos < r)
    a_ranked = tl.load(ai_ptr + b * s_aib + at_rank * s_ain, mask=ok, other=0)
    tl.store(src_ptr + b * s_rb + pos * s_rn, a_ranked, mask=taken)
    if HAS_MATCH:
        m = tl.load(match_ptr + b * s_mb + at_rank * s_mn, mask=taken, other=0)
        tl.store(dst_ptr + b * s_db + pos * s_dn, m + b_base, mask=taken)
    if SORT_UNMERGED:  # the kept A tokens in position order
        thr = tl.sum(tl.where(pos == r - 1, top, 0), axis=1, keep_dims=True)  # the key of the last one taken
        out = ok & ((key < thr) | (r == 0))
        at = tl.cumsum(out.to(tl.int32), axis=1) - 1
        a_val = tl.load(ai_ptr + b * s_aib + pos * s_ain, mask=ok, other=0)
        tl.store(keep_ptr + b * s_kb + (a_base + at) * s_kn, a_val, mask=out)
    else:  # by score
        tl.store(keep_ptr + b * s_kb + (a_base + pos - r) * s_kn, a_ranked, mask=ok & (pos >= r))
    for j0 in range(0, Nb, BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)[None, :]
        okb = row_ok[:, None] & (j < Nb)
        v = tl.load(bi_ptr + b * s_bib + j * s_bin, mask=okb, other=0)
        tl.store(keep_ptr + b * s_kb + (b_base + j) * s_kn, v, mask=okb)


def rank_plan(score: torch.Tensor, match: Optional[torch.Tensor], r: int, a_idx: torch.Tensor, b_idx: torch.Tensor,
              sort_unmerged: bool = False, b_first: bool = False
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Same contract as :func:`vitcompress.kernels.reference.rank_plan`."""
    if score.dim() != 2 or a_idx.shape != score.shape or b_idx.dim() != 2 or b_idx.shape[0] != score.shape[0]:
        raise ValueError(f"rank_plan expects score[B, Na], a_idx[B, Na], b_idx[B, Nb], got {tuple(score.shape)}, "
                         f"{tuple(a_idx.shape)}, {tuple(b_idx.shape)}")
    Bsz, Na = score.shape
    Nb = b_idx.shape[1]
    r = int(r)
    if not 0 <= r <= Na:
        raise ValueError(f"rank_plan: r={r} must lie in [0, {Na}]")
    if Na > MAX_ROW:
        return reference.rank_plan(score, match, r, a_idx, b_idx, sort_unmerged, b_first)
    kernel = _rank_plan_kernel
    check_launchable(kernel, *(t for t in (score, match, a_idx, b_idx) if t is not None))
    score = as_native(score)
    dev = score.device
    keep = torch.empty((Bsz, Na - r + Nb), dtype=torch.int64, device=dev)
    src = torch.empty((Bsz, r), dtype=torch.int64, device=dev)
    dst = None if match is None else torch.empty((Bsz, r), dtype=torch.int64, device=dev)
    if Bsz == 0:
        return keep, src, dst
    m = match if match is not None else a_idx  # any tensor when unused
    d = dst if dst is not None else src
    BLOCK_A = block(Na, 16, MAX_ROW)
    ROWS = rows_per_program(kernel, Bsz, BLOCK_A)
    with device_guard(score):
        kernel[(triton.cdiv(Bsz, ROWS),)](
            score, m, a_idx, b_idx, keep, src, d, Bsz, Na, Nb, r,
            score.stride(0), score.stride(1), m.stride(0), m.stride(1), a_idx.stride(0), a_idx.stride(1),
            b_idx.stride(0), b_idx.stride(1), keep.stride(0), keep.stride(1), src.stride(0), src.stride(1),
            d.stride(0), d.stride(1),
            HAS_MATCH=match is not None, SORT_UNMERGED=bool(sort_unmerged), B_FIRST=bool(b_first),
            ROWS=ROWS, LOG_A=BLOCK_A.bit_length() - 1, BLOCK_B=block(Nb, 16, max(16, 4096 // ROWS)),
            num_warps=min(8, max(1, ROWS * BLOCK_A // 256)),
        )
    return keep, src, dst
