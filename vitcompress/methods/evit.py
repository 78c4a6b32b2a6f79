"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022), training-free.

In a reducing block, after its attention, each reducible token's attentiveness is the attention the
class token pays it, averaged over the heads (``attn[:, :, 0, i].mean(heads)``). The ``k`` most
attentive tokens stay as they are, in descending attentiveness (the official ``topk(sorted=True)``
order); the others are fused into **one extra token**, ``sum_i a_i x_i`` over them with their class
attentions ``a_i`` as weights -- a plain sum, not divided by ``sum_i a_i``, as the official code and
the paper's equation do -- placed after the kept tokens. In later reducing blocks that extra token is
an ordinary token: it competes for the top ``k`` and may be fused again.

As the official code (youweiliang/evit) does it: ``k = ceil(keep_rate * T)`` for ``T`` reducible
tokens entering the block, so a block keeps ``k + 1`` and removes ``T - k - 1``; ``keep_rate = 0.7``
in blocks 4, 7 and 10 of 12 (``drop_loc=(3, 6, 9)``); no proportional attention. Here ``keep=`` is
that keep rate, ``r=`` the tokens a block removes, ``flops=`` resolves to a keep rate.

Rules where the official code has none: blocks ``(L//4, L//2, 3L//4)`` reduce in a model of ``L``
blocks (the official 3, 6, 9 for 12); special tokens besides the class token (distillation,
registers) are never scored, kept or fused (the official code would score a distillation token
like a patch); the extra token's size is the sum of the sizes it fuses (for ``trace_source`` and
size-aware pooling) and it takes the position of its most attentive member. A model without a
class token is refused. Where ``ceil(keep * T) = T - 1`` the official block removes nothing but rescales
its least attentive token to ``a_i x_i``; here that block is left unchanged (docs/methods/evit.md).
"""
import math

import torch

from ..interfaces import Plan, Signals, ViTMethod
from ..kernels import dispatch
from .block_options import check_class_token, check_layers, check_layers_fit
from .block_options import quarter_layers as default_layers


def cls_attention(attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The attention the class token (the first token) pays each reducible token, averaged over the
    heads: ``attn[B, H, N, N]`` -> ``[B, N - num_prefix]``."""
    return attn[:, :, 0, num_prefix:].mean(dim=1)


def evit_plan(cls_attn: torch.Tensor, remove: int) -> Plan:
    """Keep the ``T - remove - 1`` tokens with the highest ``cls_attn[B, T]`` (highest first) and fuse
    the rest into one token after them, weighted by their ``cls_attn`` (not normalised)."""
    T = cls_attn.shape[1]
    left = T - remove - 1
    order = dispatch.topk_indices(cls_attn, T)  # most attentive first
    inattentive = order[:, left:]
    weight = torch.ones_like(cls_attn).scatter(1, inattentive, cls_attn.gather(1, inattentive))
    merge_src = order[:, left + 1:]
    return Plan(keep=order[:, : left + 1], merge_src=merge_src, merge_dst=torch.full_like(merge_src, left),
                merge_weight=weight)




class EViT(ViTMethod):
    name = "evit"
    kind = "merge"
    defaults = {"layers": None, "prop_attn": False}
    default_budget = {"keep": 0.7}
    keep_means = ("keep rate: each reducing block keeps ceil(keep * T) of its T tokens as they are "
                  "and fuses the rest into one token")
    option_help = {
        "layers": "block indices that reduce (None: L//4, L//2, 3L//4 of L blocks, the official 3, 6, 9 of 12)",
    }

    def validate(self, options) -> None:
        layers = options["layers"]
        check_layers("evit", layers, "blocks L//4, L//2, 3L//4", allow_empty=False)

    def check_model(self, num_prefix, cls_first) -> None:
        check_class_token("evit", "scores tokens by the class token's attention", num_prefix, cls_first)

    def _layers(self, num_layers, options):
        layers = options["layers"]
        if layers is None:
            return default_layers(num_layers)
        check_layers_fit("evit", layers, num_layers)
        return layers

    def reduces(self, layer, num_layers, options) -> bool:
        return layer in self._layers(num_layers, options)

    def needs_attention(self, layer, num_layers, options) -> bool:
        return self.reduces(layer, num_layers, options)

    def remove_for_keep(self, tokens, num_prefix, keep) -> int:
        return max(tokens - math.ceil(keep * tokens) - 1, 0)  # the official rounding, float included

    def max_remove(self, tokens, layer, num_layers, options) -> int:
        self._layers(num_layers, options)
        return max(tokens - 2, 0)

    def plan(self, signals: Signals, remove: int, options) -> Plan:
        return evit_plan(cls_attention(signals.attn, signals.num_prefix), remove)
