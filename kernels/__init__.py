"""Similarity and top-k primitives: torch references plus optional fused kernels, via ``dispatch``."""
from .dispatch import backend, bipartite_match, energy_score, topk_indices

__all__ = ["backend", "bipartite_match", "energy_score", "topk_indices"]
