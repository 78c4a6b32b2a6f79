"""Softmax attention with its probabilities materialised: the one helper for every method that
reads attention (Zero-TPrune's PageRank, Focus-DETR's attention received, tokencorr's [CLS] row).

Layers that need no probabilities stay on ``F.scaled_dot_product_attention`` (see
:mod:`vitcompress.engine.blocks`); this is the path for the layers that do.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels.chunking import chunk_count

Tensor = torch.Tensor


def softmax_attention(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, scale: float,
                      bias: Optional[Tensor] = None, dropout: float = 0.0) -> Tuple[Optional[Tensor], Tensor]:
    """``probs = softmax(q kᵀ * scale + bias)`` and, with ``v``, ``probs @ v``.

    ``q[B, H, Nq, d]``, ``k[B, H, N, d]``, ``v[B, H, N, d]``; ``bias`` broadcasts to
    ``[B, H, Nq, N]`` and is additive, or boolean as SDPA's mask (True = may attend). Returns
    ``(output [B, H, Nq, d] or None, probs [B, H, Nq, N])`` in the dtype of ``q`` -- under autocast
    too, where a plain softmax would return float32 probabilities (a float32 ``[B, H, N, N]``
    tensor, and a second copy for the product with ``v``). On a CPU the scores, softmax and product
    with ``v`` run for a cache-sized group of heads at a time (unless autograd records them).
    """
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
    if v is None or dropout > 0:
        logits = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1, dtype=q.dtype)
        return (None if v is None else F.dropout(probs, p=dropout) @ v), probs
    B, H, N, d = q.shape
    if q.shape == k.shape == v.shape and not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        # heads-first copies of q, k, v (they are usually views of one [B, N, 3, H, d] projection):
        # one copy instead of one per reshape below
        q, k, v = torch.stack((q, k, v)).unbind(0)
    qs, kt, vs = (q * scale).reshape(B * H, N, d), k.reshape(B * H, -1, d).transpose(1, 2), v.reshape(B * H, -1, d)
    M = kt.shape[-1]
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        bias = bias.expand(B, H, bias.shape[2], M).reshape(B * H, bias.shape[2], M)

    def logits(j):  # no zero bias: baddbmm would spend a pass over the N x N scores copying it
        return torch.bmm(qs[j], kt[j]) if bias is None else torch.baddbmm(bias[j], qs[j], kt[j])

    chunk = chunk_count(q, B * H, N * M * q.element_size())
    if chunk == B * H or _records_grad(q, k, v, bias):  # out= below is not differentiable
        probs = logits(slice(None)).softmax(dim=-1, dtype=q.dtype)
        return torch.bmm(probs, vs).reshape(B, H, N, d), probs.reshape(B, H, N, M)
    probs, out = q.new_empty(B * H, N, M), q.new_empty(B * H, N, d)
    for i in range(0, B * H, chunk):
        j = slice(i, i + chunk)
        torch.softmax(logits(j), dim=-1, dtype=q.dtype, out=probs[j])
        torch.bmm(probs[j], vs[j], out=out[j])
    return out.reshape(B, H, N, d), probs.reshape(B, H, N, M)


def _records_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records an op on ``tensors``: then the chunks cannot be written in place
    (``out=``) and the whole batch runs at once (its probabilities are kept for the backward anyway)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
