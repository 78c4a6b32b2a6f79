"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"): after layer K of
the language model, keep the visual tokens that receive the most attention from the last token.

* **Score**, :func:`last_token_attention`: the attention the last (real) token pays every token in
  layer K (the K-th layer, 0-based ``K - 1``), softmax over its real keys in float32, averaged over
  the heads -- the official code's ``mean(attention, dim=1)[-1]``. It is computed from that layer's
  q and k (rotary applied) for the one query row; the layer itself still runs the model's fused attention.
* **Keep**, :func:`top_visual`: each sample keeps ``round(keep * N)`` of its ``N`` visual tokens,
  the highest scores (the official ``topk(round(N * (1 - R)))``; ``keep = 1 - R``, the paper's
  filtering ratio ``R``), from layer K on (0-based layer ``K``).

Defaults as the paper and the official code (github.com/pkunlp-icler/FastV): ``K = 2``, ``R = 50%``
(``keep=0.5``). Layers from K on see the kept tokens at their original positions, as the official
in-place version (``position_ids = keep_indexs``).
"""
from typing import Any, Dict, Tuple

import torch

from ..interfaces import DropSignals, LanguageModelMethod
from .block_options import is_int

Tensor = torch.Tensor


def last_token_attention(q: Tensor, k: Tensor, valid: Tensor) -> Tensor:
    """``[B, T]``: the attention the last real token pays each token, averaged over heads
    (``q``, ``k`` ``[B, H, T, d]``; ``valid[B, T]`` the real keys; softmax in float32, then the query dtype)."""
    positions = torch.arange(valid.shape[1], device=valid.device)
    last = torch.where(valid, positions, -1).max(1).values
    query = q.gather(2, last[:, None, None, None].expand(-1, q.shape[1], 1, q.shape[3]))
    logits = (query @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    allowed = valid & (positions[None] <= last[:, None])
    logits = logits.masked_fill(~allowed[:, None, None, :], torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype).mean(1)[:, 0]


def top_visual(scores: Tensor, visual: Tensor, counts: Tensor) -> Tensor:
    """``[B, T]`` bool: per sample the ``counts[b]`` visual tokens of highest ``scores``."""
    masked = scores.masked_fill(~visual, float("-inf"))
    top = masked.topk(int(counts.max()), dim=1).indices
    chosen = torch.arange(top.shape[1], device=top.device)[None] < counts[:, None]
    keep = torch.zeros_like(visual)
    return keep.scatter(1, top, chosen) & visual


def fastv_keep(signals: DropSignals, keep: float, layer: int) -> Tensor:
    """The visual tokens FastV keeps: ``round(keep * N)`` of each sample's ``N`` by layer ``layer``'s
    last-token attention."""
    q, k = signals.query_key(layer)
    scores = last_token_attention(q, k, signals.valid)
    counts = torch.tensor([round(n * keep) for n in signals.visual_before.tolist()], device=scores.device)
    return top_visual(scores, signals.visual, counts)


class FastV(LanguageModelMethod):
    """Descriptor: one drop before layer ``layer`` (0-based), scored by the layer before it."""

    name = "fastv"
    defaults = {"layer": 2}
    option_help = {"layer": "K: visual tokens drop after the K-th layer of the language model, scored by its attention"}
    default_budget = {"keep": 0.5}
    keep_means = "fraction of each sample's visual tokens kept after layer K (1 - the paper's R)"

    def validate(self, options: Dict[str, Any]) -> None:
        if not is_int(options["layer"]) or options["layer"] < 1:
            raise ValueError(f"fastv layer={options['layer']!r}: give K >= 1 (the paper's K = 2)")

    def drop_layers(self, options: Dict[str, Any], depth: int) -> Tuple[int, ...]:
        if options["layer"] >= depth:
            raise ValueError(f"fastv layer={options['layer']}: the language model has {depth} layers; K must be "
                             "smaller")
        return (options["layer"],)

    def signal_layers(self, options: Dict[str, Any], depth: int) -> Tuple[int, ...]:
        return (options["layer"] - 1,)

    def select(self, signals: DropSignals, keep: float, options: Dict[str, Any]) -> Tensor:
        return fastv_keep(signals, keep, options["layer"] - 1)
