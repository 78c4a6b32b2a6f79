"""Small helpers shared by the Triton kernels: launch checks, block sizes, device guard."""
import contextlib

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


#: Under the interpreter ``tl.dot`` is ``numpy.matmul``, whose BLAS kernel may round an output
#: element differently depending on where it sits in the tile, so duplicate tokens would stop being
#: exact ties. Interpreted, the kernels therefore accumulate their dot products in float64 and round
#: once to float32 (identical inputs then give identical results, as the GPU's FMA dot does);
#: tests set this to True to run the float32 ``tl.dot`` path of the GPU interpreted as well.
INTERPRETER_FP32_DOT = False


def dot_dtype(kernel):
    """Accumulator dtype of the kernels' ``tl.dot``: float32 (IEEE) on a GPU, see above otherwise."""
    return tl.float32 if not is_interpreted(kernel) or INTERPRETER_FP32_DOT else tl.float64
