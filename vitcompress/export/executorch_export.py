"""ExecuTorch: the ``torch.export`` program lowered to a ``.pte`` with the XNNPACK backend, after
rewriting the ops its runtime lacks (sort) or XNNPACK does not delegate (attention, layer norm,
means, norms, ELU) and the token gathers and merges ExecuTorch would run element by element in its
single-threaded portable kernels. The rewrites apply to the exported program only: the model's
eager forward is untouched."""
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..interfaces import runtime_of
from .checks import check_exportable, check_output_path, checked_input_shape
from .passes import ROW_DECOMPOSITIONS, drop_copies
from .program import Inference, export_program


def _sort_by_ranks(x: torch.Tensor, stable: Optional[bool] = None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` from ops XNNPACK delegates, for ExecuTorch (whose runtime has no sort
    kernel): element i goes to position ``rank_i = #{j: x_j before x_i} + #{j < i: x_j == x_i}``,
    exactly the stable order. The compares are ``ceil(clamp(x_j - x_i, 0, 1))`` (1 where the
    difference is positive; infinities clamped to the largest float first, integers exact below
    2^24, NaN unsupported), the counts :func:`_integer_row_sums`, and the permutation the one-hot
    matrix ``relu(1 - |rank_i - p|)``; only the conversion of the positions to integers and the
    gather of the values run outside XNNPACK. O(n^2) per row: cheap for a few hundred tokens."""
    last = dim in (-1, x.dim() - 1)
    rows = x if last else x.movedim(dim, -1)
    shape, n = rows.shape, rows.shape[-1]
    largest = torch.finfo(torch.float32).max
    flat = rows.reshape(-1, n).to(torch.float32).clamp(-largest, largest)
    order = torch.arange(n, device=x.device, dtype=torch.float32)
    earlier = torch.ceil(torch.clamp(order.view(n, 1) - order.view(1, n), 0, 1))  # [i, j]: j < i
    diff = flat.view(-1, 1, n) - flat.view(-1, n, 1)  # [., i, j]: x_j - x_i
    ahead = torch.ceil(torch.clamp(diff if descending else -diff, 0, 1))
    tie = 1.0 - torch.ceil(torch.clamp(diff.abs(), 0, 1))
    rank = _integer_row_sums(ahead + tie * earlier).view(-1, n, 1)  # [., i, 1]
    one_hot = torch.relu(1.0 - (rank - order.view(1, 1, n)).abs())  # [., i, position]
    placed = _integer_row_sums((one_hot * order.view(1, n, 1)).transpose(1, 2))  # [., position]
    indices = placed.reshape(shape).to(torch.int64)
    values = rows.gather(-1, indices)
    return (values, indices) if last else (values.movedim(-1, dim), indices.movedim(-1, dim))


def _integer_row_sums(t: torch.Tensor) -> torch.Tensor:
    """Sums over the last dimension of small non-negative integers held as floats, exactly, from
    ops XNNPACK delegates: the mean as a global average pooling, times the count, rounded."""
    n = t.shape[-1]
    mean = t.reshape(1, -1, 1, n).mean((2, 3), keepdim=True).reshape(t.shape[:-1])
    return torch.floor(mean * float(n) + 0.5)


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


def _mean_for_xnnpack(x: torch.Tensor, dim, keepdim: bool = False, dtype=None):
    """``aten.mean`` over one dimension as XNNPACK's global average pooling, the only mean it
    delegates (a 4-D tensor over its last two dimensions): the reduced dimension moved last and the
    rest flattened, ``[1, M, 1, L]``. The layer norms' and the token metrics' means ran in portable
    kernels."""
    dims = [dim] if isinstance(dim, int) else list(dim or [])
    if len(dims) != 1 or dtype is not None or x.dim() < 2:
        return NotImplemented
    d = dims[0] % x.dim()
    moved = x.movedim(d, -1)
    pooled = moved.reshape(1, -1, 1, moved.shape[-1]).mean((2, 3), keepdim=True)
    out = pooled.reshape(moved.shape[:-1])
    return out.unsqueeze(d) if keepdim else out


def _same_shape_expand(x: torch.Tensor, size, implicit: bool = False):
    """``aten.expand`` to the shape ``x`` already has (matmul's broadcasting of equal batch shapes)
    as ``x`` itself: ExecuTorch would copy it."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if len(size) != x.dim() or not all(s == -1 or statically_known_true(s == n) for s, n in zip(size, x.shape)):
        return NotImplemented
    return x.view(x.shape)


def _matmul_as_bmm(a: torch.Tensor, b: torch.Tensor):
    """``aten.matmul`` of operands with the same batch dimensions (attention, the token
    similarities) as one ``bmm`` on their flattened batch: matmul's own decomposition broadcasts
    with ``expand``, copies ExecuTorch runs outside XNNPACK."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if a.dim() < 3 or a.dim() != b.dim() or not all(statically_known_true(m == n)
                                                    for m, n in zip(a.shape[:-2], b.shape[:-2])):
        return NotImplemented
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.reshape(*a.shape[:-1], b.shape[-1])


def _vector_norm_for_xnnpack(x: torch.Tensor, ord=2, dim=None, keepdim: bool = False, *, dtype=None):
    """The 2-norm over one dimension (``F.normalize`` of the token similarities) as
    ``sqrt(mean(x * x) * n)``: XNNPACK takes neither a float power nor a sum."""
    dims = [dim] if isinstance(dim, int) else list(dim or [])
    if ord != 2 or len(dims) != 1 or dtype is not None:
        return NotImplemented
    n = x.shape[dims[0]]
    return torch.sqrt(_mean_for_xnnpack(x * x, dims[0], keepdim) * float(n))


def _elu_for_xnnpack(x: torch.Tensor, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0):
    """``aten.elu`` (PiToMe's energy over every ``[T, T]`` similarity) as ``relu(x) + alpha *
    (exp(min(x, 0)) - 1)``: ops XNNPACK delegates, where ExecuTorch's partitioner leaves ``elu``
    itself to a single-threaded portable kernel."""
    if scale != 1.0 or input_scale != 1.0:
        return NotImplemented
    return torch.relu(x) + alpha * (torch.exp(torch.clamp(x, max=0.0)) - 1.0)


def program_for_xnnpack(program):
    """The rewrites above applied to a ``torch.export`` program, at export time only (the model's
    eager forward is untouched): what :func:`export_executorch` lowers."""
    program = program.run_decompositions({
        **ROW_DECOMPOSITIONS,
        torch.ops.aten.sort.stable: _sort_by_ranks,
        torch.ops.aten.sort.default: lambda x, dim=-1, descending=False: _sort_by_ranks(x, True, dim, descending),
        # argsort decomposes to a sort after this table is read (atc's argsort of its alive tokens)
        torch.ops.aten.argsort.stable: lambda x, *, stable, dim=-1, descending=False: _sort_by_ranks(
            x, stable, dim, descending)[1],
        torch.ops.aten.scaled_dot_product_attention.default: _attention_for_xnnpack,
        torch.ops.aten.layer_norm.default: _layer_norm_for_xnnpack,
        torch.ops.aten.mean.dim: _mean_for_xnnpack,
        torch.ops.aten.expand.default: _same_shape_expand,
        torch.ops.aten.matmul.default: _matmul_as_bmm,
        torch.ops.aten.linalg_vector_norm.default: _vector_norm_for_xnnpack,
        torch.ops.aten.elu.default: _elu_for_xnnpack})
    drop_copies(program)
    return program


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
    runtime plans its memory for the largest batch) is rewritten by :func:`program_for_xnnpack` and
    lowered with the XNNPACK partitioner: sorts become compares counted and applied by matmuls
    (:func:`_sort_by_ranks`, a stable sort; the runtime has no sort kernel), attention and layer
    norm ops XNNPACK delegates, the token gathers one ``index_select`` of whole rows and the merge's
    sum a one-hot batched matmul (no expanded index), means global average poolings and
    matmuls ``bmm`` without broadcasting copies. What stays outside XNNPACK is listed in
    ``portable_ops``: per reducing block mostly small operations on ``[B, N]`` index tensors. Then
    ExecuTorch's Python runtime runs the file on random inputs at ``check_batches`` (default 1 and
    ``input_shape``'s batch, or 2) against PyTorch.
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
    program = program_for_xnnpack(export_program(model, shape, max_batch=max_batch))
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
