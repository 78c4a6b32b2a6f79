"""Per-row top-k indices, sorted by score, ties to the lower index.

A bitonic sort is not stable, so stability is put into the keys instead: each score becomes a
64-bit integer whose high 32 bits order like the float (sign-magnitude flipped into two's
complement; -0.0 folded onto +0.0 and every NaN onto one NaN above +inf, which is how
``torch.sort`` orders them) and whose low 32 bits are ``2**31 - 1 - index``. The keys are
distinct, so sorting them descending gives exactly the order of the reference's stable
descending sort, and the index is read back from the low bits. Whole rows (padded to a power of
two, several rows per program when they are short) are sorted in registers and the first ``k``
stored. Rows up to :data:`MAX_ROW` long run here; longer rows go to the torch reference.
"""
import torch
import triton
import triton.language as tl

from . import reference
from ._triton_utils import as_native, block, check_launchable, device_guard, is_interpreted

MAX_ROW = 4096
#: most elements (rows x padded row length) one program sorts: on a GPU, and under the interpreter
#: (where every op costs Python overhead, so a whole batch at once is fastest)
MAX_ELEMENTS = 2048
MAX_ELEMENTS_INTERPRETED = 2**16


@triton.jit
def sort_keys_descending(key, pos, ROWS: tl.constexpr, LOG_N: tl.constexpr):
    """Bitonic sort of each row of ``key[ROWS, 2**LOG_N]`` (distinct int64 keys), largest first.

    Every row is viewed as a ``[2] * LOG_N`` hypercube, so that the partner of position ``i`` at
    distance ``2**t`` lies along one axis; summing that axis and subtracting the key gives the
    partner (integer addition wraps, so this is exact). Plain reductions and elementwise ops only:
    they compile to register shuffles on a GPU and to numpy under the interpreter.
    """
    cube = tl.reshape(key, [ROWS] + [2] * LOG_N)
    p = tl.reshape(pos, [1] + [2] * LOG_N)  # position within the row
    for s in tl.static_range(1, LOG_N + 1):
        # runs of 2**s alternate in direction; the final run (s == LOG_N) is descending
        run_desc = ((p >> s) & 1) == 0
        for u in tl.static_range(s):  # partner distance 2**(s - 1 - u), largest first
            partner = tl.sum(cube, axis=LOG_N - (s - 1 - u), keep_dims=True) - cube
            is_low = ((p >> (s - 1 - u)) & 1) == 0
            cube = tl.where(is_low == run_desc, tl.maximum(cube, partner), tl.minimum(cube, partner))
    return tl.reshape(cube, [ROWS, 2**LOG_N])


@triton.jit
def descending_keys(s, pos, mask):
    """Distinct int64 sort keys of float32 scores ``s``: larger score -> larger key, ties -> the
    lower position ``pos`` larger; masked-out entries below every real one."""
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(s != s, 0x7FC00000, bits)  # every NaN -> the canonical quiet NaN
    bits = tl.where(s == 0.0, 0, bits)  # -0.0 -> +0.0
    hi = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order-preserving as signed int32
    hi = tl.where(mask, hi, -2147483647 - 1)  # padding sorts below every real score
    lo = tl.where(mask, 2147483647 - pos, 0)  # lower index -> larger key
    return (hi.to(tl.int64) << 32) + lo.to(tl.int64)


@triton.jit
def key_index(key):
    """The position a key of :func:`descending_keys` was made for."""
    return 2147483647 - (key - ((key >> 32) << 32))


@triton.jit
def _topk_kernel(s_ptr, out_ptr, Bsz, N, K, s_sb, s_sn, s_ob, s_ok,
                 ROWS: tl.constexpr, LOG_N: tl.constexpr):
    BLOCK_N: tl.constexpr = 2**LOG_N
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < Bsz
    rows = rows.to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (offs[None, :] < N)
    s = tl.load(s_ptr + rows[:, None] * s_sb + offs[None, :] * s_sn, mask=mask, other=0.0).to(tl.float32)
    key = descending_keys(s, offs[None, :], mask)
    top = sort_keys_descending(key, offs, ROWS, LOG_N)
    idx = key_index(top)
    tl.store(out_ptr + rows[:, None] * s_ob + offs[None, :] * s_ok, idx, mask=row_ok[:, None] & (offs[None, :] < K))


def rows_per_program(kernel, rows: int, row_block: int) -> int:
    """How many of ``rows`` rows (each padded to ``row_block``) one program of ``kernel`` sorts:
    interpreted, as few programs as possible; on a GPU enough programs to fill it (~128), short rows
    packed up to :data:`MAX_ELEMENTS` a program."""
    if is_interpreted(kernel):
        return block(rows, 1, max(1, MAX_ELEMENTS_INTERPRETED // row_block))
    return block(triton.cdiv(rows, 128), 1, max(1, MAX_ELEMENTS // row_block))


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row of ``scores[B, N]``, highest first;
    ties go to the lower index. Rows longer than 4096 use the torch reference."""
    if scores.dim() != 2:
        raise ValueError(f"topk_indices expects scores[B, N], got {tuple(scores.shape)}")
    k = int(k)
    if k < 0:
        raise ValueError(f"topk_indices: k={k} must be >= 0")
    Bsz, N = scores.shape
    k = min(k, N)
    if N > MAX_ROW:
        return reference.topk_indices(scores, k)
    kernel = _topk_kernel
    check_launchable(kernel, scores)
    scores = as_native(scores)
    out = torch.empty((Bsz, k), dtype=torch.int64, device=scores.device)
    if Bsz == 0 or k == 0:
        return out
    BLOCK_N = block(N, 16, MAX_ROW)
    ROWS = rows_per_program(kernel, Bsz, BLOCK_N)
    num_warps = min(8, max(1, ROWS * BLOCK_N // 256))
    with device_guard(scores):
        kernel[(triton.cdiv(Bsz, ROWS),)](
            scores, out, Bsz, N, k, scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
            ROWS=ROWS, LOG_N=BLOCK_N.bit_length() - 1, num_warps=num_warps,
        )
    return out
