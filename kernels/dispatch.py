"""The methods reach the similarity / top-k primitives only through here.

By default (``VITCOMPRESS_KERNELS`` unset or ``auto``) a CUDA tensor goes to the fused Triton
kernel and anything else to the torch reference. ``VITCOMPRESS_KERNELS=torch`` forces the
references; ``VITCOMPRESS_KERNELS=triton`` forces the kernels (on CPU tensors that needs Triton's
interpreter, ``TRITON_INTERPRET=1``, set before the kernels are first used) and raises if they
cannot be loaded. The Triton modules are imported lazily, on the first call that wants them, so
a machine without Triton (or whose Triton fails to import) runs the references unchanged.

While a graph is being captured (``torch.compile`` / ``torch.export``, ``torch.jit.trace``,
ONNX export) the references run whatever the setting: a Triton kernel launched from Python
cannot be recorded in the graph, and the references express the same computation in torch ops.
"""
import os
import warnings

import torch

from vitcompress.capture import capturing

from . import reference

#: name -> fused implementation; filled on first use by :func:`_load_triton`.
_TRITON = {}
_load_error = None
_loaded = False


def backend() -> str:
    choice = os.environ.get("VITCOMPRESS_KERNELS", "auto").lower()
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"VITCOMPRESS_KERNELS={choice!r}: use 'torch', 'triton' or leave it unset")
    return choice


def _load_triton() -> dict:
    """Import the Triton kernels once; remember why if that fails."""
    global _loaded, _load_error
    if not _loaded:
        _loaded = True
        try:
            from .bipartite_triton import bipartite_match
            from .energy_triton import energy_score
            from .pagerank_triton import pagerank_steps
            from .topk_triton import topk_indices
        except Exception as exc:  # no triton, or a triton that cannot initialise here
            _load_error = exc
        else:
            for name, fn in (("bipartite_match", bipartite_match), ("energy_score", energy_score),
                             ("topk_indices", topk_indices), ("pagerank_steps", pagerank_steps)):
                _TRITON.setdefault(name, fn)
    return _TRITON


def triton_available() -> bool:
    """Whether the fused kernels could be loaded on this machine."""
    return bool(_load_triton())


def _torch_is_faster(name: str, tensor) -> bool:
    """Shapes where the torch reference measured faster on a GPU (H200, experiments/bench_kernels.py):
    float32 energy beyond 256 tokens (0.66x at 576) and top-k of rows beyond 1024 (0.33x at 4096)."""
    if name == "energy_score":
        return tensor.dtype == torch.float32 and tensor.shape[-2] > 256
    if name == "topk_indices":
        return tensor.shape[-1] > 1024
    return False


def _pick(name: str, tensor):
    choice = backend()
    if choice == "torch" or capturing():
        return getattr(reference, name)
    if choice == "triton":
        fused = _load_triton().get(name)
        if fused is None:
            raise RuntimeError(f"VITCOMPRESS_KERNELS=triton but no Triton kernel for {name!r} is available"
                               + (f": importing it failed with {_load_error!r}" if _load_error else ""))
        return fused
    if tensor.is_cuda and not _torch_is_faster(name, tensor):
        fused = _load_triton().get(name)
        if fused is not None:
            return fused
        if _load_error is not None and not getattr(_pick, "_warned", False):
            _pick._warned = True
            warnings.warn(f"vitcompress.kernels: Triton kernels unavailable ({_load_error!r}); "
                          "using the torch references", RuntimeWarning)
    return getattr(reference, name)


def bipartite_match(a, b):
    return _pick("bipartite_match", a)(a, b)


def energy_score(x, margin, alpha=1.0):
    return _pick("energy_score", x)(x, margin, alpha)


def topk_indices(scores, k):
    return _pick("topk_indices", scores)(scores, k)


def pagerank_steps(attn, init, iters, alive=None):
    return _pick("pagerank_steps", attn)(attn, init, iters, alive)
