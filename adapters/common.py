"""Helpers shared by adapters: FLOPs per token of a module, counted as fvcore counts them."""
import math

import torch.nn as nn


def per_token_flops(module) -> int:
    """Multiply-adds a module spends per token: in*out for every Linear, 5 (affine) or 4 per
    element for every LayerNorm, the rest (activations, scaling) uncounted, as in fvcore."""
    if module is None:
        return 0
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, nn.LayerNorm):
            total += (5 if m.elementwise_affine else 4) * math.prod(m.normalized_shape)
    return total
