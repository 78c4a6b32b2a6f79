"""ExecuTorch: the ``torch.export`` program lowered to a ``.pte`` with the XNNPACK backend, after
rewriting the ops its runtime lacks (sort) or XNNPACK does not delegate (attention, layer norm)."""
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..interfaces import runtime_of
from .checks import check_exportable, check_output_path, checked_input_shape
from .program import Inference, export_program


def _sort_by_ranks(x: torch.Tensor, stable: Optional[bool] = None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` from core ATen ops, for ExecuTorch (whose runtime has no sort kernel):
    element i goes to position ``#{j: x_j before x_i} + #{j < i: x_j == x_i}``, which is exactly
    the stable order. O(n^2) compares per row: cheap for a few hundred tokens."""
    rows = x.movedim(dim, -1)
    n = rows.shape[-1]
    mine, other = rows.unsqueeze(-1), rows.unsqueeze(-2)  # [..., i, 1], [..., 1, j]
    order = torch.arange(n, device=x.device)
    earlier = order.view(1, n) < order.view(n, 1)  # j < i
    ahead = (other > mine) if descending else (other < mine)
    rank = (ahead | ((other == mine) & earlier)).sum(-1)
    indices = torch.zeros_like(rank).scatter(-1, rank, order.expand_as(rank))
    return rows.gather(-1, indices).movedim(-1, dim), indices.movedim(-1, dim)


def _op_name(target) -> str:
    """``aten.gather.default`` for an ATen or ExecuTorch edge op overload."""
    name = getattr(target, "__name__", None) or str(target)
    return name if name.startswith("aten.") else f"aten.{name}"


def _attention_for_xnnpack(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                           scale: Optional[float] = None, enable_gqa: bool = False):
    """``aten.scaled_dot_product_attention`` as matmul, multiply by a tensor, softmax, matmul: ops
    the XNNPACK partitioner delegates. torch's own decomposition uses a "safe" softmax (``eq``,
    ``any``, ``where`` for fully masked rows) and a scalar multiply that XNNPACK does not take, so
    every block's attention ran in ExecuTorch's single-threaded portable kernels. An image model
    never masks a whole row."""
    if dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("export_executorch: attention with dropout, a causal mask or grouped heads")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * torch.tensor(scale, dtype=query.dtype)
    if attn_mask is not None:
        scores = (scores.masked_fill(attn_mask.logical_not(), float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    return torch.matmul(scores.softmax(-1), value)


def _layer_norm_for_xnnpack(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5, cudnn_enable=True):
    """``aten.layer_norm`` over the last dimension from mean, subtract, multiply, rsqrt: XNNPACK
    has no layer norm, and ExecuTorch's portable one cut each block's delegated graph in pieces."""
    if len(normalized_shape) != 1:
        raise NotImplementedError("export_executorch: layer norm over more than the last dimension")
    centered = x - x.mean(-1, keepdim=True)
    out = centered * torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


@dataclass
class ExecuTorchReport:
    """What :func:`export_executorch` wrote and how ExecuTorch's runtime compares with PyTorch:
    ``checks`` maps ``"random, batch N"`` to ``max_abs_diff``; ``portable_ops`` counts the ops left
    to ExecuTorch's portable (single-threaded) kernels, views and copies included."""

    path: str
    input_shape: Tuple[int, ...]
    method: Optional[str]
    delegated: int
    portable_ops: Dict[str, int] = field(default_factory=dict)
    checks: Dict[str, float] = field(default_factory=dict)
    atol: float = 1e-4
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max(self.checks.values(), default=float("nan"))

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol

    def __str__(self) -> str:
        out = [f"wrote {self.path}: input {list(self.input_shape)}, method {self.method or 'none (uncompressed)'}, "
               f"{self.delegated} subgraphs delegated to XNNPACK",
               "outside XNNPACK: " + (", ".join(f"{op} x{n}" for op, n in self.portable_ops.items()) or "nothing")]
        out += [f"executorch vs PyTorch, {name}: max abs diff {diff:.3g}" for name, diff in self.checks.items()]
        out.append(f"{'OK' if self.ok else 'MISMATCH'}: max abs diff {self.max_abs_diff:.3g} (atol {self.atol:g}); "
                   f"{self.seconds:.0f} s")
        return "\n".join(out)


def export_executorch(model: nn.Module, path: str, input_shape: Sequence[int] = (1, 3, 224, 224), *,
                      max_batch: int = 16, check_batches: Optional[Sequence[int]] = None, atol: float = 1e-4,
                      verbose: bool = True) -> ExecuTorchReport:
    """Lower a (compressed) image model to an ExecuTorch ``.pte`` at ``path`` and check it.

    The ``torch.export`` program (:func:`export_program`, batch dynamic up to ``max_batch``: the
    runtime plans its memory for the largest batch) is lowered with the XNNPACK partitioner; the
    sorts that rank tokens are rewritten into core ATen compares (:func:`_sort_by_ranks`, a stable
    sort), since the runtime has no sort kernel; attention and layer norm into ops XNNPACK
    delegates (:func:`_attention_for_xnnpack`, :func:`_layer_norm_for_xnnpack`). Then ExecuTorch's Python runtime runs the file on random
    inputs at ``check_batches`` (default 1 and ``input_shape``'s batch, or 2) against PyTorch.
    Needs ``pip install executorch`` (see the ``edge`` extra).
    """
    start = time.perf_counter()
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
    except ImportError as err:
        raise ImportError("export_executorch needs executorch: pip install executorch (see the README)") from err
    check_exportable(model)
    shape = checked_input_shape(input_shape)
    if not isinstance(max_batch, int) or max_batch < max(2, shape[0]):
        raise ValueError(f"max_batch={max_batch!r}: give an int >= {max(2, shape[0])} (the example batch)")
    if not str(path).endswith(".pte"):
        raise ValueError(f"{path}: ExecuTorch programs are .pte files; give e.g. model.pte")
    check_output_path(path)
    program = export_program(model, shape, max_batch=max_batch)
    program = program.run_decompositions({
        torch.ops.aten.sort.stable: _sort_by_ranks,
        torch.ops.aten.sort.default: lambda x, dim=-1, descending=False: _sort_by_ranks(x, True, dim, descending),
        torch.ops.aten.scaled_dot_product_attention.default: _attention_for_xnnpack,
        torch.ops.aten.layer_norm.default: _layer_norm_for_xnnpack})
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    with open(path, "wb") as f:
        f.write(lowered.buffer)
    calls = [node for node in lowered.exported_program().graph.nodes if node.op == "call_function"]
    delegated = sum(1 for node in calls if "executorch_call_delegate" in str(node.target))
    portable = Counter(_op_name(node.target) for node in calls if isinstance(node.target, torch._ops.OpOverload)
                       or "EdgeOpOverload" in type(node.target).__name__)
    method = runtime_of(model)
    report = ExecuTorchReport(path=str(path), input_shape=shape, method=None if method is None else method.method.name,
                              delegated=delegated, portable_ops=dict(portable.most_common()), atol=atol)
    forward = Runtime.get().load_program(str(path)).load_method("forward")
    generator = torch.Generator().manual_seed(0)
    with Inference(model), torch.no_grad():
        for b in check_batches or sorted({1, max(2, shape[0])}):
            x = torch.randn((b,) + shape[1:], generator=generator)
            out = forward.execute([x])[0]
            ref = model(x)
            if out.shape != ref.shape:
                raise RuntimeError(f"ExecuTorch returned {tuple(out.shape)} for batch {b}; PyTorch {tuple(ref.shape)}")
            report.checks[f"random, batch {b}"] = (out - ref).abs().max().item()
    report.seconds = time.perf_counter() - start
    if verbose:
        print(report)
    if not report.ok:
        warnings.warn(f"{path}: ExecuTorch differs from PyTorch by {report.max_abs_diff:.3g} > {atol:g}",
                      RuntimeWarning)
    return report
