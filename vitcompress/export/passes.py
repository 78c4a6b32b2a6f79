"""Rewrites of an exported program that the ONNX and the ExecuTorch export apply: the gathers of
whole token rows, which ``torch.gather`` writes with an index expanded over the channels
``[B, K, C]``, as one ``index_select`` of rows of the flattened ``[B * N, C]`` tensor (ExecuTorch's
portable gather reads an index per element; onnxruntime spent longer expanding the int64 index
than gathering); the merge's ``scatter_add`` as a one-hot batched matmul (ExecuTorch only); and
graph passes that drop the copies a runtime would make of expanded or repeated tensors. Export
time only: the model's eager forward is untouched."""
import torch


def _repeated_row_index(index: torch.Tensor, t: torch.Tensor, dim) -> bool:
    """Whether a ``gather`` / ``scatter_add`` index on ``t[B, N, C]`` along the tokens picks whole
    rows: ``idx[B, K].unsqueeze(-1).expand(..., C)``, one row index repeated along the channels
    (stride 0 there, or a single channel)."""
    return (t.dim() == 3 and index.dim() == 3 and dim in (1, -2) and index.shape[-1] == t.shape[-1]
            and (index.shape[-1] == 1 or index.stride(-1) == 0))


def _flat_rows(index: torch.Tensor, rows_per_batch) -> torch.Tensor:
    """The rows ``index[B, K, 0]`` of each batch element as row numbers of the flattened
    ``[B * rows_per_batch, C]`` tensor, ``[B * K]``."""
    batch = torch.arange(index.shape[0], device=index.device).unsqueeze(1)
    return (index.select(-1, 0) + batch * rows_per_batch).reshape(-1)


def gather_rows(t: torch.Tensor, dim: int, index: torch.Tensor, sparse_grad: bool = False):
    """``aten.gather`` of whole token rows as one ``index_select`` on the flattened rows (ONNX
    ``Gather``): ExecuTorch's portable gather reads an index per element, from an expanded
    ``[B, K, C]`` copy of it, which onnxruntime took longer to expand than to gather."""
    if not _repeated_row_index(index, t, dim):
        return NotImplemented
    B, N, C = t.shape
    return t.reshape(B * N, C).index_select(0, _flat_rows(index, N)).reshape(B, index.shape[1], C)


def scatter_add_rows(t: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor):
    """``aten.scatter_add`` of whole rows ``src[B, M, C]`` into token rows of ``t[B, K, C]`` (the
    merge's sum) as ``t + P^T src``, ``P[b, m, k] = 1`` where ``index[b, m] = k``: a one-hot built by
    ``relu(1 - |index - k|)`` and a batched matmul, ops XNNPACK runs (only the index's conversion to
    float stays outside). ExecuTorch's accumulating ``index_put`` wrote a copy of all of ``t`` in a
    portable kernel (9 ms of deit_small's 241 at batch 16), and its in-place one cannot accumulate.
    ``M * K * C`` multiply-adds per image: little for a merge of a few tokens per block."""
    if (not _repeated_row_index(index, t, dim) or tuple(src.shape) != tuple(index.shape)
            or not t.is_floating_point()):
        return NotImplemented
    rows = index.select(-1, 0).to(t.dtype)  # [B, M], exact below 2^24 tokens
    positions = torch.arange(t.shape[1], device=t.device, dtype=t.dtype)
    one_hot = torch.relu(1.0 - (rows.unsqueeze(-1) - positions).abs())  # [B, M, K]
    return t + torch.bmm(one_hot.transpose(1, 2), src)


def drop_repeated_index_expands(program) -> None:
    """``select(expand(unsqueeze(idx, -1)), -1, 0)`` (through views that only add or drop sizes of
    1), what :func:`gather_rows` and :func:`scatter_add_rows` read of a repeated row index,
    replaced by ``idx``: the expanded copy of the index then has no reader left."""
    aten = torch.ops.aten
    graph = program.graph_module.graph

    def squeezed(node):
        return [n for n in node.meta["val"].shape if n != 1]

    for node in list(graph.nodes):
        if node.target is not aten.select.int or node.args[2] != 0 or node.args[1] not in (-1, 2):
            continue
        source = node.args[0]
        while source.target in (aten.expand.default, aten.view.default, aten.unsqueeze.default):
            inner = source.args[0]
            if not isinstance(inner, torch.fx.Node) or squeezed(inner) != squeezed(source) and not (
                    source.target is aten.expand.default and inner.meta["val"].shape[-1] == 1):
                break
            source = inner
            if tuple(source.meta["val"].shape) == tuple(node.meta["val"].shape):
                node.replace_all_uses_with(source)
                break
    graph.eliminate_dead_code()
    program.graph_module.recompile()


def share_repeated_nodes(program) -> None:
    """One node for each repeated pure computation (the batch offsets of every row gather, the
    rank comparisons' position masks): a runtime would run each copy."""
    seen = {}
    for node in list(program.graph_module.graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
            continue
        key = (target, repr(node.args), repr(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
        else:
            seen[key] = node
    program.graph_module.graph.eliminate_dead_code()
    program.graph_module.recompile()


def drop_broadcast_expands(program) -> None:
    """An ``expand`` whose readers are all elementwise ``add`` / ``sub`` / ``mul`` / ``div`` with an
    operand of the expanded shape is broadcasting those ops do themselves (and XNNPACK with them):
    the readers take the unexpanded tensor."""
    for node in list(program.graph_module.graph.nodes):
        if node.target is torch.ops.aten.expand.default and node.users and all(
                _broadcasts(user, node) for user in node.users):
            node.replace_all_uses_with(node.args[0])
    program.graph_module.graph.eliminate_dead_code()
    program.graph_module.recompile()


def _broadcasts(user, expanded) -> bool:
    """Whether ``user`` is an elementwise binary op whose other operand has ``expanded``'s shape."""
    aten = torch.ops.aten
    others = [a for a in user.args[:2] if a is not expanded]
    return (user.target in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor) and not user.kwargs
            and len(others) == 1 and isinstance(others[0], torch.fx.Node)
            and others[0].meta["val"].shape == expanded.meta["val"].shape)


def drop_copies(program) -> None:
    """The graph passes above, in the order both exports run them after their decompositions:
    expanded row indices, broadcasting expands, repeated computations."""
    drop_repeated_index_expands(program)
    drop_broadcast_expands(program)
    share_repeated_nodes(program)


#: The row rewrites of :func:`~vitcompress.export.executorch_export.program_for_xnnpack`.
ROW_DECOMPOSITIONS = {torch.ops.aten.gather.default: gather_rows,
                      torch.ops.aten.scatter_add.default: scatter_add_rows}
