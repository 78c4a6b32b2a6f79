"""PPT: token Pruning and Pooling (Wu, Zeng, Wang, Chen, 2023), as the official code (xjwu1024/PPT) does it.

In each of a few reducing blocks (the official DeiT setting: blocks 3, 6 and 9 of 12) every image
either **prunes** or **pools** the same number of tokens, chosen from the image's own attention:

* **Importance** (:func:`importance_scores`, the ATS significance score): the [CLS] attention a
  token receives summed over heads, times the norm of its value vector (all heads concatenated),
  normalised to sum to 1 over the reducible tokens.
* **Choice** (:func:`pool_images`): the (unbiased) variance of those scores. A large variance means
  a few tokens matter and the rest are inattentive: prune the least important. A small variance
  means the tokens matter alike and many are duplicates: pool them by ToMe's bipartite matching.
  The official rule: pool when ``var < threshold`` (default 7e-5, the official DeiT-S command),
  prune otherwise.
* **Prune**: keep the most important tokens **in descending order of importance** (the official
  code's order, which decides the next ToMe alternation). **Pool**: ToMe's merge
  (:func:`vitcompress.methods.tome.tome_matching`), size-weighted.

Each image decides for itself, as in the official code; the count is the same for all, so a batch
runs one static plan: both plans are computed and each image takes its own (``Plan.merge_mask`` drops
the sources of the pruning images instead of merging them).

Where this differs from the official code, on purpose:

* The scores are normalised over the reducible tokens only; the official code normalises over every
  token after [CLS] (a distillation token included) and can prune a distillation token. Special tokens
  are never reduced here.
* The official code assumes a class token at position 0; a model without one is refused.
* Scores and their variance are computed in float32 whatever the model's dtype.
"""
import math
from typing import Sequence

import torch

from ..interfaces import Plan, Signals, ViTMethod
from .block_options import check_class_token, check_layers, check_layers_fit
from .block_options import quarter_layers as default_layers
from .tome import tome_matching


def importance_scores(attn: torch.Tensor, v: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """ATS significance of the reducible tokens: ``attn[B, H, N, N]`` probabilities, ``v[B, H, N, d]``
    values -> float32 ``[B, N - num_prefix]`` summing to 1 per image."""
    cls_attention = attn[:, :, 0].float().sum(dim=1)  # [B, N]
    value_norm = torch.linalg.vector_norm(v, dim=(1, 3), dtype=torch.float32)  # all heads' values: [B, N]
    score = (cls_attention * value_norm)[:, num_prefix:]
    return score / score.sum(dim=1, keepdim=True)


def pool_images(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[B]`` bool: the images whose importance varies less than ``threshold`` (they pool; the others prune)."""
    return scores.var(dim=1) < threshold


def pruning_and_pooling(metric: torch.Tensor, scores: torch.Tensor, r: int, num_prefix: int,
                        threshold: float) -> Plan:
    """One PPT block on the reducible tokens: ``metric[B, T, d]`` (keys averaged over heads, for the
    pooling), ``scores[B, T]`` (:func:`importance_scores`); ``r`` tokens leave every image."""
    B, T, _ = metric.shape
    order = torch.sort(scores, dim=1, descending=True).indices
    pooled = tome_matching(metric, r, num_prefix, class_token=True)
    if r == 0:
        return pooled
    pool = pool_images(scores, threshold)[:, None]
    keep = torch.where(pool, pooled.keep, order[:, : T - r])
    merge_src = torch.where(pool, pooled.merge_src, order[:, T - r:])
    merge_dst = torch.where(pool, pooled.merge_dst, torch.zeros_like(pooled.merge_dst))
    return Plan(keep=keep, merge_src=merge_src, merge_dst=merge_dst, merge_mask=pool.expand(B, r))



class PPT(ViTMethod):
    name = "ppt"
    kind = "merge"
    defaults = {"threshold": 7e-5, "layers": None}
    # the official DeiT-S command (r=50 in blocks 3, 6, 9) runs at 2.94 of 4.61 GFLOPs
    default_budget = {"flops": 0.64}
    option_help = {
        "threshold": "an image pools (ToMe merging) when the variance of its importance scores is below this, "
                     "else prunes",
        "layers": "block indices that reduce (None: a quarter, half and three quarters of the depth, "
                  "blocks 3, 6, 9 of 12)",
    }

    def validate(self, options) -> None:
        t = options["threshold"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or math.isinf(t):
            raise ValueError(f"ppt threshold={t!r} must be a finite number >= 0 (default 7e-5)")
        layers = options["layers"]
        check_layers("ppt", layers, "blocks 3, 6, 9 of 12")

    def _layers(self, num_layers, options) -> Sequence[int]:
        layers = options["layers"]
        if layers is None:
            return default_layers(num_layers)
        check_layers_fit("ppt", layers, num_layers)
        return layers

    def reduces(self, layer, num_layers, options) -> bool:
        return layer in self._layers(num_layers, options)

    def needs_attention(self, layer, num_layers, options) -> bool:
        return self.reduces(layer, num_layers, options)

    def overhead_flops(self, tokens, num_prefix, remove, num_heads, head_dim, layer, num_layers, options):
        t = tokens - num_prefix  # ToMe's similarity of the two sets; the scores are no matrix product
        return ((t + 1) // 2) * (t // 2) * head_dim

    def check_model(self, num_prefix, cls_first) -> None:
        check_class_token("ppt", "ranks tokens by the class token's attention", num_prefix, cls_first)

    def plan(self, signals: Signals, remove: int, options) -> Plan:
        scores = importance_scores(signals.attn, signals.v, signals.num_prefix)
        return pruning_and_pooling(signals.metric, scores, remove, signals.num_prefix, options["threshold"])
