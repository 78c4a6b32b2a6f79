"""The methods reach the similarity / top-k primitives only through here.

``VITCOMPRESS_KERNELS=torch`` forces the references. Fused Triton versions plug in beside the
references under the same names; until one is registered for a primitive, the reference runs.
"""
import os

from . import reference

_TRITON = {}


def backend() -> str:
    choice = os.environ.get("VITCOMPRESS_KERNELS", "auto").lower()
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"VITCOMPRESS_KERNELS={choice!r}: use 'torch', 'triton' or leave it unset")
    return choice


def _pick(name: str, tensor):
    choice = backend()
    fused = _TRITON.get(name)
    if choice == "triton":
        if fused is None:
            raise RuntimeError(f"VITCOMPRESS_KERNELS=triton but no Triton kernel for {name!r} is available")
        return fused
    if choice == "auto" and fused is not None and tensor.is_cuda:
        return fused
    return getattr(reference, name)


def bipartite_match(a, b):
    return _pick("bipartite_match", a)(a, b)


def energy_score(x, margin, alpha=1.0):
    return _pick("energy_score", x)(x, margin, alpha)


def topk_indices(scores, k):
    return _pick("topk_indices", scores)(scores, k)
