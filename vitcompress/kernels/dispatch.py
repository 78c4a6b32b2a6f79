"""The methods and the apply path reach the fused primitives only through here.

By default (``VITCOMPRESS_KERNELS`` unset or ``auto``) a CUDA tensor goes to the fused Triton
kernel and anything else to the torch reference. ``VITCOMPRESS_KERNELS=torch`` forces the
references; ``VITCOMPRESS_KERNELS=triton`` forces the kernels (on CPU tensors that needs Triton's
interpreter, ``TRITON_INTERPRET=1``, set before the kernels are first used) and raises if they
cannot be loaded. The Triton modules are imported lazily, on the first call that wants them, so
a machine without Triton (or whose Triton fails to import) runs the references unchanged.

While ``torch.compile`` traces, the kernels it would use eagerly enter the graph as the custom ops
of :mod:`.ops` (``torch.ops.vitcompress.*``, with fake implementations for tracing); eagerly the
kernels are called directly. While any other capture runs (``torch.export``, ``torch.jit.trace``,
ONNX export) the references run whatever the setting, so that an exported graph holds only
standard ops.
"""
import os
import warnings

import torch

from . import ops, reference
from .capture import capturing

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
            from .apply_triton import apply_plan
            from .bipartite_triton import bipartite_match
            from .energy_triton import energy_score
            from .pagerank_triton import pagerank_scores, pagerank_steps
            from .plan_triton import rank_plan
            from .topk_triton import topk_indices
        except Exception as exc:  # no triton, or a triton that cannot initialise here
            _load_error = exc
        else:
            for name, fn in (("bipartite_match", bipartite_match), ("energy_score", energy_score),
                             ("topk_indices", topk_indices), ("pagerank_steps", pagerank_steps),
                             ("pagerank_scores", pagerank_scores), ("rank_plan", rank_plan),
                             ("apply_plan", apply_plan)):
                _TRITON.setdefault(name, fn)
    return _TRITON


def triton_available() -> bool:
    """Whether the fused kernels could be loaded on this machine."""
    return bool(_load_triton())


@torch.compiler.assume_constant_result
def _triton_loaded() -> bool:
    """:func:`triton_available` as a constant of a traced graph (Dynamo does not trace the import)."""
    return triton_available()


def _compiling() -> bool:
    """``torch.compile`` tracing (and not ``torch.export``, whose graphs keep standard ops only)."""
    compiler = torch.compiler
    return compiler.is_compiling() and not (hasattr(compiler, "is_exporting") and compiler.is_exporting())


def _torch_is_faster(name: str, tensor) -> bool:
    """Shapes where the torch reference measured faster on a GPU (H200, experiments/benchmarks/bench_kernels.py):
    float32 energy beyond 256 tokens (0.66x at 576) and top-k of rows beyond 1024 (0.33x at 4096)."""
    if name == "energy_score":
        return tensor.dtype == torch.float32 and tensor.shape[-2] > 256
    if name == "topk_indices":
        return tensor.shape[-1] > 1024
    return False


def _pick(name: str, tensor):
    choice = backend()
    if choice == "torch":
        return getattr(reference, name)
    wanted = choice == "triton" or (tensor.is_cuda and not _torch_is_faster(name, tensor))
    if not wanted:
        return getattr(reference, name)
    if capturing():
        if _compiling() and _triton_loaded():
            return ops.OPS[name]  # the kernel as a custom op the compiled graph calls
        if choice == "triton" and _compiling():
            _fail(name)
        return getattr(reference, name)
    fused = _load_triton().get(name)
    if fused is not None:
        return fused
    if choice == "triton":
        _fail(name)
    if _load_error is not None and not getattr(_pick, "_warned", False):
        _pick._warned = True
        warnings.warn(f"vitcompress.kernels: Triton kernels unavailable ({_load_error!r}); "
                      "using the torch references", RuntimeWarning)
    return getattr(reference, name)


def _fail(name: str):
    raise RuntimeError(f"VITCOMPRESS_KERNELS=triton but no Triton kernel for {name!r} is available"
                       + (f": importing it failed with {_load_error!r}" if _load_error else ""))


def bipartite_match(a, b, a_idx=None, b_idx=None):
    """Row-wise cosine max / argmax of ``a`` (rows ``a_idx``) against ``b`` (rows ``b_idx``)."""
    return _pick("bipartite_match", a)(a, b, a_idx, b_idx)


def energy_score(x, margin, alpha=1.0):
    return _pick("energy_score", x)(x, margin, alpha)


def topk_indices(scores, k):
    return _pick("topk_indices", scores)(scores, k)


def rank_plan(score, match, r, a_idx, b_idx, sort_unmerged=False, b_first=False):
    """A bipartite match ranked into ``(keep, src, dst)`` (:func:`.reference.rank_plan`)."""
    return _pick("rank_plan", score)(score, match, r, a_idx, b_idx, sort_unmerged, b_first)


def pagerank_steps(attn, init, iters, alive=None):
    return _pick("pagerank_steps", attn)(attn, init, iters, alive)


def pagerank_scores(attn, iters, num_prefix, cls_sqrt=True, alive=None, var_min=0.01, var_max=0.7,
                    head_filter=True, aggregate="rms"):
    """Zero-TPrune's importance score in one call (:func:`.reference.pagerank_scores`)."""
    return _pick("pagerank_scores", attn)(attn, iters, num_prefix, cls_sqrt, alive, var_min, var_max,
                                          head_filter, aggregate)


def apply_plan(x, size, keep, merge_src=None, merge_dst=None, num_prefix=0, log_size=False):
    """A plan executed on ``x`` and its sizes: ``(new x, new sizes, their log or None)``
    (:func:`.reference.apply_plan`)."""
    return _pick("apply_plan", x)(x, size, keep, merge_src, merge_dst, num_prefix, log_size)


def apply_weighted_plan(x, size, keep, merge_src, merge_dst, weight, num_prefix=0, log_size=False):
    """A plan whose outputs are weighted sums (:func:`.reference.apply_weighted_plan`). No Triton
    kernel knows the weights: the torch reference runs on every device."""
    return reference.apply_weighted_plan(x, size, keep, merge_src, merge_dst, weight, num_prefix, log_size)


def merged_norms(x, merged, keep, merge_src, merge_dst, num_prefix=0, how="max"):
    """A merge's norms set by ``how`` (:func:`.reference.merged_norms`). No fused kernel: the torch
    reference on every device, run after :func:`apply_plan` (whose kernel computes the average)."""
    return reference.merged_norms(x, merged, keep, merge_src, merge_dst, num_prefix, how)
