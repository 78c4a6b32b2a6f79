"""Small helpers shared by the Triton kernels: launch checks, block and tile sizes, device guard,
and the cosine similarities of the kernels that compare tokens (bipartite matching, energy)."""
import contextlib
from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

#: dtypes the kernels read directly; anything else is converted to float32 first (as the
#: references do with ``.float()``), so e.g. float64 inputs give the same answer on both paths.
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was built by Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def interpreter_ready() -> bool:
    """Whether Triton's own library (``tl.sum``, ``tl.max``...) was built for the interpreter.

    ``triton.jit`` decides at decoration time, so ``TRITON_INTERPRET=1`` has to be set before
    Triton is first imported -- and timm / torch import it early. Set later, our kernels would be
    interpreted but the ``tl`` functions they call would not, and the launch would fail.
    """
    return is_interpreted(tl.standard.sum)


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Fail with a message that says what to do, rather than Triton's pointer error."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"vitcompress.kernels: inputs live on different devices {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not (is_interpreted(kernel) and interpreter_ready()):
        raise RuntimeError(
            "vitcompress.kernels: the Triton kernels need GPU tensors; on the CPU they run only under "
            "Triton's interpreter: set TRITON_INTERPRET=1 in the environment before Python starts (it must "
            "be set before triton is first imported, which timm does), or use VITCOMPRESS_KERNELS=torch / "
            "leave it unset for the torch references")


def as_native(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in NATIVE_DTYPES else t.float()


def device_guard(t: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def block(n: int, lo: int, hi: int) -> int:
    """The power of two that covers ``n``, clamped to ``[lo, hi]``."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def tile_sizes(kernel, sizes: Sequence[int], limits: Sequence[int],
               interpreted_limits: Sequence[int]) -> Tuple[int, ...]:
    """The tile of ``kernel`` over ``sizes``: for each, the power of two that covers it (16 at least),
    up to ``limits`` on a GPU and to ``interpreted_limits`` under the interpreter, where every op
    costs Python overhead and fewer, larger tiles run faster."""
    caps = interpreted_limits if is_interpreted(kernel) else limits
    return tuple(block(n, 16, cap) for n, cap in zip(sizes, caps))


#: the smallest norm a cosine divides by (``F.normalize``'s default, as the references use)
NORM_EPS = tl.constexpr(1e-12)


@triton.jit
def inverse_norms(rows, mask, C, s_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``1 / max(|x_i|, NORM_EPS)`` (float32) of ``BLOCK_R`` rows (``rows[BLOCK_R, 1]``: pointers to their
    first channels, ``s_c`` apart; rows outside ``mask`` read as zeros), ``BLOCK_C`` channels at a time."""
    chan = tl.arange(0, BLOCK_C)
    sq = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + chan
        x = tl.load(rows + offs_c[None, :] * s_c, mask=mask[:, None] & (offs_c[None, :] < C), other=0.0)
        x = x.to(tl.float32)
        sq += x * x
    return 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=1)), NORM_EPS)


@triton.jit
def cosine_tile(m_rows, mask_m, inv_m, n_rows, mask_n, C, s_mc, s_nc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_C: tl.constexpr, DOT_DTYPE: tl.constexpr, NATIVE_DOT: tl.constexpr):
    """The cosines ``[BLOCK_M, BLOCK_N]`` (float32) of the rows ``m_rows`` (inverse norms ``inv_m``, from
    :func:`inverse_norms`) with the rows ``n_rows``: raw dot products by ``tl.dot`` over ``BLOCK_C``
    channel slices -- in the inputs' own half precision with ``NATIVE_DOT`` (exact products, float32
    sums, on tensor cores), else in ``DOT_DTYPE`` at IEEE precision -- scaled by both inverse norms,
    the ``n`` rows' summed in the same pass."""
    chan = tl.arange(0, BLOCK_C)
    dot = tl.zeros([BLOCK_M, BLOCK_N], dtype=DOT_DTYPE)
    sq_n = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + chan
        mask_c = offs_c[None, :] < C
        xm = tl.load(m_rows + offs_c[None, :] * s_mc, mask=mask_m[:, None] & mask_c, other=0.0)
        xn = tl.load(n_rows + offs_c[None, :] * s_nc, mask=mask_n[:, None] & mask_c, other=0.0)
        if NATIVE_DOT:
            dot = tl.dot(xm, tl.trans(xn), dot)
        else:
            dot = tl.dot(xm.to(DOT_DTYPE), tl.trans(xn.to(DOT_DTYPE)), dot, input_precision="ieee")
        xn = xn.to(tl.float32)
        sq_n += xn * xn
    inv_n = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq_n, axis=1)), NORM_EPS)
    return dot.to(tl.float32) * inv_m[:, None] * inv_n[None, :]


#: Under the interpreter ``tl.dot`` is ``numpy.matmul``, whose BLAS kernel may round an output
#: element differently depending on where it sits in the tile, so duplicate tokens would stop being
#: exact ties. Interpreted, the kernels therefore accumulate their dot products in float64 and round
#: once to float32 (identical inputs then give identical results, as the GPU's FMA dot does);
#: tests set this to True to run the float32 ``tl.dot`` path of the GPU interpreted as well.
INTERPRETER_FP32_DOT = False


def dot_dtype(kernel):
    """Accumulator dtype of the kernels' ``tl.dot``: float32 (IEEE) on a GPU, see above otherwise."""
    return tl.float32 if not is_interpreted(kernel) or INTERPRETER_FP32_DOT else tl.float64
