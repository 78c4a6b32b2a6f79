"""ATC: Agglomerative Token Clustering (Haurum, Escalera, Taylor, Moeslund; ECCV 2024).

In a reducing block the reducible tokens are clustered bottom-up: starting from one cluster per
token, the two closest clusters are joined until ``T - r`` clusters remain; each cluster becomes
one token, the size-weighted mean of its members. As the official code (JoakimHaurum/ATC) does it:

* **Distance**: cosine distance ``1 - cos`` of the keys averaged over heads (the ToMe metric),
  special tokens left out.
* **Linkage**: how far apart two clusters are, from their members' distances: ``"average"``
  (the mean pairwise distance; the default of every official script), ``"complete"`` (the largest)
  or ``"single"`` (the smallest). Each token counts once, whatever its size.
* **Where**: the training-free (off-the-shelf) setting of the paper reduces in every block with a
  ToMe-style schedule, which ``flops=`` / ``keep=`` / ``r=`` give; ``layers`` restricts it (the
  fine-tuned DeiT setting: blocks 3, 6, 9).

The official code runs scikit-learn's ``AgglomerativeClustering`` (SciPy's hierarchy) per image on
the CPU. Here the clustering is the textbook greedy algorithm, batched over images in torch
(:func:`agglomerative_clustering`): ``r`` steps, each one arg-min over the ``[B, T, T]`` distances and
a Lance-Williams update of one row and column, in float64 as SciPy computes. No per-image loop, no
host round trip, a static token count (so it compiles and exports), at ``r`` sequential steps of
``O(B T^2)`` work each -- the measured cost is on docs/methods/atc.md.

A cluster is kept as its member of lowest index (its representative), the others merge into it;
clusters come out in the order of their representatives. The official code orders them by
scikit-learn's labels; nothing after the block depends on that order except the summation order of
a mean pooling. The partition is the same up to ties in the distances.
"""
from typing import Tuple

import torch

from ..interfaces import Plan, Signals, ViTMethod
from .block_options import check_layers, check_layers_fit

LINKAGES = ("average", "complete", "single")


def cosine_distances(metric: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between the rows of ``metric[B, T, d]`` -> float64 ``[B, T, T]``, computed as the
    official code does: normalised keys, one batched product, in the keys' dtype (the norms in float32)."""
    norm = torch.linalg.vector_norm(metric, dim=-1, keepdim=True, dtype=torch.float32)
    m = metric / norm.to(metric.dtype)
    return (1 - m @ m.transpose(-1, -2)).double()


def agglomerative_clustering(distances: torch.Tensor, r: int, linkage: str = "average"
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Join the two closest clusters ``r`` times over the distances ``distances[B, T, T]`` (its upper
    triangle is read).

    Returns ``(label [B, T], alive [B, T])``: each token's cluster, named by its representative (the
    member of lowest index), and which tokens are representatives (``T - r`` per image).
    """
    B, T, _ = distances.shape
    tokens = torch.arange(T, device=distances.device)
    label = tokens.expand(B, T).clone()
    size = torch.ones(B, T, dtype=distances.dtype, device=distances.device)
    alive = torch.ones(B, T, dtype=torch.bool, device=distances.device)
    inf = torch.tensor(float("inf"), dtype=distances.dtype, device=distances.device)
    upper = torch.triu(distances, diagonal=1)  # the pairs i < j, as scikit-learn hands them to SciPy
    d = (upper + upper.transpose(1, 2)).masked_fill(torch.eye(T, dtype=torch.bool, device=distances.device), inf)
    for _ in range(r):
        flat = d.flatten(1).argmin(dim=1)  # d is symmetric: the first minimum in row-major order has i < j
        i, j = flat // T, flat % T
        row_i = d.gather(1, i[:, None, None].expand(B, 1, T))[:, 0]
        row_j = d.gather(1, j[:, None, None].expand(B, 1, T))[:, 0]
        if linkage == "average":  # Lance-Williams, each cluster weighted by its number of tokens
            n_i, n_j = size.gather(1, i[:, None]), size.gather(1, j[:, None])
            joined = (n_i * row_i + n_j * row_j) / (n_i + n_j)
            size = size + (tokens == i[:, None]) * n_j
        elif linkage == "complete":
            joined = torch.maximum(row_i, row_j)
        else:
            joined = torch.minimum(row_i, row_j)
        is_i, is_j = tokens == i[:, None], tokens == j[:, None]  # [B, T]
        joined = joined.masked_fill(is_i | is_j | ~alive, inf)
        # in place, one row and one column each: cluster i takes the joined distances, j leaves
        d.scatter_(1, i[:, None, None].expand(B, 1, T), joined[:, None, :])
        d.scatter_(2, i[:, None, None].expand(B, T, 1), joined[:, :, None])
        d.scatter_(1, j[:, None, None].expand(B, 1, T), inf.expand(B, 1, T))
        d.scatter_(2, j[:, None, None].expand(B, T, 1), inf.expand(B, T, 1))
        alive = alive & ~is_j
        label = torch.where(label == j[:, None], i[:, None], label)
    return label, alive


def clustering_plan(label: torch.Tensor, alive: torch.Tensor, r: int) -> Plan:
    """The plan of a clustering: representatives kept in index order, every other token merged
    into its cluster's representative."""
    T = label.shape[1]
    by_alive = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)  # representatives first
    keep, merge_src = by_alive[:, : T - r], by_alive[:, T - r:]
    position = alive.long().cumsum(dim=1) - 1  # a representative's place in keep
    merge_dst = position.gather(1, label.gather(1, merge_src))
    return Plan(keep=keep, merge_src=merge_src, merge_dst=merge_dst)


def token_clustering(metric: torch.Tensor, r: int, linkage: str = "average") -> Plan:
    """One ATC block: ``metric[B, T, d]`` (keys averaged over heads) -> ``T - r`` clusters."""
    B, T, _ = metric.shape
    if r == 0:
        return Plan(keep=torch.arange(T, device=metric.device).expand(B, T))
    label, alive = agglomerative_clustering(cosine_distances(metric), r, linkage)
    return clustering_plan(label, alive, r)


class ATC(ViTMethod):
    name = "atc"
    kind = "merge"
    defaults = {"linkage": "average", "layers": None}
    default_budget = {"keep": 0.9}
    option_help = {
        "linkage": "distance between clusters: 'average' (mean pairwise), 'complete' (largest) or 'single' (smallest)",
        "layers": "block indices that reduce (None: every block, the paper's off-the-shelf setting)",
    }

    def validate(self, options) -> None:
        if options["linkage"] not in LINKAGES:
            raise ValueError(f"atc linkage={options['linkage']!r}: use 'average' (default), 'complete' or 'single'")
        layers = options["layers"]
        check_layers("atc", layers, "every block")

    def reduces(self, layer, num_layers, options) -> bool:
        layers = options["layers"]
        if layers is not None:
            check_layers_fit("atc", layers, num_layers)
        return layers is None or layer in layers

    def max_remove(self, tokens, layer, num_layers, options) -> int:
        return max(tokens - 1, 0)

    def overhead_flops(self, tokens, num_prefix, remove, num_heads, head_dim, layer, num_layers, options):
        t = tokens - num_prefix  # the cosine similarities; the clustering steps are no matrix product
        return t * t * head_dim

    def plan(self, signals: Signals, remove: int, options) -> Plan:
        return token_clustering(signals.metric, remove, options["linkage"])
