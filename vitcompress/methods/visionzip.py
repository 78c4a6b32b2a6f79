"""VisionZip (CVPR 2025), training-free: a few dominant visual tokens plus a few contextual ones,
chosen in the vision tower, before the language model.

Per image crop, from one tower layer (``layer=None``: the layer the model projects; official VisionZip
reads the attention, keys and hidden states of CLIP's second-to-last layer, the layer LLaVA-1.5 feeds
to its language model):

* **Dominant tokens**, :func:`dominant_patches`: the patches the [CLS] token attends to most (the
  layer's softmax attention from [CLS], over the heads); ``dominant`` counts the [CLS] token itself,
  which is kept too, as the official ``visionzip(model, dominant=54, contextual=10)`` does (53
  patches + [CLS]).
* **Contextual tokens**, :func:`contextual_tokens`: of the remaining patches (in index order), every
  ``max(1, R // contextual)``-th one is a target (the first ``contextual`` of them); every other patch
  joins the target whose key is most similar (cosine of the keys averaged over heads), and a target's
  token is its own hidden state **plus the mean** of the hidden states that joined it (the official
  formula; not an average including the target).
* The tokens handed on, per crop: ``[CLS, dominant patches in index order, contextual tokens]``,
  taken from the output of the model's feature layer and passed through the model's projector.
  The paper's budgets on LLaVA-1.5's 576 patches: 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30.

Towers without a class token (LLaVA-OneVision's SigLIP; the official code has CLIP / LLaVA only):
the dominant patches are those receiving the most attention (:func:`received_attention`, over heads
and all queries), ``dominant`` of them; images and videos packed by :func:`onevision_tokens`.
Qwen-VL's merged tokens: :func:`merged_visionzip_tokens`, the attention each token receives in the [CLS]
row's place.
LLaVA-NeXT / NeXT-Video images (:func:`anyres_tokens`): every crop is reduced alike and the image is
packed as the official code packs it -- the base crop's tokens, the grid crops' dominant tokens on the
whole grid in raster order (no unpadding, no newlines), every grid crop's [CLS], every grid crop's
contextual tokens; a one-crop image keeps its newline.
"""
import math
from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..interfaces import LlavaMethod, TokenFeatures
from .tokencorr import cls_attention, head_mean_keys, patch_keys, pool_to_cells

Tensor = torch.Tensor

#: the paper's LLaVA-1.5 settings: total tokens -> (dominant with [CLS], contextual)
PAPER_SPLITS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}


def dominant_patches(cls_attn: Tensor, num: int) -> Tensor:
    """``cls_attn[B, N]`` -> the ``num`` most attended patches of each row, ascending ``[B, num]``."""
    return cls_attn.topk(num, dim=-1).indices.sort(dim=-1).values


def remaining_patches(dominant: Tensor, num_patches: int) -> Tensor:
    """The patches not in ``dominant[B, n]``, ascending ``[B, N - n]``."""
    rest = torch.ones(dominant.shape[0], num_patches, dtype=torch.bool, device=dominant.device)
    rest.scatter_(1, dominant, False)
    return rest.nonzero()[:, 1].reshape(dominant.shape[0], -1)


def contextual_targets(remaining: int, num: int) -> Tensor:
    """Positions (among the ``remaining`` patches) of the ``num`` targets: every ``max(1, R // num)``-th."""
    return torch.arange(0, remaining, max(1, remaining // num))[:num]


def contextual_tokens(keys: Tensor, hidden: Tensor, num: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``keys[B, R, d]`` and ``hidden[B, R, C]`` of the remaining patches -> (contextual tokens
    ``[B, num, C]``, target positions ``[num]``, the target each other patch joined ``[B, R - num]``)."""
    B, R, _ = keys.shape
    targets = contextual_targets(R, num).to(keys.device)
    others = torch.ones(R, dtype=torch.bool, device=keys.device)
    others[targets] = False
    unit = keys / keys.norm(dim=-1, keepdim=True)
    joined = (unit[:, others] @ unit[:, targets].transpose(1, 2)).argmax(dim=-1)  # [B, R - num]
    sums = hidden.new_zeros(B, targets.numel(), hidden.shape[-1])
    sums.scatter_add_(1, joined[..., None].expand(-1, -1, hidden.shape[-1]), hidden[:, others])
    counts = torch.zeros(B, targets.numel(), dtype=hidden.dtype, device=hidden.device)
    counts.scatter_add_(1, joined, torch.ones_like(joined, dtype=hidden.dtype))
    return hidden[:, targets] + sums / counts.clamp(min=1)[..., None], targets, joined


def visionzip_tokens(cls_attn: Tensor, keys: Tensor, hidden: Tensor, dominant: int,
                     contextual: int) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Crops ``[B]``: ``cls_attn[B, N]`` over the patches, patch ``keys[B, N, d]``, the layer's output
    ``hidden[B, 1 + N, C]`` (CLS first) -> tokens ``[B, dominant + contextual, C]`` and the choice:
    ``dominant`` patches ``[B, dominant - 1]``, ``contextual`` target patches and the target each
    other remaining patch ``joined`` (patch indices 0..N-1)."""
    B, N = cls_attn.shape
    top = dominant_patches(cls_attn, dominant - 1)
    rest = remaining_patches(top, N)
    patches = hidden[:, 1:]
    rest_keys = torch.gather(keys, 1, rest[..., None].expand(-1, -1, keys.shape[-1]))
    rest_hidden = torch.gather(patches, 1, rest[..., None].expand(-1, -1, patches.shape[-1]))
    context, targets, joined = contextual_tokens(rest_keys, rest_hidden, contextual)
    kept = torch.gather(patches, 1, top[..., None].expand(-1, -1, patches.shape[-1]))
    tokens = torch.cat([hidden[:, :1], kept, context], dim=1)
    others = torch.ones(rest.shape[1], dtype=torch.bool, device=rest.device)
    others[targets] = False
    target_patches = rest[:, targets]
    return tokens, {"dominant": top, "contextual": target_patches, "merged": rest[:, others],
                    "joined": torch.gather(target_patches, 1, joined)}


def crop_columns(layout: Tensor, num_patches: int) -> int:
    """Columns of an anyres image's crop grid, from its packed ``layout`` (``crop * N + patch``, -1 a
    newline; crop 0 the base image): the most grid crops one packed row holds."""
    newline = layout == -1
    row = torch.cumsum(newline.long(), 0) - newline.long()
    grid = layout >= num_patches
    return max(len(set((layout[grid & (row == r)] // num_patches).tolist())) for r in row[grid].unique().tolist())


def anyres_tokens(tokens: Tensor, dominant: Tensor, columns: int, num_patches: int) -> Tensor:
    """One LLaVA-NeXT image's tokens as the official VisionZip packs them: ``tokens[crops, n, D]`` per
    crop ``[CLS, dominant, contextual]`` (crop 0 the base image), ``dominant[crops, d]`` their patch
    indices -> the base crop's tokens, then the grid crops' dominant tokens in the raster order of the
    whole grid (not unpadded, no newlines), every grid crop's [CLS], every grid crop's contextual tokens."""
    base, grid, kept = tokens[0], tokens[1:], dominant[1:]
    side, d, width = math.isqrt(num_patches), kept.shape[1], grid.shape[-1]
    crop = torch.arange(grid.shape[0], device=kept.device)[:, None]
    row = (crop // columns) * side + kept // side
    col = (crop % columns) * side + kept % side
    order = (row * (columns * side) + col).flatten().argsort()
    raster = grid[:, 1:1 + d].reshape(-1, width)[order]
    return torch.cat([base, raster, grid[:, 0], grid[:, 1 + d:].reshape(-1, width)])


class VisionZip(LlavaMethod):
    """Descriptor: reads the tower's q/k in one layer and the model's feature layer, and hands the
    language model each crop's dominant and contextual tokens (:func:`visionzip_tokens`)."""

    name = "visionzip"
    kind = "merge"
    dynamic = False
    target = "llava"
    unit = "crop"
    reads_features = True
    reads_towers_without_cls = True  # LLaVA-OneVision's SigLIP: reduce_images_without_cls
    defaults = {"dominant": 54, "contextual": 10, "layer": None}
    option_help = {
        "dominant": "tokens kept by [CLS] attention, the [CLS] token included (paper: 54 / 108 / 162)",
        "contextual": "tokens the other patches are merged into by key similarity (paper: 10 / 20 / 30)",
        "layer": "vision-tower layer whose attention and keys are read (None: the layer the model projects, "
                 "as the official code: LLaVA-1.5's -2, OneVision's, Qwen-VL's and InternVL's -1; negative: from "
                 "the end)",
    }
    keep_means = "not used: the tokens kept are dominant= + contextual= per image"
    default_budget = {"keep": None}  # set by dominant= and contextual=

    def check_budget(self, budget) -> None:
        if budget.value is not None:
            raise ValueError(f"{self.name} keeps dominant + contextual tokens per image (the paper's 64 / 128 / 192: "
                             f"dominant=54/108/162, contextual=10/20/30); it takes no keep=/r=/flops= "
                             f"(got {budget.describe()})")

    def validate(self, options) -> None:
        for name, least in (("dominant", 1), ("contextual", 1)):
            v = options[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{name}={v!r}: a number of tokens, an int >= {least}")
        layer = options["layer"]
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise TypeError(f"layer={layer!r}: an index into the vision tower's encoder layers (int; negative "
                            "counts from the end), or None for the layer the model projects")

    def tower_layers(self, options, depth: int, feature_layer=None) -> Tuple[int]:
        layer = feature_layer if options["layer"] is None else options["layer"]
        if not -depth <= layer < depth:
            raise ValueError(f"layer={layer} is outside the vision tower's {depth} encoder layers "
                             f"(use -{depth} .. {depth - 1})")
        return (layer % depth,)

    def reduce_images(self, images: Sequence[Tensor], layouts: Sequence[Tuple[Tensor, int]], taps: Sequence[Any],
                      options: Dict[str, Any], project=None) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
        if isinstance(taps[-1], TokenFeatures):  # a tower without [CLS] (Qwen-VL)
            return self.reduce_merged_images(images, taps, options, project)
        if not taps[0].class_token:
            return reduce_images_without_cls(images, layouts, taps, options, project)
        attention, features = taps
        if attention.cells is not None:  # InternVL: tokens of 2 x 2 patches, no [CLS] token handed on
            return reduce_cell_crops(images, layouts, attention, features, options, project)
        N = attention.k.shape[1] - 1
        dominant, contextual = options["dominant"], options["contextual"]
        if dominant - 1 + contextual > N:
            raise ValueError(f"dominant={dominant} + contextual={contextual} tokens need more than the "
                             f"{N} patches of a crop")
        with torch.no_grad():
            cls_attn = cls_attention(attention.q, attention.k, attention.num_heads, attention.scale)
            keys = patch_keys(attention.k, attention.num_heads)
            tokens, choice = visionzip_tokens(cls_attn, keys, features.hidden, dominant, contextual)
            projected = project(tokens)
        reduced, reports, first = [], [], 0
        for image, (layout, crops) in zip(images, layouts):
            span = slice(first, first + crops)
            first += crops
            if crops == 1:  # LLaVA-1.5; a one-crop LLaVA-NeXT image keeps its newline, as the official code
                reduced.append(torch.cat([projected[span][0], image[layout == -1]]).to(image.dtype))
            else:
                reduced.append(anyres_tokens(projected[span], choice["dominant"][span], crop_columns(layout, N),
                                             N).to(image.dtype))
            report = [{"kept": choice["dominant"][c].tolist(), "contextual": choice["contextual"][c].tolist(),
                       "merged": torch.stack([choice["merged"][c], choice["joined"][c]], dim=1).tolist()}
                      for c in range(span.start, span.stop)]
            reports.append(dict(report[0], cls_tokens=crops) if crops == 1 else {"crops": report, "cls_tokens": crops})
        return reduced, reports

    def reduce_merged_images(self, images: Sequence[Tensor], taps: Sequence[Any], options: Dict[str, Any],
                             project) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
        """A tower without [CLS] (Qwen-VL): ``taps`` = (the layer's
        :class:`~vitcompress.interfaces.TokenSignals`, the :class:`~vitcompress.interfaces.TokenFeatures`),
        one token per image crop of the model -> per image :func:`merged_visionzip_tokens`."""
        signals, features = taps
        dominant, contextual = options["dominant"], options["contextual"]
        reduced, reports = [], []
        for i, (image, hidden) in enumerate(zip(images, features.hidden)):
            N = hidden.shape[0]
            if dominant + contextual > N:
                raise ValueError(f"dominant={dominant} + contextual={contextual} tokens need more than the {N} "
                                 "visual tokens of an image")
            with torch.no_grad():
                tokens, choice = merged_visionzip_tokens(signals.attention[i, :N], signals.keys[i, :N], hidden, image,
                                                         dominant, contextual, project)
            reduced.append(tokens.to(image.dtype))
            sources = torch.cat([choice["dominant"], choice["contextual"]])
            reports.append({"kept": choice["dominant"].tolist(), "contextual": choice["contextual"].tolist(),
                            "merged": torch.stack([choice["merged"], choice["joined"]], dim=1).tolist(),
                            "sources": sources.tolist()})
        return reduced, reports


# --------------------------------------------------------------------------- towers whose tokens are groups of patches


def visionzip_cell_tokens(cls_attn: Tensor, keys: Tensor, hidden: Tensor, cells: Tensor, dominant: int,
                          contextual: int) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Crops ``[B]`` whose visual tokens are each built of G patches after the tower (``cells [M, G]``,
    InternVL's pixel shuffle), no [CLS] token handed on: per patch ``cls_attn[B, N]`` and head-averaged
    ``keys[B, N, d]``, per token its features before the projector ``hidden[B, M, C]`` -> tokens
    ``[B, dominant + contextual, C]`` and the choice (token indices 0..M-1). A token's [CLS] attention is
    its patches' sum, its key their keys concatenated (:func:`~vitcompress.methods.tokencorr.pool_to_cells`);
    then dominant and contextual tokens are chosen among the M tokens as among CLIP's patches."""
    token_keys, token_attn, _ = pool_to_cells(cells, keys, cls_attn, cls_attn)
    top = dominant_patches(token_attn, dominant)
    rest = remaining_patches(top, token_attn.shape[1])
    rest_keys = torch.gather(token_keys, 1, rest[..., None].expand(-1, -1, token_keys.shape[-1]))
    rest_hidden = torch.gather(hidden, 1, rest[..., None].expand(-1, -1, hidden.shape[-1]))
    context, targets, joined = contextual_tokens(rest_keys, rest_hidden, contextual)
    kept = torch.gather(hidden, 1, top[..., None].expand(-1, -1, hidden.shape[-1]))
    others = torch.ones(rest.shape[1], dtype=torch.bool, device=rest.device)
    others[targets] = False
    target_tokens = rest[:, targets]
    return torch.cat([kept, context], dim=1), {"dominant": top, "contextual": target_tokens, "merged": rest[:, others],
                                               "joined": torch.gather(target_tokens, 1, joined)}


def reduce_cell_crops(images: Sequence[Tensor], layouts: Sequence[Tuple[Tensor, int]], attention, features,
                      options: Dict[str, Any], project) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
    """:meth:`VisionZip.reduce_images` for a tower whose tokens are groups of patches (``attention.cells``):
    every crop (InternVL: every tile of an image, its thumbnail included) keeps ``dominant`` tokens by
    [CLS] attention then ``contextual`` merged ones, crop after crop; ``features.hidden[crops, M, C]``
    are the tokens' features before the projector."""
    M = attention.cells.shape[0]
    dominant, contextual = options["dominant"], options["contextual"]
    if dominant + contextual > M:
        raise ValueError(f"dominant={dominant} + contextual={contextual} tokens need more than the {M} tokens of a "
                         "tile (here [CLS] is not handed to the language model: dominant counts tokens only)")
    with torch.no_grad():
        cls_attn = cls_attention(attention.q, attention.k, attention.num_heads, attention.scale)
        keys = patch_keys(attention.k, attention.num_heads)
        tokens, choice = visionzip_cell_tokens(cls_attn, keys, features.hidden, attention.cells, dominant, contextual)
        projected = project(tokens)
    reduced, reports, first = [], [], 0
    for image, (_, crops) in zip(images, layouts):
        span = range(first, first + crops)
        first += crops
        reduced.append(projected[span.start:span.stop].reshape(-1, projected.shape[-1]).to(image.dtype))
        reports.append({"crops": [{"kept": choice["dominant"][c].tolist(),
                                   "contextual": choice["contextual"][c].tolist(),
                                   "merged": torch.stack([choice["merged"][c], choice["joined"][c]], dim=1).tolist()}
                                  for c in span]})
    return reduced, reports


# ---------------------------------------------------------------- towers without [CLS] (LLaVA-OneVision's SigLIP)


def received_attention(q: Tensor, k: Tensor, num_heads: int, scale: float) -> Tensor:
    """``q``, ``k`` ``[B, N, H * d]`` of a tower without [CLS] -> the softmax attention each token
    receives, averaged over the N queries and the heads ``[B, N]``: the dominant-token score where
    there is no [CLS] row to read. One head at a time: ``[B, N, N]`` in memory, not ``[B, H, N, N]``."""
    B, N, _ = q.shape
    q, k = (x.reshape(B, N, num_heads, -1) for x in (q, k))
    received = torch.zeros(B, N, dtype=torch.float32, device=q.device)
    for head in range(num_heads):
        scores = (q[:, :, head] @ k[:, :, head].transpose(1, 2)) * scale
        received += scores.softmax(dim=-1, dtype=torch.float32).mean(dim=1)
    return received / num_heads


def visionzip_tokens_without_cls(attention: Tensor, keys: Tensor, hidden: Tensor, dominant: int,
                                 contextual: int) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`visionzip_tokens` without [CLS]: ``attention[B, N]`` received, ``keys[B, N, d]``,
    ``hidden[B, N, C]`` -> tokens ``[B, dominant + contextual, C]`` (``dominant`` patches) and the choice."""
    with_placeholder = torch.cat([hidden[:, :1], hidden], dim=1)  # a first row where [CLS] would be, dropped
    tokens, choice = visionzip_tokens(attention, keys, with_placeholder, dominant + 1, contextual)
    return tokens[:, 1:], choice


def raster_order(patches: Tensor, columns: int, num_patches: int) -> Tensor:
    """``patches[crops, d]``, patch indices of each crop of a grid ``columns`` crops wide -> the order
    sorting the ``crops * d`` of them in the raster order of the whole grid."""
    side = math.isqrt(num_patches)
    crop = torch.arange(patches.shape[0], device=patches.device)[:, None]
    row = (crop // columns) * side + patches // side
    col = (crop % columns) * side + patches % side
    return (row * (columns * side) + col).flatten().argsort()


def onevision_tokens(tokens: Tensor, patches: Tensor, layout: Tensor, num_patches: int, newline: Tensor) -> Tensor:
    """One LLaVA-OneVision image or video from its crops' kept tokens ``tokens[crops, n, D]`` (crop 0 the
    base image), the first ``d`` of each crop at the patches ``patches[crops, d]``, the others not on the
    grid (contextual). An anyres image (``layout``: the unpadded crop grid) is packed as the official
    VisionZip packs a LLaVA-NeXT one, without [CLS]: the base crop's tokens, the grid crops' placed tokens
    in the raster order of the whole grid (not unpadded, not downsampled to anyres_max, no newlines),
    then the grid crops' other tokens. Crops in sequence (``layout``: ``crops * N`` patches and one
    newline: a video's frames, or a one-crop image): each crop's tokens in turn, then ``newline[1, D]``."""
    width = tokens.shape[-1]
    if layout.numel() == tokens.shape[0] * num_patches + 1:
        return torch.cat([tokens.reshape(-1, width), newline])
    grid, d = tokens[1:], patches.shape[1]
    placed = grid[:, :d].reshape(-1, width)[raster_order(patches[1:], crop_columns(layout, num_patches), num_patches)]
    return torch.cat([tokens[0], placed, grid[:, d:].reshape(-1, width)])


def reduce_images_without_cls(images, layouts, taps, options, project):
    """:meth:`VisionZip.reduce_images` on a tower without [CLS]: ``dominant`` patches by
    :func:`received_attention` (no [CLS] token kept), contextual tokens as with [CLS], packed by
    :func:`onevision_tokens`."""
    attention, features = taps
    N = attention.k.shape[1]
    dominant, contextual = options["dominant"], options["contextual"]
    if dominant + contextual > N:
        raise ValueError(f"dominant={dominant} + contextual={contextual} tokens need more than the {N} patches "
                         "of a crop")
    with torch.no_grad():
        received = received_attention(attention.q, attention.k, attention.num_heads, attention.scale)
        keys = head_mean_keys(attention.k, attention.num_heads)
        tokens, choice = visionzip_tokens_without_cls(received, keys, features.hidden, dominant, contextual)
        projected = project(tokens)
    reduced, reports, first = [], [], 0
    for image, (layout, crops) in zip(images, layouts):
        span = slice(first, first + crops)
        first += crops
        reduced.append(onevision_tokens(projected[span], choice["dominant"][span], layout, N,
                                        image[-1:]).to(image.dtype))  # the model's last token: a newline
        report = [{"kept": choice["dominant"][c].tolist(), "contextual": choice["contextual"][c].tolist(),
                   "merged": torch.stack([choice["merged"][c], choice["joined"][c]], dim=1).tolist()}
                  for c in range(span.start, span.stop)]
        reports.append(dict(report[0], cls_tokens=0) if crops == 1 else {"crops": report, "cls_tokens": 0})
    return reduced, reports


def merged_visionzip_tokens(attention: Tensor, keys: Tensor, hidden: Tensor, model_tokens: Tensor, dominant: int,
                            contextual: int, project) -> Tuple[Tensor, Dict[str, Tensor]]:
    """VisionZip on one image of a tower without [CLS] whose projector folds ``G`` patches into each
    token: ``attention[N]`` each token receives, token ``keys[N, d]``, the projector's input
    ``hidden[N, G, C]``, the model's tokens ``model_tokens[N, D (+ E)]`` -> tokens ``[dominant + contextual,
    D (+ E)]``: ``[dominant tokens in index order, contextual tokens]``, each ``project`` of its merged
    projector input (as the official code projects the merged feature-layer states), followed by its
    ``E`` channels past the projector's ``D`` (Qwen3-VL's DeepStack features) merged by the same rule.
    ``dominant`` counts tokens only (no [CLS] to keep)."""
    N, G, C = hidden.shape
    top = dominant_patches(attention[None].float(), dominant)
    rest = remaining_patches(top, N)
    both = torch.cat([hidden.reshape(N, G * C), model_tokens.to(hidden.dtype)], dim=-1)  # merged alike
    rest_keys = keys[rest[0]][None].float()
    context, targets, joined = contextual_tokens(rest_keys, both[rest[0]][None], contextual)
    merged = torch.cat([both[top[0]], context[0]])
    projected = project(merged[:, :G * C].reshape(-1, G, C))
    past_projector = merged[:, G * C + projected.shape[-1]:]  # the channels after the model's own D
    tokens = torch.cat([projected.to(model_tokens.dtype), past_projector.to(model_tokens.dtype)], dim=-1)
    others = torch.ones(rest.shape[1], dtype=torch.bool, device=rest.device)
    others[targets] = False
    target_patches = rest[0, targets]
    return tokens, {"dominant": top[0], "contextual": target_patches, "merged": rest[0, others],
                    "joined": target_patches[joined[0]]}
