"""Similarity, top-k and PageRank primitives: torch references plus fused Triton kernels, chosen by
``dispatch``.

``reference`` holds the plain-torch specification; ``bipartite_triton``, ``energy_triton``,
``topk_triton`` and ``pagerank_triton`` the fused kernels (imported lazily by ``dispatch``, only
where Triton is wanted).
"""
from .dispatch import backend, bipartite_match, energy_score, pagerank_steps, topk_indices, triton_available

__all__ = ["backend", "bipartite_match", "energy_score", "pagerank_steps", "topk_indices", "triton_available"]
