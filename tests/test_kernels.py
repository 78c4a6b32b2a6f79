"""Fused Triton kernels against their torch references, and the dispatch between them.

Without a GPU the kernels run under Triton's interpreter on CPU tensors; with one, on CUDA tensors.
``TRITON_INTERPRET=1`` must be in the environment before Triton is first imported (timm imports
it). When it was not, this file re-runs itself in a subprocess that has it, as the test
``test_kernels_in_an_interpreted_process`` (``[not slow]`` in the default run, ``[slow]`` with
``-m slow``); so for ``-k`` selections run
``TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py -k ...``.

Shapes are chosen to be awkward: B in {1, 3}, N in {1, 2, 49, 50, 197, 577}, C in {3, 64, 96, 384},
none a multiple of a tile; the apply kernel also C = 37, 100 and prefixes 0-5. The default run
takes a representative part of each grid (:func:`cases`: N = 1, 50, 197, a C that is no power of
two, each dtype); the full grids are marked slow (``-m slow``).
"""
import importlib
import itertools
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # still in time

pytest.importorskip("triton")

import vitcompress  # noqa: E402
from vitcompress.kernels import dispatch, reference  # noqa: E402
from vitcompress.kernels import (_triton_utils, apply_triton, bipartite_triton, energy_triton,  # noqa: E402
                                 pagerank_triton, plan_triton, topk_triton)

from conftest import interpreted_process_runner  # noqa: E402
from vitcompress.testing import tiny_vit  # noqa: E402

# Triton was imported (by timm) without TRITON_INTERPRET, so its own library is not interpreted:
# run this file again in a fresh process that has the variable from the start.
IN_SUBPROCESS = not CUDA and not _triton_utils.interpreter_ready()

if not CUDA and not IN_SUBPROCESS and not _triton_utils.is_interpreted(topk_triton._topk_kernel):
    # our kernels were imported earlier in this process without the interpreter: rebuild them
    for _mod in (bipartite_triton, energy_triton, pagerank_triton, topk_triton, plan_triton, apply_triton):
        importlib.reload(_mod)
    dispatch._TRITON.clear()
    dispatch._loaded = False


def _one_blas_thread():
    """The interpreter's tl.dot is numpy.matmul; OpenBLAS's thread pool, fighting torch's for two
    cores, makes a 128^3 product take 20 ms instead of 0.2 ms. Best effort, tests only."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, sym):
                getattr(lib, sym)(1)
                break


if not CUDA and not IN_SUBPROCESS:
    _one_blas_thread()


_skipped_here, test_kernels_in_an_interpreted_process = interpreted_process_runner(__file__, IN_SUBPROCESS)


DEVICE = "cuda" if CUDA else "cpu"
BS = [1, 3]
NS = [1, 2, 49, 50, 197, 577]
CS = [3, 64, 96, 384]
HALF = [torch.float16, torch.bfloat16]
BNC_DEFAULT = [(1, 1, 3), (3, 2, 64), (3, 49, 96), (3, 50, 384), (1, 197, 96)]
HALF_SHAPES = [(2, 3), (50, 96), (197, 384), (577, 64)]
HALF_DEFAULT = [(50, 96, torch.float16), (197, 384, torch.bfloat16)]
NEAR = 1e-6  # reference top-2 gaps below this may resolve either way (float32 rounding)


def cases(names: str, grid, default):
    """Parametrize over ``grid`` (tuples of values for ``names``): the tuples in ``default`` -- a
    representative subset (the awkward sizes, each dtype) -- run by default, the rest of the grid
    is marked slow (``-m slow``)."""
    grid = list(grid)
    assert set(default) <= set(grid), set(default) - set(grid)
    return pytest.mark.parametrize(names, [c if c in default else pytest.param(*c, marks=pytest.mark.slow)
                                           for c in grid])


def product(*axes):
    return list(itertools.product(*axes))


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _cos(a, b):
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.transpose(-1, -2)


def check_match(a, b, atol=1e-5, exact=False):
    score, index = bipartite_triton.bipartite_match(a, b)
    ref_score, ref_index = reference.bipartite_match(a, b)
    assert score.shape == ref_score.shape and score.dtype == torch.float32 and score.device == a.device
    assert index.shape == ref_index.shape and index.dtype == torch.int64
    torch.testing.assert_close(score, ref_score, atol=atol, rtol=0)
    if exact:
        assert torch.equal(index, ref_index)
        return
    # indices: identical wherever the best match is clear; otherwise a near-best one
    sim = _cos(a, b)
    best = sim.max(dim=-1).values
    assert (best - sim.gather(-1, index.unsqueeze(-1)).squeeze(-1)).abs().max() <= NEAR
    if sim.shape[-1] >= 2:
        top2 = sim.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > NEAR
        assert torch.equal(index[clear], ref_index[clear])
        assert clear.float().mean() > 0.9  # the comparison above is not vacuous
    else:
        assert torch.equal(index, ref_index)


def _nb(n):
    return max(1, n // 2 + 1)


# ---------------------------------------------------------------------------- bipartite_match

@cases("B,N,C", product(BS, NS, CS), default=BNC_DEFAULT)
def test_bipartite_match_matches_reference(B, N, C):
    check_match(_rand(B, N, C, seed=N * C + B), _rand(B, _nb(N), C, seed=N * C + B + 1))


@cases("N,C,dtype", [(n, c, d) for (n, c), d in product(HALF_SHAPES, HALF)], default=HALF_DEFAULT)
def test_bipartite_match_half_inputs(N, C, dtype):
    check_match(_rand(3, N, C, dtype=dtype, seed=N), _rand(3, _nb(N), C, dtype=dtype, seed=N + 1), atol=2e-5)


def test_bipartite_match_strided_inputs():
    x = _rand(3, 197, 96 * 2)[..., ::2]  # non-contiguous channels
    check_match(x[:, 0::2], x[:, 1::2])
    check_match(x.transpose(0, 1).contiguous().transpose(0, 1)[:, :50], x[:, 100:149])  # batch stride < token stride


@pytest.mark.parametrize("small_tiles", [False, True])
def test_bipartite_match_ties_go_to_the_lowest_index(small_tiles, monkeypatch):
    if small_tiles:  # many tiles along every axis, so ties straddle tiles
        monkeypatch.setattr(bipartite_triton, "MAX_BLOCKS_INTERPRETED", (32, 64, 32))
        monkeypatch.setattr(bipartite_triton, "MAX_BLOCKS", (32, 64, 32))
    B, Na, Nb, C = 3, 70, 140, 40
    b = _rand(B, Nb, C, seed=1)
    b[:, 90] = b[:, 3]  # exact duplicate in another tile
    b[:, 4] = b[:, 3]  # ... and in the same tile
    b[:, 130] = 2.0 * b[:, 17]  # a power-of-two multiple: the same direction, bit for bit
    b[1, 70:] = b[1, :70].clone()  # image 1: two identical halves, so every match is tied
    a = _rand(B, Na, C, seed=2)
    a[:, 0] = b[:, 3]
    a[:, 1] = -0.5 * b[:, 90]
    a[:, 2] = 3.0 * b[:, 130]
    a[:, 69] = 0.0  # a zero row: every cosine is 0, so index 0
    a[2, 10:20] = 0.0
    score, index = bipartite_triton.bipartite_match(a, b)
    assert index[:, 0].tolist() == [3, 3, 3]
    assert index[:, 2].tolist() == [17, 60, 17]  # image 1: b[130] is now a copy of b[60]
    assert index[:, 69].tolist() == [0, 0, 0] and index[2, 10:20].eq(0).all()
    assert index[1].lt(70).all()
    check_match(a, b, exact=True)


def test_bipartite_match_quantised_duplicates():
    """Few distinct tokens, many copies of each: every row is an exact tie."""
    g = torch.Generator().manual_seed(3)
    protos = torch.randn(2, 7, 64, generator=g)
    pick_a = torch.randint(0, 7, (2, 197), generator=g)
    pick_b = torch.randint(0, 7, (2, 98), generator=g)
    a = protos.gather(1, pick_a[..., None].expand(-1, -1, 64)).to(DEVICE)
    b = protos.gather(1, pick_b[..., None].expand(-1, -1, 64)).to(DEVICE)
    check_match(a, b, exact=True)


def test_bipartite_match_edge_shapes():
    score, index = bipartite_triton.bipartite_match(_rand(2, 0, 8), _rand(2, 5, 8))
    assert score.shape == (2, 0) and index.shape == (2, 0)
    check_match(_rand(2, 5, 0), _rand(2, 3, 0), exact=True)  # no channels: all cosines 0
    check_match(_rand(2, 5, 8).double(), _rand(2, 3, 8).double())  # float64 is read as float32, like the reference
    with pytest.raises(ValueError):
        bipartite_triton.bipartite_match(_rand(2, 5, 8), _rand(2, 0, 8))
    with pytest.raises(ValueError):
        bipartite_triton.bipartite_match(_rand(2, 5, 8), _rand(2, 5, 7))


def test_bipartite_match_reads_index_rows_in_place():
    """a_idx / b_idx name the rows taking part: the same as matching the gathered rows."""
    x = _rand(3, 197, 96, seed=21)
    order = torch.stack([torch.randperm(197, generator=torch.Generator().manual_seed(b)) for b in range(3)]).to(DEVICE)
    for a_idx, b_idx in ((order[:, 0::2], order[:, 1::2]), (order[:, 150:], order[:, :150]), (order[:, :1], None)):
        a = reference._rows(x, a_idx)
        b = reference._rows(x, b_idx)
        score, index = bipartite_triton.bipartite_match(x, x, a_idx, b_idx)
        ref_score, ref_index = reference.bipartite_match(x, x, a_idx, b_idx)
        want_score, want_index = bipartite_triton.bipartite_match(a, b)
        assert torch.equal(score, want_score) and torch.equal(index, want_index)
        torch.testing.assert_close(score, ref_score, atol=1e-5, rtol=0)
        check_match(a, b)
    with pytest.raises(ValueError):
        bipartite_triton.bipartite_match(x, x, order[0], None)


# ---------------------------------------------------------------------------- energy_score

def check_energy(x, margin, alpha, atol=1e-5):
    e = energy_triton.energy_score(x, margin, alpha)
    ref = reference.energy_score(x, margin, alpha)
    assert e.shape == ref.shape and e.dtype == torch.float32 and e.device == x.device
    torch.testing.assert_close(e, ref, atol=atol, rtol=0)


@cases("B,N,C", product(BS, NS, CS), default=BNC_DEFAULT)
def test_energy_score_matches_reference(B, N, C):
    margin, alpha = [(0.75, 1.0), (0.0, 0.5), (0.3, 2.0)][(N + C) % 3]
    check_energy(_rand(B, N, C, seed=N + C), margin, alpha)


@cases("N,C,dtype", [(n, c, d) for (n, c), d in product(HALF_SHAPES, HALF)], default=HALF_DEFAULT)
def test_energy_score_half_inputs(N, C, dtype):
    check_energy(_rand(3, N, C, dtype=dtype, seed=N), 0.6, 1.0, atol=2e-5)


def test_energy_score_structure(monkeypatch):
    """Clustered tokens (cosines near 1, the positive branch of ELU), duplicates, zero rows,
    strided input, and many tiles."""
    monkeypatch.setattr(energy_triton, "MAX_BLOCKS_INTERPRETED", (16, 32, 16))
    monkeypatch.setattr(energy_triton, "MAX_BLOCKS", (16, 32, 16))
    x = _rand(2, 50, 2 * 40, seed=5)[..., ::2]
    x[:, 10:30] = x[:, 5:6] + 0.01 * x[:, 10:30]
    x[:, 40] = 0.0
    check_energy(x, 0.1, 1.0)
    e = energy_triton.energy_score(x, 0.1, 1.0)
    x[:, 45] = x[:, 7]
    e = energy_triton.energy_score(x, 0.1, 1.0)
    assert torch.equal(e[:, 45], e[:, 7])


# ---------------------------------------------------------------------------- topk_indices

def check_topk(scores, k):
    idx = topk_triton.topk_indices(scores, k)
    # The reference runs on the CPU: torch's CUDA sort puts a NaN with the sign bit set below -inf
    # (a radix sort of the bit patterns), its CPU sort puts every NaN above +inf, as documented;
    # the kernel follows the documented order (seen on an H200, torch 2.11).
    ref = reference.topk_indices(scores.cpu(), k).to(scores.device)
    assert idx.dtype == torch.int64 and idx.device == scores.device
    assert idx.shape == ref.shape, (idx.shape, ref.shape)
    assert torch.equal(idx, ref)


@cases("B,N,ties", product(BS, NS + [4096], [False, True]),
       default=[(1, 1, False), (3, 2, True), (3, 50, False), (1, 197, True), (3, 577, False), (3, 4096, True)])
def test_topk_matches_reference(B, N, ties):
    scores = _rand(B, N, seed=N + B)
    if ties:  # a handful of distinct values, so nearly everything is tied
        scores = (scores * 2).round() / 2
    for k in sorted({1, max(1, N // 3), N}):
        check_topk(scores, k)


@pytest.mark.parametrize("dtype", HALF + [torch.float64])
def test_topk_other_dtypes(dtype):
    scores = _rand(3, 197, seed=7).mul(3).round().to(dtype)  # integers: exact in every dtype, many ties
    check_topk(scores, 197)
    check_topk(scores, 20)
    check_topk(_rand(3, 577, dtype=dtype, seed=8), 100)


def test_topk_special_values():
    scores = _rand(2, 50, seed=9)
    scores[:, 3] = float("nan")
    scores[:, 7] = float("inf")
    scores[:, 8] = float("-inf")
    scores[:, 9] = -0.0
    scores[:, 10] = 0.0
    scores[:, 11] = -0.0
    scores[:, 20] = float("nan")
    scores[0, 30] = -float("nan")
    scores[:, 40] = torch.finfo(torch.float32).tiny / 4  # subnormal
    scores[:, 41] = -torch.finfo(torch.float32).tiny / 4
    check_topk(scores, 50)
    check_topk(scores.contiguous().t().contiguous().t(), 13)  # column-major


def test_topk_edge_cases():
    check_topk(_rand(3, 49), 0)
    check_topk(_rand(3, 49), 100)  # k > N: all of them, like slicing
    assert topk_triton.topk_indices(_rand(0, 49), 5).shape == (0, 5)
    check_topk(_rand(2, 4097), 10)  # longer rows fall back to the reference
    with pytest.raises(ValueError):
        topk_triton.topk_indices(_rand(2, 3, 4), 1)


@pytest.mark.slow
def test_topk_every_row_length():
    for n in range(1, 300):
        scores = (_rand(2, n, seed=n) * 2).round()
        check_topk(scores, n)  # every k is a prefix of this
        if n % 10 == 0:
            check_topk(scores, n // 2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("N", NS)
def test_half_inputs_full_grid(N, C, dtype):
    check_match(_rand(3, N, C, dtype=dtype, seed=N), _rand(3, _nb(N), C, dtype=dtype, seed=N + 1), atol=2e-5)
    check_energy(_rand(3, N, C, dtype=dtype, seed=N), 0.6, 1.0, atol=2e-5)


# ---------------------------------------------------------------------------- pagerank_steps


def _graphs(R, N, dtype=torch.float32, seed=0):
    """Row-stochastic attention ``[R, N, N]``, a start distribution and an alive mask (first token alive)."""
    g = torch.Generator().manual_seed(seed)
    attn = (2 * torch.randn(R, N, N, generator=g)).softmax(-1)
    init = torch.rand(R, N, generator=g) + 0.1
    alive = (torch.rand(R, N, generator=g) > 0.3).float()
    alive[:, 0] = 1.0
    return attn.to(dtype).to(DEVICE), (init / init.sum(-1, keepdim=True)).to(DEVICE), alive.to(DEVICE)


@cases("N,iters,with_alive", product([1, 2, 49, 50, 197, 256, 300], [1, 5, 30], [False, True]),
       default=[(1, 1, True), (2, 5, False), (50, 30, True), (197, 5, True), (256, 1, False), (300, 5, True)])
def test_pagerank_steps_match_reference(N, iters, with_alive):
    attn, init, alive = _graphs(3, N, seed=N + iters)
    alive = alive if with_alive else None
    got = pagerank_triton.pagerank_steps(attn, init, iters, alive)
    ref = reference.pagerank_steps(attn, init, iters, alive)
    assert got.shape == (3, N) and got.dtype == torch.float32 and got.device == attn.device
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    if with_alive:
        assert torch.all(got[alive == 0] == 0)  # the pruned tokens neither vote nor receive


@pytest.mark.parametrize("dtype", HALF)
def test_pagerank_steps_read_half_precision_attention(dtype):
    attn, init, alive = _graphs(2, 197, dtype=dtype, seed=3)
    for mask in (None, alive):
        torch.testing.assert_close(pagerank_triton.pagerank_steps(attn, init, 30, mask),
                                   reference.pagerank_steps(attn, init, 30, mask), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- rank_plan


def check_rank_plan(score, match, r, a_idx, b_idx, sort_unmerged, b_first):
    got = plan_triton.rank_plan(score, match, r, a_idx, b_idx, sort_unmerged, b_first)
    # the reference's sort runs on the CPU (see check_topk)
    cpu = [None if t is None else t.cpu() for t in (score, match, a_idx, b_idx)]
    want = reference.rank_plan(cpu[0], cpu[1], r, cpu[2], cpu[3], sort_unmerged, b_first)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert g.dtype == torch.int64 and g.device == score.device
            assert torch.equal(g.cpu(), w), (g, w)


def _rank_case(Na, Nb, ties, full):
    g = torch.Generator().manual_seed(Na + Nb)
    score = torch.randn(3, Na, generator=g)
    if ties:
        score = (score * 2).round() / 2
    match = torch.randint(0, max(Nb, 1), (3, Na), generator=g)
    order = torch.stack([torch.randperm(Na + Nb + 5, generator=g) for _ in range(3)])
    a_idx, b_idx = order[:, 5:5 + Na], order[:, 5 + Na:]
    score, match, a_idx, b_idx = (t.to(DEVICE) for t in (score, match, a_idx, b_idx))
    flags = [(s, b, m) for s in (False, True) for b in (False, True) for m in (match, None)]
    for i, r in enumerate(sorted({0, 1, Na // 3, Na} & set(range(Na + 1)))):
        for sort_unmerged, b_first, m in (flags if full else flags[i % 2::2]):
            check_rank_plan(score, m, r, a_idx, b_idx, sort_unmerged, b_first)


@cases("Na,Nb,ties", [(a, b, t) for (a, b), t in product([(0, 1), (1, 0), (1, 1), (2, 3), (49, 50), (98, 99)],
                                                           [False, True])],
       default=[(0, 1, False), (1, 0, True), (2, 3, True), (98, 99, True)])
def test_rank_plan_matches_reference(Na, Nb, ties):
    _rank_case(Na, Nb, ties, full=False)


@pytest.mark.slow
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("Na,Nb", [(1, 1), (2, 3), (49, 50), (98, 99), (288, 288), (600, 7)])
def test_rank_plan_full_grid(Na, Nb, ties):
    _rank_case(Na, Nb, ties, full=True)


def test_rank_plan_strided_sets_and_half_scores():
    """A and B as strided views of one order (as ToMe and PiToMe pass them), half-precision scores."""
    g = torch.Generator().manual_seed(5)
    order = torch.stack([torch.randperm(197, generator=g) for _ in range(2)]).to(DEVICE)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        score = (torch.randn(2, 99, generator=g) * 3).round().to(dtype).to(DEVICE)
        match = torch.randint(0, 98, (2, 99), generator=g).to(DEVICE)
        check_rank_plan(score, match, 13, order[:, 0::2], order[:, 1::2], True, False)
        check_rank_plan(score, match, 40, order[:, 0::2], order[:, 1::2], False, False)
    arange = torch.arange(197, device=DEVICE).expand(2, 197)  # stride 0 along the batch
    check_rank_plan(score.float()[:, :98], match[:, :98], 20, arange[:, 1::2], arange[:, 0::2], True, False)


def test_rank_plan_one_image_a_program(monkeypatch):
    """The GPU's packing (one long row a program) and several programs, through the interpreter."""
    monkeypatch.setattr(topk_triton, "MAX_ELEMENTS_INTERPRETED", 1)  # rank_plan packs rows as topk does
    g = torch.Generator().manual_seed(6)
    score = (torch.randn(5, 60, generator=g) * 2).round().to(DEVICE)
    match = torch.randint(0, 61, (5, 60), generator=g).to(DEVICE)
    order = torch.stack([torch.randperm(121, generator=g) for _ in range(5)]).to(DEVICE)
    check_rank_plan(score, match, 17, order[:, 0::2][:, :60], order[:, 1::2], True, False)
    check_rank_plan(score, None, 30, order[:, 0::2][:, :60], order[:, 1::2], False, True)
    with pytest.raises(ValueError):
        plan_triton.rank_plan(score, match, 100, order[:, 0::2], order[:, 1::2])


# ---------------------------------------------------------------------------- pagerank_scores


def _alive(B, T, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B)]).to(DEVICE)


def check_scores(attn, iters, p, alive=None, **opts):
    got = pagerank_triton.pagerank_scores(attn, iters, p, alive=alive, **opts)
    want = reference.pagerank_scores(attn, iters, p, alive=alive, **opts)
    assert got.shape == want.shape and got.dtype == torch.float32 and got.device == attn.device
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    return got


SCORE_OPTIONS = [dict(), dict(cls_sqrt=False), dict(aggregate="mean"), dict(head_filter=False),
                 dict(var_min=0.0, var_max=1e9), dict(var_min=1e8, var_max=1e9)]  # every head passes / none


def _scores_case(N, p, full):
    B, H = 2, 3
    attn = _graphs(B * H, N, seed=N + p)[0].reshape(B, H, N, N)
    for iters in ((0, 1, 5, 30) if full else (0, 30)):
        check_scores(attn, iters, p)
    T = N - p
    alive = _alive(B, T, T - T // 3, seed=N)
    for i, opts in enumerate(SCORE_OPTIONS):
        if full or i % 3 == p % 3:
            check_scores(attn, 5, p, **opts)
        check_scores(attn, 5, p, alive=alive, **opts)
    check_scores(attn, 3, p, alive=alive.flip(1))  # alive in any order: the scores follow it


@pytest.mark.parametrize("N,p", [(6, 5), (50, 0)])  # every (N, p) with every option: the full grid below
def test_pagerank_scores_match_reference(N, p):
    _scores_case(N, p, full=False)


def test_pagerank_scores_longest_fused_graph_and_beyond():
    """256 tokens (the kernel's largest graph) and 300 (the reference's)."""
    for N in (256, 300):
        attn = _graphs(6, N, seed=N)[0].reshape(2, 3, N, N)
        check_scores(attn, 30, 1)
        check_scores(attn, 5, 1, alive=_alive(2, N - 1, 200, seed=N))


@pytest.mark.slow
@pytest.mark.parametrize("p", [0, 1, 5])
@pytest.mark.parametrize("N", [6, 50, 197, 256, 300])
def test_pagerank_scores_full_grid(N, p):
    _scores_case(N, p, full=True)


def test_pagerank_scores_edges_and_half_attention():
    attn = _graphs(4, 1, seed=1)[0].reshape(2, 2, 1, 1)
    check_scores(attn, 5, 0)
    check_scores(attn, 5, 1)  # only a special token: nothing to score
    check_scores(_graphs(6, 40, seed=2)[0].reshape(2, 3, 40, 40), 4, 1, alive=_alive(2, 39, 1, seed=3))
    for dtype, alive in zip(HALF, (None, _alive(2, 196, 150, seed=5))):
        attn = _graphs(6, 197, dtype=dtype, seed=4)[0].reshape(2, 3, 197, 197)
        check_scores(attn, 30, 1, alive=alive)
    with pytest.raises(ValueError):
        pagerank_triton.pagerank_scores(attn, 3, 1, aggregate="max")


def test_zero_tprune_importance_uses_the_fused_score(monkeypatch):
    """token_importance without an alive mask is the fused primitive; with a mask, the pieces."""
    from vitcompress.methods.zero_tprune import token_importance
    monkeypatch.setenv("VITCOMPRESS_KERNELS", "triton")
    attn = _graphs(6, 50, seed=6)[0].reshape(2, 3, 50, 50)
    torch.testing.assert_close(token_importance(attn, 1, 5), reference.pagerank_scores(attn, 5, 1),
                               atol=1e-6, rtol=1e-5)
    mask = reference.alive_mask(_alive(2, 49, 30, seed=7), 50, 1)
    want = reference.pagerank_scores(attn, 5, 1, alive=_alive(2, 49, 30, seed=7))
    got = token_importance(attn, 1, 5, alive=mask).gather(1, _alive(2, 49, 30, seed=7))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- apply_plan

APPLY_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _plan(B, T, merge, seed):
    """A random plan over T reducible tokens: about a third removed (merged into random kept
    tokens, several into the same one, or pruned), the kept ones in random order."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(T, generator=g) for _ in range(B)])
    removed = T // 3
    K = T - removed
    keep = perm[:, :K]
    if not merge or K == 0:
        return keep.to(DEVICE), None, None
    src = perm[:, K:]
    dst = torch.randint(0, K, (B, removed), generator=g)
    return keep.to(DEVICE), src.to(DEVICE), dst.to(DEVICE)


def check_apply(x, size, keep, src, dst, p, source=None):
    dt = x.dtype
    atol, rtol = APPLY_TOL[dt]
    out, new_size, log = apply_triton.apply_plan(x, size, keep, src, dst, p, log_size=True)
    r_out, r_size, r_log = reference.apply_plan(x, size, keep, src, dst, p, log_size=True)
    assert out.shape == r_out.shape and out.dtype == dt and out.device == x.device
    assert new_size.dtype == torch.float32 and log.dtype == dt
    assert torch.equal(new_size, r_size)  # integer-valued sizes: every summation order is exact
    torch.testing.assert_close(log, r_log, atol=atol, rtol=rtol)
    torch.testing.assert_close(out[:, :p], x[:, :p])  # the special tokens pass through
    if src is None or src.shape[1] == 0:
        assert torch.equal(out, r_out)  # a pure gather is exact
    else:
        torch.testing.assert_close(out.float(), r_out.float(), atol=atol, rtol=rtol)
        exact = reference.apply_plan(x.double(), size.double(), keep, src, dst, p)[0]
        # no worse than the reference against float64 (to one unit in the last place)
        if out.numel():
            err, r_err = (out.double() - exact).abs().max(), (r_out.double() - exact).abs().max()
            assert err <= r_err + atol
    if source is not None:
        got, none, no_log = apply_triton.apply_plan(source, None, keep, src, dst, p, log_size=True)
        assert none is None and no_log is None
        assert torch.equal(got, reference.apply_plan(source, None, keep, src, dst, p)[0])  # 0/1 sums: exact


def _apply_case(N, p, C, dtype, merge, seed, B=2):
    T = N - p
    x = _rand(B, N, C, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    size = torch.randint(1, 5, (B, N, 1), generator=g).float().to(DEVICE)
    source = (torch.rand(B, N, 2 * N, generator=g) > 0.8).float().to(DEVICE)
    check_apply(x, size, *_plan(B, T, merge, seed), p, source=source)


@cases("N,p,merge", product([1, 50, 197], [0, 1, 2, 3, 4, 5], [False, True]),
       default=[(1, 0, False), (1, 1, True), (50, 0, True), (50, 2, False), (50, 5, True), (197, 1, True),
                (197, 3, False), (197, 4, True)])
def test_apply_plan_matches_reference(N, p, merge):
    if p > N:
        pytest.skip("more special tokens than tokens")
    _apply_case(N, p, [37, 100, 3][(N + p) % 3], torch.float32, merge, seed=N * 7 + p)


@cases("N,p,C,dtype,merge", [(*s, d, m) for s, d, m in product([(50, 1, 37), (197, 2, 100)], HALF, [False, True])],
       default=[(50, 1, 37, torch.float16, True), (50, 1, 37, torch.bfloat16, False),
                (197, 2, 100, torch.bfloat16, True), (197, 2, 100, torch.float16, False)])
def test_apply_plan_half_precision(N, p, C, dtype, merge):
    _apply_case(N, p, C, dtype, merge, seed=N + p)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("p", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("N", [1, 50, 197, 577])
def test_apply_plan_full_grid(N, p, merge, dtype):
    if p > N:
        pytest.skip("more special tokens than tokens")
    _apply_case(N, p, [37, 100, 384, 3][(N + p) % 4], dtype, merge, seed=N * 11 + p)


def test_apply_plan_structure(monkeypatch):
    """Many row / merge / channel tiles (GPU-sized, and the GPU's float32 tl.dot), every merge into
    one token, strided inputs, expanded (stride 0) index tensors, empty shapes."""
    monkeypatch.setattr(apply_triton, "MAX_BLOCKS_INTERPRETED", apply_triton.MAX_BLOCKS)
    monkeypatch.setattr(_triton_utils, "INTERPRETER_FP32_DOT", True)
    x = _rand(2, 197, 2 * 150, seed=31)[..., ::2]  # channel stride 2
    size = torch.randint(1, 9, (2, 197, 1), generator=torch.Generator().manual_seed(3)).float().to(DEVICE)
    keep, src, dst = _plan(2, 196, True, seed=4)
    check_apply(x, size, keep, src, dst, 1)
    check_apply(x, size, keep, src, torch.zeros_like(dst), 1)  # 65 rows into one
    arange = torch.arange(196, device=DEVICE).expand(2, 196)
    check_apply(x, size, arange[:, 1::2], arange[:, 0::2], torch.arange(98, device=DEVICE).expand(2, 98), 1)
    check_apply(x, size, arange[:, :0], None, None, 1)  # only the special token stays
    check_apply(x[:, :, :0], size, keep, src, dst, 1)  # no channels
    out, new_size, _ = apply_triton.apply_plan(x[:0], size[:0], keep[:0], src[:0], dst[:0], 1)
    assert out.shape == (0, 1 + keep.shape[1], 150) and new_size.shape == (0, 1 + keep.shape[1], 1)
    with pytest.raises(ValueError):
        apply_triton.apply_plan(x, size, keep, src, None, 1)


def test_apply_plan_fractional_sizes():
    """Sizes need not be integers (tokencorr weighs by attention)."""
    x = _rand(2, 50, 37, seed=41)
    size = torch.rand(2, 50, 1, generator=torch.Generator().manual_seed(42)).to(DEVICE) + 1e-3
    keep, src, dst = _plan(2, 49, True, seed=43)
    out, new_size, _ = apply_triton.apply_plan(x, size, keep, src, dst, 1)
    r_out, r_size, _ = reference.apply_plan(x, size, keep, src, dst, 1)
    torch.testing.assert_close(new_size, r_size, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- dispatch

def test_dispatch_chooses(monkeypatch):
    x = _rand(2, 9, 8)
    monkeypatch.setenv("VITCOMPRESS_KERNELS", "torch")
    assert dispatch._pick("bipartite_match", x) is reference.bipartite_match
    monkeypatch.setenv("VITCOMPRESS_KERNELS", "triton")
    assert dispatch._pick("bipartite_match", x) is bipartite_triton.bipartite_match
    assert dispatch._pick("energy_score", x) is energy_triton.energy_score
    assert dispatch._pick("pagerank_steps", x) is pagerank_triton.pagerank_steps
    assert dispatch._pick("topk_indices", x) is topk_triton.topk_indices
    assert dispatch._pick("apply_plan", x) is apply_triton.apply_plan
    assert dispatch._pick("rank_plan", x) is plan_triton.rank_plan
    assert dispatch._pick("pagerank_scores", x) is pagerank_triton.pagerank_scores
    assert dispatch.triton_available()
    monkeypatch.delenv("VITCOMPRESS_KERNELS")
    expected = topk_triton.topk_indices if x.is_cuda else reference.topk_indices
    assert dispatch._pick("topk_indices", x) is expected
    assert dispatch._pick("topk_indices", x.cpu()) is reference.topk_indices
    # where the GPU measurements found torch faster, "auto" keeps the reference on CUDA too
    assert dispatch._torch_is_faster("topk_indices", torch.zeros(2, 4096))
    assert not dispatch._torch_is_faster("topk_indices", torch.zeros(2, 577))
    assert dispatch._torch_is_faster("energy_score", torch.zeros(2, 576, 64))
    assert not dispatch._torch_is_faster("energy_score", torch.zeros(2, 576, 64, dtype=torch.float16))
    assert not dispatch._torch_is_faster("energy_score", torch.zeros(2, 197, 64))
    monkeypatch.setenv("VITCOMPRESS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="VITCOMPRESS_KERNELS"):
        dispatch.topk_indices(x[..., 0], 2)


def test_dispatch_runs_the_chosen_path(monkeypatch):
    x = _rand(2, 33, 16)
    for choice in ("torch", "triton"):
        monkeypatch.setenv("VITCOMPRESS_KERNELS", choice)
        s, i = dispatch.bipartite_match(x[:, ::2], x[:, 1::2])
        e = dispatch.energy_score(x, 0.5)
        order = dispatch.topk_indices(e, 33)
        torch.testing.assert_close(s, reference.bipartite_match(x[:, ::2], x[:, 1::2])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(e, reference.energy_score(x, 0.5, 1.0), atol=1e-5, rtol=0)
        assert order.shape == (2, 33)


def test_dispatch_uses_references_while_capturing(monkeypatch):
    monkeypatch.setenv("VITCOMPRESS_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "capturing", lambda: True)
    assert dispatch._pick("energy_score", _rand(1, 4, 4)) is reference.energy_score


def test_forced_triton_without_triton_fails_clearly(monkeypatch):
    monkeypatch.setattr(dispatch, "_TRITON", {})
    monkeypatch.setattr(dispatch, "_loaded", True)
    monkeypatch.setattr(dispatch, "_load_error", ImportError("no triton here"))
    monkeypatch.setenv("VITCOMPRESS_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="no triton here"):
        dispatch.topk_indices(_rand(1, 4), 2)
    monkeypatch.delenv("VITCOMPRESS_KERNELS")
    assert torch.equal(dispatch.topk_indices(_rand(1, 4), 2), reference.topk_indices(_rand(1, 4), 2))


@pytest.mark.skipif(CUDA, reason="the CPU-tensor guard only matters off the GPU")
def test_cpu_tensor_without_interpreter_fails_clearly(monkeypatch):
    monkeypatch.setattr(_triton_utils, "is_interpreted", lambda kernel: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        topk_triton.topk_indices(_rand(1, 4), 2)


# ---------------------------------------------------------------------------- whole model

@pytest.mark.parametrize("method,budget,model_kw", [
    *(pytest.param(*c, marks=pytest.mark.slow)
      for c in (("tome", {"r": 6}, {}), ("pitome", {"keep": 0.8}, {}), ("zero_tprune", {"keep": 0.8}, {}))),
    ("tome", {"r": 5, "trace_source": True}, {"reg_tokens": 3}),
    ("pitome", {"keep": 0.85, "trace_source": True}, {"class_token": False, "reg_tokens": 2, "global_pool": "avg"}),
    ("zero_tprune", {"keep": 0.85, "order": "IS", "cls_init": "uniform"}, {"reg_tokens": 4}),
    ("tofu", {"r": 5, "trace_source": True}, {"reg_tokens": 2})])  # the fused apply, then MLERP's rescale
def test_compressed_model_same_with_kernels_forced_on(method, budget, model_kw, monkeypatch):
    if method not in vitcompress.list_methods():
        pytest.skip(f"{method} is not registered")
    model = tiny_vit(depth=2, **model_kw).to(DEVICE)
    vitcompress.compress(model, method, **budget)
    x = _rand(3, 3, 32, 32, seed=11)
    outs, tokens, sources = {}, {}, {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv("VITCOMPRESS_KERNELS", choice)
        with torch.inference_mode():
            outs[choice] = model(x)
        tokens[choice] = vitcompress.stats(model)["tokens_per_layer"]
        sources[choice] = vitcompress.stats(model).get("source")
    assert tokens["torch"] == tokens["triton"]
    assert tokens["torch"][-1] < tokens["torch"][0]  # it did reduce
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-5, rtol=1e-5)
    if budget.get("trace_source"):
        assert torch.equal(sources["triton"], sources["torch"])


def test_gpu_tiling_interpreted(monkeypatch):
    """The GPU's tile sizes and its float32 tl.dot path, run through the interpreter."""
    for mod in (bipartite_triton, energy_triton):
        monkeypatch.setattr(mod, "MAX_BLOCKS_INTERPRETED", mod.MAX_BLOCKS)
    monkeypatch.setattr(_triton_utils, "INTERPRETER_FP32_DOT", True)
    x = _rand(3, 197, 96, seed=12)
    check_match(x[:, 1::2], x[:, 0::2])
    check_energy(x, 0.75, 1.0)
    check_match(_rand(1, 50, 384, seed=13), _rand(1, 130, 384, seed=14))
    check_energy(_rand(1, 130, 3, seed=15), 0.2, 1.0)
    monkeypatch.setattr(topk_triton, "MAX_ELEMENTS_INTERPRETED", 1)  # one row a program
    check_topk((_rand(5, 197, seed=17) * 2).round(), 150)
    check_topk((_rand(2, 4096, seed=19) * 2).round(), 4096)


def test_topk_many_programs(monkeypatch):
    monkeypatch.setattr(topk_triton, "MAX_ELEMENTS_INTERPRETED", 4096)
    scores = (_rand(37, 300, seed=16) * 3).round()  # 8 rows a program, 5 programs, the last part-empty
    check_topk(scores, 300)
    check_topk(scores, 7)
