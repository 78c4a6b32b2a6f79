"""PyramidDrop (Xing et al., CVPR 2025): the language model in stages; at the end of each stage the
visual tokens that receive the least attention from the last instruction token drop, so each stage
keeps ``lambda`` of the previous stage's visual tokens.

* **Stages**: boundaries after layers ``D/4, D/2, 3D/4`` of a ``D``-layer language model (the
  official ``layer_list [8, 16, 24]`` of LLaMA's 32 layers, github.com/Cooperx521/PyramidDrop), so
  stage ``s`` runs on ``int(N * lambda^s)`` of a sample's ``N`` visual tokens (``image_token_ratio_list
  [0.5, 0.25, 0.125]`` for ``lambda = 0.5``, each from the original ``N``).
* **Rank**, :func:`~vitcompress.methods.fastv.last_token_attention`: the attention the last
  instruction token (the prompt's last real token) pays each visual token, from the q and k of the
  layer that starts the next stage (the official ``self.layers[rank_layer]``), averaged over heads.
* ``keep`` is ``lambda`` (default 0.5, the paper's).

One deliberate difference: kept tokens keep their original positions (as FastV and DART); the
official code renumbers the survivors ``0..n-1`` at each boundary and shifts decoding positions by
the drop, which changes rotary phases from the second stage on.
"""
from typing import Any, Dict, Tuple

import torch

from ..interfaces import DropSignals, LanguageModelMethod
from .block_options import check_layers, quarter_layers
from .fastv import last_token_attention, top_visual

Tensor = torch.Tensor


class PyramidDrop(LanguageModelMethod):
    """Descriptor: a drop before each stage boundary, ranked by the next layer's q and k."""

    name = "pyramiddrop"
    defaults = {"layers": None}
    option_help = {"layers": "the stage boundaries: layers (0-based) before which visual tokens drop; None: D/4, D/2, "
                             "3D/4 of the language model's D layers (8, 16, 24 of 32)"}
    default_budget = {"keep": 0.5}
    keep_means = "lambda: fraction of the previous stage's visual tokens each stage keeps"

    def validate(self, options: Dict[str, Any]) -> None:
        check_layers(self.name, options["layers"], "D/4, D/2, 3D/4 of the language model", allow_empty=False)

    def drop_layers(self, options: Dict[str, Any], depth: int) -> Tuple[int, ...]:
        layers = options["layers"] if options["layers"] is not None else quarter_layers(depth)
        if list(layers) != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= depth:
            raise ValueError(f"pyramiddrop layers={list(layers)}: give increasing layers in 1..{depth - 1} of the "
                             f"language model's {depth}")
        return tuple(layers)

    def signal_layers(self, options: Dict[str, Any], depth: int) -> Tuple[int, ...]:
        return self.drop_layers(options, depth)

    def select(self, signals: DropSignals, keep: float, options: Dict[str, Any]) -> Tensor:
        q, k = signals.query_key(signals.layer)
        scores = last_token_attention(q, k, signals.valid)
        ratio = keep ** (signals.stage + 1)
        counts = torch.tensor([int(n * ratio) for n in signals.visual_before.tolist()], device=scores.device)
        return top_visual(scores, signals.visual, counts)
