"""Whether a graph is being captured, for the code paths that must then stay plain torch ops."""
import torch


def capturing() -> bool:
    """Whether a graph is being captured (``torch.compile`` / ``torch.export``, ``torch.jit``,
    ONNX export): then only torch ops, and no Python loop over a symbolic size, may run."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return True
    onnx = getattr(torch, "onnx", None)
    return bool(onnx is not None and hasattr(onnx, "is_in_onnx_export") and onnx.is_in_onnx_export())
