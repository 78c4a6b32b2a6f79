"""Executing a plan in one pass: gather the kept rows, add the merged rows size-weighted, divide,
and write the new sizes.

The torch path (:func:`vitcompress.kernels.reference.apply_plan`) is a chain of passes over the
tokens: build the full index (prefix + kept), multiply by the sizes, gather, gather the sources,
``scatter_add``, the same three for the sizes, and divide. Here one program owns ``BLOCK_R`` output
rows and ``BLOCK_C`` channels of one image: it reads each kept row once (the special rows pass
through), and adds the merged rows that land in its rows as a one-hot product
``[BLOCK_R, BLOCK_M] x [BLOCK_M, BLOCK_C]`` over the image's ``M`` merges (``tl.dot``; the one-hot
entries are exact, the sums float32), so no two programs write the same element and no atomics
are needed. Hidden states are read and written in their own dtype (float16 / bfloat16 stay half in
memory; the arithmetic is float32 in registers); sizes are float32. The programs of the first
channel block write the new sizes. Without sizes (``size=None``, the source map) the rows are
summed, not averaged. On request the same programs write ``log(new size)`` in the tokens' dtype
(the next block's proportional-attention bias), which saves the block two more launches.

Agreement with the reference: a plain gather (no merges) is exact; a merged float32 row is
``(sum of size_i * x_i) / sum(size_i)`` to float32 rounding (the reference adds in a different
order, and rounds half-precision products to half before adding; here they are added in float32
and rounded once).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._triton_utils import check_launchable, device_guard, dot_dtype, tile_sizes

#: largest (rows, merges, channels) tile on a GPU, and under the interpreter (fewer, larger tiles)
MAX_BLOCKS = (32, 32, 128)
MAX_BLOCKS_INTERPRETED = (256, 128, 512)


@triton.jit
def _apply_plan_kernel(
    x_ptr, size_ptr, keep_ptr, src_ptr, dst_ptr, out_ptr, osize_ptr, olog_ptr,
    K, M, C, P, n_rblocks,
    s_xb, s_xn, s_xc, s_zb, s_zn, s_kb, s_kn, s_sb, s_sn, s_db, s_dn, s_ob, s_on, s_oc, s_qb, s_qn, s_lb, s_ln,
    WEIGHTED: tl.constexpr, MERGES: tl.constexpr, LOG: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cblock = tl.program_id(1)
    b = (pid // n_rblocks).to(tl.int64)
    rows = (pid % n_rblocks) * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows
    ok_r = rows < P + K
    is_prefix = rows < P
    kept = tl.load(keep_ptr + b * s_kb + (rows - P) * s_kn, mask=ok_r & ~is_prefix, other=0).to(tl.int64)
    src_rows = tl.where(is_prefix, rows.to(tl.int64), kept + P)
    chans = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_c = chans < C
    ok = ok_r[:, None] & ok_c[None, :]
    x = tl.load(x_ptr + b * s_xb + src_rows[:, None] * s_xn + chans[None, :] * s_xc, mask=ok, other=0.0)
    if MERGES:
        acc = x.to(tl.float32)
        if WEIGHTED:
            w = tl.load(size_ptr + b * s_zb + src_rows * s_zn, mask=ok_r, other=0.0).to(tl.float32)
            acc = acc * w[:, None]
            total = w
        for m0 in range(0, M, BLOCK_M):
            ms = m0 + tl.arange(0, BLOCK_M)
            ok_m = ms < M
            dst = tl.load(dst_ptr + b * s_db + ms * s_dn, mask=ok_m, other=-1).to(tl.int64)
            src = tl.load(src_ptr + b * s_sb + ms * s_sn, mask=ok_m, other=0).to(tl.int64) + P
            hit = (dst[None, :] + P == rows[:, None]) & ok_m[None, :]  # [BLOCK_R, BLOCK_M]
            xs = tl.load(x_ptr + b * s_xb + src[:, None] * s_xn + chans[None, :] * s_xc,
                         mask=ok_m[:, None] & ok_c[None, :], other=0.0).to(tl.float32)
            if WEIGHTED:
                ws = tl.load(size_ptr + b * s_zb + src * s_zn, mask=ok_m, other=0.0).to(tl.float32)
                xs = xs * ws[:, None]
                total += tl.sum(tl.where(hit, ws[None, :], 0.0), axis=1)
            acc = tl.dot(hit.to(DOT_DTYPE), xs.to(DOT_DTYPE), acc.to(DOT_DTYPE), input_precision="ieee").to(tl.float32)
        if WEIGHTED:
            acc = acc / tl.where(ok_r, total, 1.0)[:, None]  # (masked rows: no 0 / 0)
        y = acc
    else:
        y = x
    tl.store(out_ptr + b * s_ob + rows[:, None] * s_on + chans[None, :] * s_oc, y.to(out_ptr.dtype.element_ty), mask=ok)
    if WEIGHTED:
        if cblock == 0:
            if MERGES:
                new_size = total
            else:
                new_size = tl.load(size_ptr + b * s_zb + src_rows * s_zn, mask=ok_r, other=0.0)
            tl.store(osize_ptr + b * s_qb + rows * s_qn, new_size.to(osize_ptr.dtype.element_ty), mask=ok_r)
            if LOG:  # the next block's proportional-attention bias
                lg = tl.log(tl.where(ok_r, new_size.to(tl.float32), 1.0))
                tl.store(olog_ptr + b * s_lb + rows * s_ln, lg.to(olog_ptr.dtype.element_ty), mask=ok_r)


def apply_plan(x: torch.Tensor, size: Optional[torch.Tensor], keep: torch.Tensor,
               merge_src: Optional[torch.Tensor] = None, merge_dst: Optional[torch.Tensor] = None,
               num_prefix: int = 0, log_size: bool = False
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Same contract as :func:`vitcompress.kernels.reference.apply_plan`."""
    if x.dim() != 3 or keep.dim() != 2 or keep.shape[0] != x.shape[0]:
        raise ValueError(f"apply_plan expects x[B, N, C] and keep[B, K], got {tuple(x.shape)} and {tuple(keep.shape)}")
    if size is not None and (size.shape[:2] != x.shape[:2] or size.numel() != x.shape[0] * x.shape[1]):
        raise ValueError(f"apply_plan: size must be [B, N, 1] for x {tuple(x.shape)}, got {tuple(size.shape)}")
    if (merge_src is None) != (merge_dst is None) or (merge_src is not None and merge_src.shape != merge_dst.shape):
        raise ValueError("apply_plan: merge_src and merge_dst go together, with the same shape [B, M]")
    Bsz, N, C = x.shape
    P = int(num_prefix)
    K = keep.shape[1]
    M = 0 if merge_src is None else merge_src.shape[1]
    kernel = _apply_plan_kernel
    check_launchable(kernel, *(t for t in (x, size, keep, merge_src, merge_dst) if t is not None))
    out = torch.empty((Bsz, P + K, C), dtype=x.dtype, device=x.device)
    new_size = None if size is None else torch.empty((Bsz, P + K, 1), dtype=size.dtype, device=x.device)
    log = torch.empty((Bsz, P + K, 1), dtype=x.dtype, device=x.device) if log_size and size is not None else None
    if Bsz == 0 or P + K == 0:
        return out, new_size, log
    weighted = size is not None
    z = size[..., 0] if weighted else keep  # [B, N] view; any tensor when unused
    q = new_size[..., 0] if weighted else keep
    lg = log[..., 0] if log is not None else keep
    src = merge_src if M else keep
    dst = merge_dst if M else keep
    BLOCK_R, BLOCK_M, BLOCK_C = tile_sizes(kernel, (P + K, M, C), MAX_BLOCKS, MAX_BLOCKS_INTERPRETED)
    n_rblocks = triton.cdiv(P + K, BLOCK_R)
    with device_guard(x):
        kernel[(Bsz * n_rblocks, triton.cdiv(max(C, 1), BLOCK_C))](
            x, z, keep, src, dst, out, q, lg, K, M, C, P, n_rblocks,
            x.stride(0), x.stride(1), x.stride(2), z.stride(0), z.stride(1), keep.stride(0), keep.stride(1),
            src.stride(0), src.stride(1), dst.stride(0), dst.stride(1), out.stride(0), out.stride(1), out.stride(2),
            q.stride(0), q.stride(1), lg.stride(0), lg.stride(1),
            WEIGHTED=weighted, MERGES=M > 0, LOG=log is not None, DOT_DTYPE=dot_dtype(kernel),
            BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, num_warps=4,
        )
    return out, new_size, log
