"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More"): keep the visual tokens that duplicate a few pivot tokens least,
attention-free, after layer K of the language model.

* **Pivots**, :func:`pivots`: the visual tokens and the text tokens after the image with the largest
  L1 norm of their keys in layer K (rotary applied, heads concatenated): ``pivot_image`` and
  ``pivot_text`` of them (the official ``topk`` of ``torch.norm(k, p=1)``).
* **Duplicates**, :func:`least_duplicates`: pivot after pivot, the ``per_pivot`` remaining visual
  tokens with the lowest cosine similarity to the pivot (hidden states entering layer K + 1 through the
  language model's output norm, as the official ``self.norm(layer_outputs[0])``) join the kept set
  and leave the candidates. The visual pivots stay; the text pivots only choose.
* ``per_pivot = floor(max_kept / P)`` when ``max_kept`` is given (the official LLaVA-1.5 scripts pass
  128), else ``floor(keep * N / P)`` (``keep = 1 - reduction_ratio``), ``P`` the number of pivots; a
  sample keeps ``pivot_image + P * per_pivot`` visual tokens.
* Pivots are visited in the order the official code visits them: a Python ``set`` of their positions
  (counted from the sample's first real token, so a padded batch visits them as each sample alone).

Defaults as the official code (github.com/ZichenWen1/DART, LLaVA ``model_vqa_loader.py``): K = 2,
4 + 4 pivots, ``reduction_ratio 0.778`` (``keep=0.222``). Kept tokens keep their original positions.
"""
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F

from ..interfaces import DropSignals, LanguageModelMethod
from .block_options import is_int

Tensor = torch.Tensor


def pivots(keys: Tensor, visual: Tensor, text: Tensor, pivot_image: int, pivot_text: int) -> Tuple[Tensor, Tensor]:
    """One sample: ``keys[T, D]``, positions ``visual[N]`` and ``text[M]`` -> the positions of the
    visual and text tokens whose keys have the largest L1 norm."""
    norm = keys.norm(p=1, dim=-1)
    image = visual[norm[visual].topk(pivot_image).indices]
    words = text[norm[text].topk(min(pivot_text, len(text))).indices]
    return image, words


def least_duplicates(states: Tensor, visual: Tensor, image_pivots: Tensor, order, per_pivot: int) -> Tensor:
    """One sample: the kept visual positions -- the image pivots, then for each pivot position in
    ``order`` the ``per_pivot`` remaining visual tokens least cosine-similar to it (``states[T, C]``)."""
    available = ~torch.isin(visual, image_pivots)
    chosen = [image_pivots]
    for pivot in order:
        similarity = F.cosine_similarity(states[pivot], states[visual], dim=-1)
        similarity = similarity.masked_fill(~available, float("inf"))
        take = (-similarity).topk(min(per_pivot, int(available.sum()))).indices
        available[take] = False
        chosen.append(visual[take])
    return torch.cat(chosen)


class DART(LanguageModelMethod):
    """Descriptor: one drop before layer ``layer`` (0-based), from the keys and output of the layer before."""

    name = "dart"
    defaults = {"layer": 2, "pivot_image": 4, "pivot_text": 4, "max_kept": None}
    option_help = {
        "layer": "K: visual tokens drop after the K-th layer of the language model",
        "pivot_image": "visual pivot tokens (largest key L1 norm), kept",
        "pivot_text": "text pivot tokens after the image (largest key L1 norm)",
        "max_kept": "tokens the pivots choose in all (the official max_num_trunction; LLaVA-1.5 scripts: 128); "
                    "None: keep * the visual tokens",
    }
    default_budget = {"keep": 0.222}
    keep_means = "fraction of each sample's visual tokens the pivots choose (1 - the official reduction_ratio)"

    def validate(self, options: Dict[str, Any]) -> None:
        for name, low in (("layer", 1), ("pivot_image", 1), ("pivot_text", 0)):
            if not is_int(options[name]) or options[name] < low:
                raise ValueError(f"dart {name}={options[name]!r}: give an int >= {low}")
        if options["max_kept"] is not None and (not is_int(options["max_kept"]) or options["max_kept"] < 0):
            raise ValueError(f"dart max_kept={options['max_kept']!r}: give None or an int >= 0")

    def drop_layers(self, options: Dict[str, Any], depth: int) -> Tuple[int, ...]:
        if options["layer"] >= depth:
            raise ValueError(f"dart layer={options['layer']}: the language model has {depth} layers; K must be smaller")
        return (options["layer"],)

    def signal_layers(self, options: Dict[str, Any], depth: int) -> Tuple[int, ...]:
        return (options["layer"] - 1,)

    def select(self, signals: DropSignals, keep: float, options: Dict[str, Any]) -> Tensor:
        _, keys = signals.query_key(options["layer"] - 1)
        keys = keys.transpose(1, 2).flatten(2)  # [B, T, H * d]
        states = signals.final_norm(signals.hidden)
        out = torch.zeros_like(signals.visual)
        positions = torch.arange(signals.visual.shape[1], device=keys.device)
        for b in range(keys.shape[0]):
            visual = positions[signals.visual[b]]
            text = positions[signals.valid[b] & ~signals.visual[b] & (positions > visual.max())]
            image, words = pivots(keys[b], visual, text, options["pivot_image"], options["pivot_text"])
            count = len(image) + len(words)
            total = options["max_kept"] if options["max_kept"] is not None else visual.shape[0] * keep
            # the official visiting order: a set of the positions in the sample's own (unpadded) prompt
            first = int(signals.valid[b].nonzero()[0, 0])
            order = [first + p for p in set(p - first for p in image.tolist() + words.tolist())]
            out[b, least_duplicates(states[b], visual, image, order, int(total // count))] = True
        return out
