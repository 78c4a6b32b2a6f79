"""The export-time rewrites that let XNNPACK run a compressed model's token selection and merge
(issue 31): each equals the torch op it replaces, on odd shapes and N = 1 / 50 / 197 tokens.

Pure torch (plus ``torch.export`` for the graph passes); the ExecuTorch lowering itself, which
takes minutes of CPU, is ``slow``.
"""
import pytest
import torch

import vitcompress
from vitcompress.export.executorch_export import (_elu_for_xnnpack, _integer_row_sums, _matmul_as_bmm,
                                                  _mean_for_xnnpack, _sort_by_ranks, _vector_norm_for_xnnpack,
                                                  program_for_xnnpack)
from vitcompress.export.passes import gather_rows, scatter_add_rows
from vitcompress.testing import tiny_vit

TOKENS = [1, 50, 197]


def _row_index(batch, rows, picked, channels, generator):
    """``idx[B, K].unsqueeze(-1).expand(-1, -1, C)``, as the apply path builds it."""
    idx = torch.randint(0, rows, (batch, picked), generator=generator)
    return idx, idx.unsqueeze(-1).expand(-1, -1, channels)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("channels", [1, 37])
def test_gather_rows_is_torch_gather(tokens, channels):
    g = torch.Generator().manual_seed(tokens)
    t = torch.randn(3, tokens, channels, generator=g)
    for picked in (1, tokens, 2 * tokens + 1):  # repeats included
        _, index = _row_index(3, tokens, picked, channels, g)
        assert torch.equal(gather_rows(t, 1, index), t.gather(1, index))


def test_gather_rows_leaves_other_gathers_to_torch():
    t = torch.randn(2, 9, 5)
    per_element = torch.randint(0, 9, (2, 4, 5))  # a different row in each channel
    assert gather_rows(t, 1, per_element) is NotImplemented
    assert gather_rows(t, 2, torch.zeros(2, 9, 5, dtype=torch.long)) is NotImplemented
    assert gather_rows(t[:, :, 0], 1, torch.zeros(2, 4, dtype=torch.long)) is NotImplemented


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("channels", [1, 37])
def test_scatter_add_rows_is_torch_scatter_add(tokens, channels):
    """Several sources into one destination (a merge): the same sums, up to the order of the adds."""
    g = torch.Generator().manual_seed(tokens + channels)
    kept = torch.randn(2, tokens, channels, generator=g)
    for sources in (1, 7, 3 * tokens):
        src = torch.randn(2, sources, channels, generator=g)
        _, index = _row_index(2, tokens, sources, channels, g)
        expected = kept.scatter_add(1, index, src)
        assert torch.allclose(scatter_add_rows(kept, 1, index, src), expected, atol=1e-5)
    longer = torch.randn(2, 4, channels, generator=g)  # scatter_add reads only the index's part of src
    assert scatter_add_rows(kept, 1, torch.zeros(2, 3, channels, dtype=torch.long), longer) is NotImplemented


@pytest.mark.parametrize("tokens", TOKENS)
def test_mean_norm_and_matmul_rewrites_are_torch(tokens):
    torch.manual_seed(tokens)
    x = torch.randn(2, 3, tokens, 37)
    for dim in (-1, 1, 2):
        for keepdim in (False, True):
            assert torch.allclose(_mean_for_xnnpack(x, [dim], keepdim), x.mean(dim, keepdim=keepdim), atol=1e-6)
    assert _mean_for_xnnpack(x, [2, 3], True) is NotImplemented
    norm = _vector_norm_for_xnnpack(x, 2, [-1], True)
    assert torch.allclose(norm, torch.linalg.vector_norm(x, 2, -1, True), rtol=1e-5)
    y = torch.randn(2, 3, 37, tokens)
    assert torch.allclose(_matmul_as_bmm(x, y), x @ y, atol=1e-4)
    assert _matmul_as_bmm(x, torch.randn(37, 5)) is NotImplemented


@pytest.mark.parametrize("tokens", TOKENS)
def test_elu_rewrite_is_torch_elu_and_leaves_no_elu_in_the_program(tokens):
    """PiToMe's energy ``mean ELU(sim - margin, alpha)``: the same values on both sides of 0 (and at
    0), for alpha 1 and not 1, and the rewritten program holds no ``elu`` for the partitioner to leave out."""
    torch.manual_seed(tokens)
    sim = torch.rand(2, tokens, tokens) * 2 - 1
    sim[0, 0, 0] = 0.75  # exactly at the margin
    for alpha in (1.0, 0.5):
        expected = torch.nn.functional.elu(sim - 0.75, alpha)
        assert torch.allclose(_elu_for_xnnpack(sim - 0.75, alpha), expected, atol=1e-6)
    assert _elu_for_xnnpack(sim, 1.0, 2.0) is NotImplemented  # selu's scale: left to torch

    class Energy(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.elu(x - 0.75, 0.5).mean(-1)

    program = program_for_xnnpack(torch.export.export(Energy(), (sim,), strict=False))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.elu.default" not in targets and "aten.exp.default" in targets, targets
    assert torch.allclose(program.module()(sim), Energy()(sim), atol=1e-6)


def test_integer_row_sums_are_exact():
    torch.manual_seed(0)
    for n in (1, 25, 197, 577):
        t = torch.randint(0, 2, (4, n, n)).float()
        assert torch.equal(_integer_row_sums(t), t.sum(-1))


@pytest.mark.parametrize("tokens", TOKENS)
def test_sort_rewrite_is_a_stable_torch_sort(tokens):
    """Ties (rounded values), infinities and integers (the indices rank_plan sorts) keep torch's
    stable order."""
    torch.manual_seed(tokens)
    x = (torch.randn(3, 2, tokens) * 2).round()
    x[0, 0, 0] = float("inf")
    x[1, 1, -1] = float("-inf")
    for values in (x, x.long(), torch.randperm(tokens).view(1, 1, tokens)):
        for dim in (-1, 0):
            for descending in (False, True):
                got_values, got_indices = _sort_by_ranks(values, True, dim, descending)
                expected = torch.sort(values, dim=dim, descending=descending, stable=True)
                assert torch.equal(got_indices, expected.indices) and torch.equal(got_values, expected.values)


class _RowsAndMerge(torch.nn.Module):
    """The apply path's pattern: gather rows by an expanded index, add rows into them."""

    def forward(self, x, keep, src, dst):
        rows = lambda idx: idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return x.gather(1, rows(keep)).scatter_add(1, rows(dst), x.gather(1, rows(src))) * 2


class _ArgsortAlive(torch.nn.Module):
    def forward(self, alive):
        return torch.argsort((~alive).to(torch.int8), dim=1, stable=True)


def test_program_for_xnnpack_turns_a_stable_argsort_into_ranks():
    """atc's stable argsort of its alive tokens (int8, many ties): no sort is left for ExecuTorch's
    runtime, which has none, and the order is torch's."""
    alive = torch.rand(3, 50, generator=torch.Generator().manual_seed(0)) > 0.5
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(_ArgsortAlive(), (alive,), dynamic_shapes=({0: batch},), strict=False)
    rewritten = program_for_xnnpack(program)
    targets = {str(node.target) for node in rewritten.graph.nodes if node.op == "call_function"}
    assert not {t for t in targets if "sort" in t}, targets
    assert torch.equal(rewritten.module()(alive), _ArgsortAlive()(alive))


def test_program_for_xnnpack_has_no_expanded_index_and_same_outputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 37, generator=g)
    keep, src, dst = (torch.randint(0, n, (3, k), generator=g) for n, k in ((50, 40), (50, 9), (40, 9)))
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(_RowsAndMerge(), (x, keep, src, dst), dynamic_shapes=({0: batch},) * 4,
                                  strict=False)
    rewritten = program_for_xnnpack(program)
    targets = {str(node.target) for node in rewritten.graph.nodes if node.op == "call_function"}
    assert not {"aten.gather.default", "aten.scatter_add.default", "aten.expand.default",
                "aten.index_put.default"} & targets, targets
    assert {"aten.index_select.default", "aten.bmm.default"} <= targets
    assert torch.allclose(rewritten.module()(x, keep, src, dst), _RowsAndMerge()(x, keep, src, dst), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method, per_block", [("tome", 40), ("pitome", 40)])
def test_executorch_leaves_a_bounded_number_of_ops_per_reducing_block(tmp_path, method, per_block):
    """The ops a compressed model runs outside XNNPACK beyond the uncompressed model's, per
    reducing block: 38 (tome) and 35 (pitome) measured, almost all on [B, N] index tensors, against
    88 before the rewrites (expanded gathers, scatter_add, the sort's compares); no merge's
    index_put (a one-hot matmul now) and no ELU."""
    pytest.importorskip("executorch")
    from vitcompress.export import export_executorch

    counts = {}
    for name in ("none", method):
        model = tiny_vit(depth=2)
        if name != "none":
            vitcompress.compress(model, name, r=8)
        report = export_executorch(model, str(tmp_path / f"{name}.pte"), (2, 3, 32, 32), max_batch=4,
                                   check_batches=(3,), verbose=False)
        assert report.ok, str(report)
        counts[name] = report.portable_ops
    added = sum(counts[method].values()) - sum(counts["none"].values())
    assert 0 < added <= 2 * per_block, counts[method]
    left = {op.split(".")[1] for op in counts[method]}
    assert not left & {"scatter_add", "index_put", "expand_copy", "lt", "gt", "eq", "bitwise_or", "mean", "pow", "sum",
                       "elu"} - {
        op.split(".")[1] for op in counts["none"]}, left
