"""What a token-reduction method is to the rest of the library.

A method is a set of pure tensor functions (in its own module) plus a small descriptor class that
declares its options with defaults, the signals it needs and how many tokens a layer can remove.
The descriptor never touches an ``nn.Module``.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ..tokens import Plan


@dataclass
class Signals:
    """Everything a reducing layer can offer a method, computed once in the shared block.

    ``metric[B, T, d]``: keys averaged over heads (the ToMe metric), reducible tokens only.
    ``x[B, T, C]``: hidden states of the reducible tokens after the attention residual.
    ``attn[B, H, N, N]``: attention probabilities over all N tokens (prefix included), present only
    in layers where the method asked for them. ``cls_first``: whether the first special token is a
    class token (a timm ViT without one may still have register tokens).
    """

    metric: torch.Tensor
    x: torch.Tensor
    attn: Optional[torch.Tensor]
    num_prefix: int
    layer: int
    num_layers: int
    cls_first: bool = True


class Method:
    name: str = ""
    kind: str = "merge"  # "merge" keeps mass (size-weighted); "prune" drops tokens
    dynamic: bool = False  # True when token counts depend on the content (no static schedule; not exportable)
    # What the method reduces: "vit" (the token sequence of a ViT-like encoder: timm, CLIP towers),
    # "detr" (a detection encoder), "llava" (the visual tokens handed to a language model).
    target: str = "vit"
    defaults: Dict[str, Any] = {}
    # Defaults a paper sets per model family, keyed by the adapter's ``variant`` (e.g. "clip");
    # applied over ``defaults``, under the user's options.
    family_defaults: Dict[str, Dict[str, Any]] = {}
    default_budget: Dict[str, Any] = {"keep": 0.9}
    keep_means: str = "fraction of tokens kept per reducing block"  # what keep= is, for error messages

    def max_remove(self, tokens: int, layer: int, num_layers: int, options: Dict[str, Any]) -> int:
        """Most reducible tokens this layer can remove when ``tokens`` enter it."""
        return tokens // 2

    def reduces(self, layer: int, num_layers: int, options: Dict[str, Any]) -> bool:
        """Whether block ``layer`` reduces at all (static)."""
        return True

    def needs_attention(self, layer: int, num_layers: int, options: Dict[str, Any]) -> bool:
        return False

    def overhead_flops(self, tokens: int, num_prefix: int, remove: int, num_heads: int, head_dim: int,
                       layer: int, num_layers: int, options: Dict[str, Any]) -> int:
        """Multiply-adds the scoring itself costs in a reducing layer (for FLOPs planning), as
        fvcore counts them: only its matrix products."""
        return 0

    def plan(self, signals: Signals, remove: int, options: Dict[str, Any]) -> Plan:
        raise NotImplementedError

    def validate(self, options: Dict[str, Any]) -> None:
        """Raise ValueError for option values outside their domain."""
