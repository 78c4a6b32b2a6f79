"""Fused primitives: torch references plus Triton kernels, chosen by ``dispatch``.

``reference`` holds the plain-torch specification; ``apply_triton`` (executing a plan),
``bipartite_triton`` (similarity max/argmax), ``plan_triton`` (ranking a match into a plan),
``energy_triton``, ``topk_triton`` and ``pagerank_triton`` the fused kernels (imported lazily by
``dispatch``, only where Triton is wanted); ``ops`` registers them as ``torch.ops.vitcompress.*``
custom ops for ``torch.compile``.
"""
from .dispatch import (
                       apply_plan,
                       backend,
                       bipartite_match,
                       energy_score,
                       pagerank_scores,
                       pagerank_steps,
                       rank_plan,
                       topk_indices,
                       triton_available,
)

__all__ = ["apply_plan", "backend", "bipartite_match", "energy_score", "pagerank_scores", "pagerank_steps",
           "rank_plan", "topk_indices", "triton_available"]
