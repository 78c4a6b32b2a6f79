"""The Triton kernels as PyTorch custom ops (``torch.ops.vitcompress.*``), so that a graph being
compiled (``torch.compile``, including ``mode="reduce-overhead"``'s CUDA graphs) calls them instead
of tracing the torch references.

Each op has a fake (meta) implementation giving its output shapes, so Dynamo and Inductor trace
through it without running it; its real implementation imports the Triton kernel on first use
(this module imports no Triton, so registering the ops costs nothing where Triton is missing).
Eagerly, :mod:`.dispatch` calls the kernels directly (an op call adds dispatcher overhead); it
picks these ops only while ``torch.compile`` traces. ``torch.export`` / ONNX export keep the
references, so an exported graph needs no vitcompress to run.

Ops return fresh tensors only (no aliasing of inputs), and optional outputs are split into ops of
their own (``apply_plan`` / ``apply_plan_sum``), as custom ops require.
"""
from typing import List, Optional, Tuple

import torch
from torch.library import custom_op

Tensor = torch.Tensor


@custom_op("vitcompress::bipartite_match", mutates_args=())
def bipartite_match(a: Tensor, b: Tensor, a_idx: Optional[Tensor], b_idx: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    from .bipartite_triton import bipartite_match as kernel
    return kernel(a, b, a_idx, b_idx)


@bipartite_match.register_fake
def _(a, b, a_idx, b_idx):
    na = a.shape[1] if a_idx is None else a_idx.shape[1]
    return (a.new_empty((a.shape[0], na), dtype=torch.float32), a.new_empty((a.shape[0], na), dtype=torch.int64))


@custom_op("vitcompress::energy_score", mutates_args=())
def energy_score(x: Tensor, margin: float, alpha: float) -> Tensor:
    from .energy_triton import energy_score as kernel
    return kernel(x, margin, alpha)


@energy_score.register_fake
def _(x, margin, alpha):
    return x.new_empty(x.shape[:2], dtype=torch.float32)


@custom_op("vitcompress::topk_indices", mutates_args=())
def topk_indices(scores: Tensor, k: int) -> Tensor:
    from .topk_triton import topk_indices as kernel
    return kernel(scores, k)


@topk_indices.register_fake
def _(scores, k):
    return scores.new_empty((scores.shape[0], min(max(k, 0), scores.shape[1])), dtype=torch.int64)


@custom_op("vitcompress::rank_plan", mutates_args=())
def rank_plan(score: Tensor, match: Optional[Tensor], r: int, a_idx: Tensor, b_idx: Tensor, sort_unmerged: bool,
              b_first: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from .plan_triton import rank_plan as kernel
    keep, src, dst = kernel(score, match, r, a_idx, b_idx, sort_unmerged, b_first)
    return keep, src, (dst if dst is not None else src.new_empty((src.shape[0], 0)))


@rank_plan.register_fake
def _(score, match, r, a_idx, b_idx, sort_unmerged, b_first):
    B, na = score.shape
    new = score.new_empty
    return (new((B, na - r + b_idx.shape[1]), dtype=torch.int64), new((B, r), dtype=torch.int64),
            new((B, r if match is not None else 0), dtype=torch.int64))


@custom_op("vitcompress::pagerank_steps", mutates_args=())
def pagerank_steps(attn: Tensor, init: Tensor, iters: int, alive: Optional[Tensor]) -> Tensor:
    from .pagerank_triton import pagerank_steps as kernel
    return kernel(attn, init, iters, alive)


@pagerank_steps.register_fake
def _(attn, init, iters, alive):
    return attn.new_empty(attn.shape[:2], dtype=torch.float32)


@custom_op("vitcompress::pagerank_scores", mutates_args=())
def pagerank_scores(attn: Tensor, iters: int, num_prefix: int, cls_sqrt: bool, alive: Optional[Tensor],
                    var_min: float, var_max: float, head_filter: bool, aggregate: str) -> Tensor:
    from .pagerank_triton import pagerank_scores as kernel
    return kernel(attn, iters, num_prefix, cls_sqrt, alive, var_min, var_max, head_filter, aggregate)


@pagerank_scores.register_fake
def _(attn, iters, num_prefix, cls_sqrt, alive, var_min, var_max, head_filter, aggregate):
    k = attn.shape[-1] - num_prefix if alive is None else alive.shape[1]
    return attn.new_empty((attn.shape[0], k), dtype=torch.float32)


@custom_op("vitcompress::apply_plan", mutates_args=())
def apply_plan(x: Tensor, size: Tensor, keep: Tensor, merge_src: Optional[Tensor], merge_dst: Optional[Tensor],
               num_prefix: int, log_size: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from .apply_triton import apply_plan as kernel
    out, new_size, log = kernel(x, size, keep, merge_src, merge_dst, num_prefix, log_size)
    return out, new_size, (log if log is not None else x.new_empty((x.shape[0], 0, 1)))


@apply_plan.register_fake
def _(x, size, keep, merge_src, merge_dst, num_prefix, log_size):
    rows = num_prefix + keep.shape[1]
    return (x.new_empty((x.shape[0], rows, x.shape[2])), size.new_empty((x.shape[0], rows, 1)),
            x.new_empty((x.shape[0], rows if log_size else 0, 1)))


@custom_op("vitcompress::apply_plan_sum", mutates_args=())
def apply_plan_sum(x: Tensor, keep: Tensor, merge_src: Optional[Tensor], merge_dst: Optional[Tensor],
                   num_prefix: int) -> Tensor:
    from .apply_triton import apply_plan as kernel
    return kernel(x, None, keep, merge_src, merge_dst, num_prefix)[0]


@apply_plan_sum.register_fake
def _(x, keep, merge_src, merge_dst, num_prefix):
    return x.new_empty((x.shape[0], num_prefix + keep.shape[1], x.shape[2]))


#: dispatch name -> the op's Python entry point, with the primitive's own signature
def _apply_plan(x, size, keep, merge_src=None, merge_dst=None, num_prefix=0, log_size=False):
    if size is None:
        return apply_plan_sum(x, keep, merge_src, merge_dst, num_prefix), None, None
    out, new_size, log = apply_plan(x, size, keep, merge_src, merge_dst, num_prefix, bool(log_size))
    return out, new_size, (log if log_size else None)


def _rank_plan(score, match, r, a_idx, b_idx, sort_unmerged=False, b_first=False):
    keep, src, dst = rank_plan(score, match, r, a_idx, b_idx, sort_unmerged, b_first)
    return keep, src, (dst if match is not None else None)


def _bipartite_match(a, b, a_idx=None, b_idx=None):
    return bipartite_match(a, b, a_idx, b_idx)


def _energy_score(x, margin, alpha=1.0):
    return energy_score(x, float(margin), float(alpha))


def _pagerank_steps(attn, init, iters, alive=None):
    return pagerank_steps(attn, init, iters, alive)


def _pagerank_scores(attn, iters, num_prefix, cls_sqrt=True, alive=None, var_min=0.01, var_max=0.7,
                     head_filter=True, aggregate="rms"):
    return pagerank_scores(attn, iters, num_prefix, cls_sqrt, alive, float(var_min), float(var_max), head_filter,
                           aggregate)


def implementation(qualname: str):
    """The Python function behind the op ``qualname`` (``"vitcompress::apply_plan"``), or None:
    lets ``experiments/benchmarks/count_launches.py`` count what an op launches inside."""
    opdef = globals().get(qualname.split("::")[-1])
    return getattr(opdef, "_init_fn", None) if qualname.startswith("vitcompress::") else None


OPS = {
    "bipartite_match": _bipartite_match, "energy_score": _energy_score, "topk_indices": topk_indices,
    "rank_plan": _rank_plan, "pagerank_steps": _pagerank_steps, "pagerank_scores": _pagerank_scores,
    "apply_plan": _apply_plan,
}
NAMES: List[str] = sorted(OPS)
