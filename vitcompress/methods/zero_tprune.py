"""Zero-TPrune: zero-shot token pruning with the attention graph (Wang, Dedhia, Jha; CVPR 2024).

The attention matrix of a head, ``A[i, j]`` = how much query ``i`` attends to key ``j`` (rows sum
to 1), is read as the adjacency matrix of a weighted directed graph. A token is important when
important tokens attend to it, which is PageRank on that graph:

* **Weighted PageRank (WPR)**, :func:`weighted_pagerank`: ``s^0 = 1/N``, ``s^t = A^T s^(t-1)``.
  ``A`` is row-stochastic, so ``s^t`` stays a distribution and its fixed point is the stationary
  distribution of the attention Markov chain. The paper's iteration counts (enough to converge
  there): 30-50 in the first three blocks, 5-10 in the middle, 1 in the last three.
* **Variance-based head filter (VHF)**, :func:`head_mask`: a head whose scores are nearly
  uniform, or piled on a few tokens, misleads the ranking; heads whose score variance (of
  ``N * s``, mean 1) lies outside ``[var_min, var_max] = [0.01, 0.7]`` are left out.
* **Emphasizing informative region (EIR)**, :func:`aggregate_heads`: the kept heads are combined
  by root-mean-square, ``s_i = sqrt(sum_h s_hi^2 / H_kept)``, so a token that one head finds very
  important is not outvoted by tokens every head finds mildly important.
* **I-stage**: keep the top tokens by that score. **S-stage**: sort by score, the less important
  half is set A and the rest set B; each A token is matched to its most cosine-similar B token
  (keys averaged over heads); the A tokens with the highest match are dropped (pruned, not
  merged). **CLS and every other special token are always kept.**

Stage order. A pruning layer runs **I' -> S -> I**: I' ranks the tokens with a single WPR
iteration and prunes nothing; that ranking partitions the S-stage; the I-stage then runs the
full WPR on what the S-stage left. The paper puts S before I because a large group of similar
(background) tokens otherwise outvotes the rest in PageRank ("overwhelming of the major group").

Choices where the paper leaves room (each is an option; defaults in :attr:`ZeroTPrune.defaults`):

* **Which blocks prune** (``layers``): every block, as the per-block iteration counts imply;
  a block's pruning layer sits after its attention and uses that attention (the shared
  reducing block), so attention probabilities exist only in blocks that prune.
* **All three stages live in one pruning layer** and use that block's attention. The I-stage runs
  on the attention among the tokens the S-stage kept (special tokens included), each row
  renormalised to sum to 1 -- the Markov chain restricted to the survivors -- which is what
  removes the duplicates' votes (computed by masking, ``weighted_pagerank(..., alive=)``).
* **Splitting a block's removals** (``s_ratio``): the S-stage drops ``floor(s_ratio * r)`` and
  the I-stage the rest. Default 1.0: the whole budget goes to the S-stage, partitioned by the
  I' ranking (I' -> S; the I-stage then prunes nothing). Measured in ``experiments/studies/fidelity_table.py
  --ablation`` (README, "Zero-TPrune on real models"): on a real pretrained ViT-S/14 and on the
  embedded reference model, the converged PageRank ranking of the I-stage is worse than chance in
  the early blocks (the "major group" of similar background tokens outvotes the rest), and every
  split that gives the I-stage tokens to prune loses to random pruning at the same schedule, while
  I' -> S beats it. ``s_ratio=0.5`` is an even split, ``s_ratio=0`` the I-stage alone.
  ``order="IS"`` runs the naive I -> S order instead (the S-stage then partitions by the I-stage's
  scores), for ablations.
* **Iterations** (``iters``): ``(30, 5, 1)`` -- the low ends of the paper's ranges -- for the
  first three, middle and last three blocks (DeiT-S has 12). In a model of fewer than 12 blocks
  "three" becomes a quarter of the depth (:func:`edge_layers`; a 6-block model: 1 + 4 + 1).
  An int sets every block, a list gives one count per block.
* **Initial scores** (``cls_init``): the paper's headline variant gives CLS ``sqrt(N)`` times
  the initial score of the other tokens (``"sqrt"``, default; only the first special token, the
  CLS of a timm ViT, is boosted); ``"uniform"`` is its Zero-TPrune-uni. A model without a CLS
  (no special tokens, or registers only) starts uniform either way.
* **Head-filter statistic**: population variance of ``N * s`` over all ``N`` tokens of the
  graph (special tokens included); if no head of an image passes, all its heads are used.
* Kept tokens stay in their original order.

Cost: ``iters * H * N^2`` multiply-adds per WPR (one more on the survivors of an S-stage, for
the rows' renormalisation), ``H * N^2`` for I', ``(T/2)^2 * d`` for the S-stage similarity;
:meth:`ZeroTPrune.overhead_flops` reports exactly the matrix products fvcore counts, so a
``flops=`` budget is met as counted.
"""
import math
from typing import Optional, Tuple

import torch

from ..engine.tokens import gather_tokens
from ..interfaces import Plan, Signals, ViTMethod
from ..kernels import dispatch, reference
from .block_options import check_layers, check_layers_fit, is_int

Tensor = torch.Tensor


# --------------------------------------------------------------------------- scoring


def weighted_pagerank(attn: Tensor, iters: int, init: Optional[Tensor] = None,
                      alive: Optional[Tensor] = None) -> Tensor:
    """Weighted PageRank of each head's attention graph.

    ``attn[B, H, N, N]`` are attention probabilities, row ``i`` = query ``i`` (each row sums to
    1). Starting from ``init`` (a distribution over the ``N`` tokens: ``[N]``, ``[B, N]`` or
    ``[B, H, N]``; uniform ``1/N`` by default), every iteration lets each token pass its score to
    the tokens it attends to, in proportion to the attention: ``s <- A^T s``. Returns the scores
    ``[B, H, N]`` in float32; each head's scores sum to 1. With enough iterations they reach the
    stationary distribution of the Markov chain with transition matrix ``A`` (the left
    eigenvector of eigenvalue 1). ``iters=1`` from uniform is the mean attention each token
    receives.

    ``alive[B, N]`` (bool, optional) restricts the graph to those tokens, as if the attention
    were cut down to their rows and columns and each row renormalised to sum to 1 (the Markov
    chain restricted to them): the other tokens neither vote nor
    receive, and score 0. This costs one extra matrix-vector product (the rows' alive mass).

    Usable on its own, e.g. to rank the tokens of any attention map::

        probs = (q @ k.transpose(-2, -1) * scale).softmax(-1)      # [B, H, N, N]
        scores = weighted_pagerank(probs, iters=30)                # [B, H, N]
    """
    _check_graph(attn, iters)
    return reference.weighted_pagerank(attn, iters, init, alive, steps=dispatch.pagerank_steps)


def _check_graph(attn: Tensor, iters) -> None:
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"weighted_pagerank expects attention [B, H, N, N], got {tuple(attn.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters={iters!r} must be a non-negative int")


def initial_scores(num_tokens: int, num_prefix: int, cls_init: str = "sqrt", device=None,
                   alive: Optional[Tensor] = None) -> Tensor:
    """The WPR starting distribution: uniform, or with the first special token (CLS) weighted
    ``sqrt(n)`` times the others (``cls_init="sqrt"``, the paper's default), ``n`` the number of
    tokens in the graph. ``[N]``, or ``[B, N]`` over the ``alive[B, N]`` tokens when given."""
    return reference.initial_scores(num_tokens, num_prefix, cls_init, device, alive)


def head_variance(scores: Tensor, alive: Optional[Tensor] = None) -> Tensor:
    """Population variance over the tokens of ``n * s`` (mean 1) for scores ``[B, H, N]``, ``n``
    the number of tokens in the graph (those in ``alive[B, N]`` when given) -> ``[B, H]``."""
    return reference.head_variance(scores, alive)


def head_mask(scores: Tensor, var_min: float = 0.01, var_max: float = 0.7, alive: Optional[Tensor] = None) -> Tensor:
    """Variance-based head filter: ``[B, H]`` bool, True for heads whose score variance (of
    ``n * s``, :func:`head_variance`) lies in ``[var_min, var_max]``. An image whose heads all
    fail keeps all of them."""
    return reference.head_mask(scores, var_min, var_max, alive)


def aggregate_heads(scores: Tensor, mask: Optional[Tensor] = None, how: str = "rms") -> Tensor:
    """Combine per-head scores ``[B, H, N]`` over the heads where ``mask[B, H]`` is True.

    ``"rms"`` (emphasizing informative region): ``sqrt(sum_h m_h s_hi^2 / sum_h m_h)``;
    ``"mean"``: ``sum_h m_h s_hi / sum_h m_h``. Returns ``[B, N]``.
    """
    return reference.aggregate_heads(scores, mask, how)


def token_importance(attn: Tensor, num_prefix: int, iters: int, *, alive: Optional[Tensor] = None,
                     kept: Optional[Tensor] = None, var_min: float = 0.01, var_max: float = 0.7,
                     head_filter: bool = True, aggregate: str = "rms", cls_init: str = "sqrt") -> Tensor:
    """The I-stage score of every token: WPR per head -> head filter -> aggregation over heads.

    ``attn[B, H, N, N]`` covers all tokens, the ``num_prefix`` special ones first; ``alive[B, N]``
    optionally restricts the graph (:func:`weighted_pagerank`). Returns the scores of the
    reducible tokens ``[B, N - num_prefix]`` (0 for tokens outside ``alive``).

    ``kept[B, K]`` (indices of reducible tokens) restricts the graph the same way and returns just
    their scores, in ``kept``'s order ``[B, K]``. Without ``alive`` this is one fused call
    (:func:`vitcompress.kernels.dispatch.pagerank_scores`, one kernel on a GPU).
    """
    _check_graph(attn, iters)
    if alive is None:
        return dispatch.pagerank_scores(attn, iters, num_prefix, cls_init == "sqrt", kept, var_min, var_max,
                                        head_filter, aggregate)
    if kept is not None:
        raise ValueError("token_importance: give alive (a mask) or kept (indices), not both")
    N = attn.shape[-1]
    init = initial_scores(N, num_prefix, cls_init, attn.device, alive)
    s = weighted_pagerank(attn, iters, init, alive)
    mask = head_mask(s, var_min, var_max, alive) if head_filter else None
    return aggregate_heads(s, mask, aggregate)[:, num_prefix:]


# --------------------------------------------------------------------------- stages


def similarity_prune(metric: Tensor, scores: Tensor, r: int) -> Tensor:
    """S-stage: which of the reducible tokens ``metric[B, T, d]`` survive dropping ``r``.

    Tokens are sorted by ``scores[B, T]``; the less important half (``T // 2`` tokens) is set A,
    the rest set B. Each A token's best match is its most cosine-similar B token; the ``r`` A
    tokens with the highest match are dropped. Returns the surviving indices ``[B, T - r]``
    (B first, then the kept A tokens, in score order).
    """
    T = metric.shape[1]
    n_a = T // 2
    if not 0 <= r <= n_a:
        raise ValueError(f"the S-stage can drop at most {n_a} of {T} tokens (the less important half), asked {r}")
    order = dispatch.topk_indices(scores, T)  # most important first
    b_idx, a_idx = order[:, : T - n_a], order[:, T - n_a:]
    match_score, _ = dispatch.bipartite_match(metric, metric, a_idx, b_idx)
    keep, _, _ = dispatch.rank_plan(match_score, None, r, a_idx, b_idx, b_first=True)  # the r most redundant out
    return keep


def zero_tprune(attn: Tensor, metric: Tensor, num_prefix: int, r_s: int, r_i: int, iters: int, *,
                prerank_iters: int = 1, order: str = "ISI", **score_options) -> Plan:
    """One Zero-TPrune pruning layer: remove ``r_s`` tokens by similarity and ``r_i`` by importance.

    ``attn[B, H, N, N]``: attention over all tokens (special tokens first); ``metric[B, T, d]``:
    keys of the ``T = N - num_prefix`` reducible tokens. ``order="ISI"``: the I' stage ranks with
    ``prerank_iters`` WPR iterations (removing nothing), the S-stage drops ``r_s``, the I-stage
    runs ``iters`` WPR iterations on the survivors' attention graph and drops ``r_i``.
    ``order="IS"``: I-stage first, then the S-stage partitioned by its scores. ``score_options``
    go to :func:`token_importance`. Returns a pruning :class:`~vitcompress.engine.tokens.Plan` whose
    kept indices are in their original order.

    Each importance score is one fused call (:func:`token_importance` with ``kept=``: PageRank,
    head filter and aggregation; on the survivors of a stage, by their indices), and no step reads
    a value back to the host.
    """
    B, T = metric.shape[:2]
    p = num_prefix
    alive = None  # the reducible tokens still in the graph (None: all of them, in order)

    def importance(n_iters):  # scores of the alive tokens, in alive's order
        return token_importance(attn, p, n_iters, kept=alive, **score_options)

    def s_stage(scores):
        if alive is None:
            return similarity_prune(metric, scores, r_s)
        return alive.gather(1, similarity_prune(gather_tokens(metric, alive), scores, r_s))

    def top(scores, k):
        best = dispatch.topk_indices(scores, k)
        return best if alive is None else alive.gather(1, best)

    if order == "ISI":
        if r_s > 0:
            alive = s_stage(importance(prerank_iters))
        if r_i > 0:
            alive = top(importance(iters), (T if alive is None else alive.shape[1]) - r_i)
    elif order == "IS":
        if r_i > 0 or r_s > 0:
            scores = importance(iters)
            if r_i > 0:
                best = dispatch.topk_indices(scores, T - r_i)
                alive, scores = best, scores.gather(1, best)
            if r_s > 0:
                alive = s_stage(scores)
    else:
        raise ValueError(f"order={order!r}: use 'ISI' (I' -> S -> I) or 'IS'")
    if alive is None:
        return Plan(keep=torch.arange(T, device=metric.device).expand(B, T))
    return Plan(keep=torch.sort(alive, dim=1).values)


# --------------------------------------------------------------------------- descriptor


def iters_at(layer: int, num_layers: int, iters) -> int:
    """WPR iterations in block ``layer``: an int, a per-block list, or ``(first three, middle,
    last three)``."""
    if isinstance(iters, int):
        return iters
    if isinstance(iters, list):
        return iters[layer]
    early, middle, late = iters
    edge = edge_layers(num_layers)
    if layer < edge:
        return early
    if layer >= num_layers - edge:
        return late
    return middle


def edge_layers(num_layers: int) -> int:
    """How many blocks count as "the first three" (and "the last three"): 3 from 12 blocks up,
    a quarter of the depth in shallower models (none below 4 blocks: all "middle")."""
    return min(3, num_layers // 4)


def split_removals(remove: int, s_ratio: float) -> Tuple[int, int]:
    """``(r_s, r_i)``: a block's removals done by the S-stage and by the I-stage."""
    r_s = int(math.floor(s_ratio * remove + 1e-9))
    return r_s, remove - r_s


def _feasible(tokens: int, remove: int, s_ratio: float, order: str) -> bool:
    if remove > tokens - 1:
        return False
    r_s, r_i = split_removals(remove, s_ratio)
    left = tokens if order == "ISI" else tokens - r_i
    return r_s <= left // 2



class ZeroTPrune(ViTMethod):
    name = "zero_tprune"
    kind = "prune"
    defaults = {
        "iters": (30, 5, 1),
        "prerank_iters": 1,
        "var_min": 0.01,
        "var_max": 0.7,
        "head_filter": True,
        "aggregate": "rms",
        "cls_init": "sqrt",
        "s_ratio": 1.0,
        "order": "ISI",
        "layers": None,
    }
    default_budget = {"flops": 0.653}  # the paper's DeiT-S setting: -34.7% FLOPs
    option_help = {
        "iters": "PageRank iterations: an int, one per block, or (first three, middle, last three) blocks",
        "prerank_iters": "iterations of the I' ranking that partitions the S-stage",
        "var_min": "heads whose score variance (of N*s) is below this are left out",
        "var_max": "heads whose score variance (of N*s) is above this are left out",
        "head_filter": "the variance-based head filter on or off",
        "aggregate": "how kept heads combine: 'rms' (emphasizing informative region) or 'mean'",
        "cls_init": "PageRank start: 'sqrt' (CLS weighted sqrt(N) times) or 'uniform'",
        "s_ratio": "share of a block's removals done by the similarity (S) stage, the rest by importance (I); 0.5 = even split",
        "order": "'ISI' (I' -> S -> I, the paper's) or 'IS'",
        "layers": "block indices that prune (None: every block)",
    }

    def validate(self, options) -> None:
        iters = options["iters"]
        if is_int(iters):
            ok = iters >= 1
        elif isinstance(iters, tuple):
            ok = len(iters) == 3 and all(is_int(v) and v >= 1 for v in iters)
        elif isinstance(iters, list):
            ok = all(is_int(v) and v >= 1 for v in iters)
        else:
            ok = False
        if not ok:
            raise ValueError(f"zero_tprune iters={iters!r}: give an int >= 1, a per-block list of them, or "
                             "(first three, middle, last three) blocks, default (30, 5, 1)")
        if not is_int(options["prerank_iters"]) or options["prerank_iters"] < 1:
            raise ValueError(f"zero_tprune prerank_iters={options['prerank_iters']!r} must be an int >= 1 (default 1)")
        vmin, vmax = options["var_min"], options["var_max"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (vmin, vmax)) or not 0 <= vmin <= vmax:
            raise ValueError(f"zero_tprune var_min={vmin!r}, var_max={vmax!r}: need 0 <= var_min <= var_max "
                             "(default [0.01, 0.7])")
        if not isinstance(options["head_filter"], bool):
            raise ValueError(f"zero_tprune head_filter={options['head_filter']!r} must be True or False")
        if options["aggregate"] not in ("rms", "mean"):
            raise ValueError(f"zero_tprune aggregate={options['aggregate']!r}: use 'rms' (default) or 'mean'")
        if options["cls_init"] not in ("sqrt", "uniform"):
            raise ValueError(f"zero_tprune cls_init={options['cls_init']!r}: use 'sqrt' (default) or 'uniform'")
        s = options["s_ratio"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
            raise ValueError(f"zero_tprune s_ratio={s!r} must be a number in [0, 1] (default 1.0)")
        if options["order"] not in ("ISI", "IS"):
            raise ValueError(f"zero_tprune order={options['order']!r}: use 'ISI' (I' -> S -> I, default) or 'IS'")
        layers = options["layers"]
        check_layers("zero_tprune", layers, "every block")

    def reduces(self, layer, num_layers, options) -> bool:
        layers = options["layers"]
        return layers is None or layer in layers

    def needs_attention(self, layer, num_layers, options) -> bool:
        return self.reduces(layer, num_layers, options)

    def max_remove(self, tokens, layer, num_layers, options) -> int:
        iters, layers = options["iters"], options["layers"]
        if isinstance(iters, list) and len(iters) != num_layers:
            raise ValueError(f"zero_tprune iters has {len(iters)} entries but the model has {num_layers} blocks; "
                             "give one per block")
        if layers is not None:
            check_layers_fit("zero_tprune", layers, num_layers)
        s, order = options["s_ratio"], options["order"]
        r = max(tokens - 1, 0)
        while r > 0 and not _feasible(tokens, r, s, order):
            r -= 1
        return r

    def limit_hint(self, options) -> str:
        if options["s_ratio"] > 0.5:
            return (f", or a smaller s_ratio (now {options['s_ratio']}): the S-stage drops at most the less "
                    "important half of a block's tokens, s_ratio=0.5 lets the I-stage prune the rest")
        return ""

    def overhead_flops(self, tokens, num_prefix, remove, num_heads, head_dim, layer, num_layers, options) -> int:
        t = tokens - num_prefix
        r_s, r_i = split_removals(remove, options["s_ratio"])
        iters = iters_at(layer, num_layers, options["iters"])
        wpr = lambda n, k: k * num_heads * n * n
        sim = lambda m: (m // 2) * (m - m // 2) * head_dim
        total = 0
        if options["order"] == "ISI":
            if r_s > 0:
                total += wpr(tokens, options["prerank_iters"]) + sim(t)
            if r_i > 0:  # on the survivors: one more product for the rows' alive mass
                total += wpr(tokens, iters + (1 if r_s > 0 else 0))
        else:
            total += wpr(tokens, iters) + (sim(t - r_i) if r_s > 0 else 0)
        return total

    def plan(self, signals: Signals, remove: int, options) -> Plan:
        if signals.attn is None:
            raise RuntimeError("zero_tprune needs attention probabilities in every pruning block")
        r_s, r_i = split_removals(remove, options["s_ratio"])
        return zero_tprune(
            signals.attn, signals.metric, signals.num_prefix, r_s, r_i,
            iters_at(signals.layer, signals.num_layers, options["iters"]),
            prerank_iters=options["prerank_iters"], order=options["order"],
            var_min=options["var_min"], var_max=options["var_max"], head_filter=options["head_filter"],
            aggregate=options["aggregate"], cls_init=options["cls_init"] if signals.cls_first else "uniform")
