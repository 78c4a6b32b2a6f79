"""Token-level correlation-guided compression of a VLM's visual tokens (document MLLMs).

Per image crop, parameter-free in the paper's sense (the budget comes from the content):

* **Redundancy**, :func:`redundant_patches`: the crop's patch keys ``K`` (one layer of the vision
  tower, averaged over heads like the ToMe metric), normalised; ``S = K Kᵀ``; a patch is redundant
  when more than ``c`` *other* patches exceed similarity ``tau`` with it.
* **Budget**, :func:`crop_budget`: information density ``rho = 1 - redundant / N`` and the crop
  keeps ``ceil(rho * N)`` tokens, which is exactly ``N - redundant`` (computed in integers). A
  crop of constant colour is nearly all redundant; a crop of dense text or noise keeps nearly all.
  A crop whose every patch is redundant would keep none (the formula's ``rho = 0``): the language
  model would then see nothing of that image, so each crop keeps at least ``min_tokens=1``
  (a deviation from the formula; ``min_tokens=0`` is the formula).
* **Sampling**, :func:`sample_tokens`: the [CLS]-attention outliers of a deep layer (scores above
  ``Q3 + 1.5 IQR`` of the crop's patches) are kept first (the highest ones when there are more
  outliers than budget); the rest of the budget is drawn without replacement from the remaining
  patches with probabilities proportional to a shallow layer's [CLS] attention.
* **Merging** (optional, ``merge=True``), :func:`tokencorr_plan`: each dropped patch is folded
  into the kept patch whose key it is most similar to (cosine), a weighted average with each
  patch's deep-layer [CLS] attention as its weight -- executed by the library's one apply path
  (:func:`vitcompress.engine.tokens.apply_plan`) with the attention as the token ``size``.

Choices where the paper leaves room (no official code exists; each is an option of
:class:`TokenCorr`):

* ``tau=0.9``, ``c=4`` (a patch is redundant when at least 5 other patches are near-duplicates).
* Layers are indices into the vision tower's encoder layers (negative counts from the end):
  ``key_layer=-2`` and ``deep_layer=-2`` (the layer whose output LLaVA feeds to the language
  model by default, ``vision_feature_layer=-2``), ``shallow_layer=None`` meaning a quarter of the
  tower's depth (layer 6 of CLIP ViT-L/14's 24).
* [CLS] attention: LLaVA's default feature strategy drops CLS from the visual tokens, so the
  runtime captures the query and key projections of those tower layers during the same forward
  (forward hooks, no second pass) and :func:`cls_attention` computes ``softmax(q_cls kᵀ * scale)``,
  averaged over heads; only the patch part of the row is used. A tower without [CLS] (Qwen-VL) hands
  :class:`~vitcompress.interfaces.TokenSignals` instead: its adapter's stand-in for that row (and the
  keys), which :func:`tap_attention` / :func:`tap_keys` pass on.
* Sampling is seeded (``seed=0``), per crop from the seed and the crop's index within its image:
  an image keeps the same tokens in every call whatever else is in the batch, so a ``forward``
  and a ``generate`` agree; ``seed=None`` draws from torch's global generator.
* The selection is applied to the projected visual tokens (the projector works token by token,
  so pruning before or after it is the same; merging averages projected tokens).
* A model that folds several patches into one token after the tower (InternVL's 2x2 pixel
  shuffle) gets its signals pooled to those tokens (:func:`pool_to_cells`: [CLS] attention
  summed, keys concatenated); on InternVL ``key_layer`` and ``deep_layer`` default to -1, the
  layer it feeds its language model.
"""
import functools
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..engine.attention import softmax_attention
from ..engine.tokens import TokenState, apply_plan
from ..interfaces import LlavaMethod, Plan, TokenSignals

Tensor = torch.Tensor


def redundant_patches(keys: Tensor, tau: float, c: int) -> Tensor:
    """``keys[N, d]`` -> bool ``[N]``: more than ``c`` other patches have cosine similarity > ``tau``."""
    k = F.normalize(keys.float(), dim=-1)
    sim = k @ k.T
    sim.fill_diagonal_(-math.inf)
    return (sim > tau).sum(dim=-1) > c


def information_density(keys: Tensor, tau: float, c: int) -> float:
    """``rho = 1 - redundant / N`` of one crop."""
    return 1.0 - int(redundant_patches(keys, tau, c).sum()) / keys.shape[0]


def crop_budget(keys: Tensor, tau: float, c: int, min_tokens: int = 0) -> int:
    """``ceil(rho * N)`` tokens, i.e. the number of non-redundant patches, and at least
    ``min_tokens`` (at most N)."""
    budget = int(keys.shape[0] - redundant_patches(keys, tau, c).sum())
    return min(max(budget, min_tokens), keys.shape[0])


def head_mean_keys(k: Tensor, num_heads: int) -> Tensor:
    """``k [B, N, H*d]`` -> ``[B, N, d]``: every token's key averaged over heads."""
    return k.reshape(*k.shape[:2], num_heads, -1).mean(dim=2)


def patch_keys(k: Tensor, num_heads: int) -> Tensor:
    """``k [B, N, H*d]`` (CLS first) -> ``[B, N - 1, d]``: the patches' keys averaged over heads."""
    return head_mean_keys(k, num_heads)[:, 1:]


def cls_attention(q: Tensor, k: Tensor, num_heads: int, scale: float) -> Tensor:
    """``q, k [B, N, H*d]`` (CLS first) -> ``[B, N - 1]``: the CLS row of the softmax attention over
    all tokens, averaged over heads, restricted to the patches."""
    B, N, C = q.shape
    qh = q[:, :1].float().reshape(B, 1, num_heads, C // num_heads).transpose(1, 2)
    kh = k.float().reshape(B, N, num_heads, C // num_heads).transpose(1, 2)
    _, probs = softmax_attention(qh, kh, scale=scale)  # [B, H, 1, N]
    return probs.mean(dim=1)[:, 0, 1:]


def tap_keys(tap) -> Tensor:
    """One tapped layer's patch keys ``[crops, N, d]``: from the tower's k (CLS first), or as a
    [CLS]-free tower's adapter gives them (:class:`~vitcompress.interfaces.TokenSignals`)."""
    if isinstance(tap, TokenSignals):
        return tap.keys
    return patch_keys(tap.k, tap.num_heads)


def tap_attention(tap) -> Tensor:
    """One tapped layer's [CLS] attention over the patches ``[crops, N]``: the CLS row of the tower's
    q/k, or the stand-in a [CLS]-free tower's adapter computed."""
    if isinstance(tap, TokenSignals):
        return tap.attention
    return cls_attention(tap.q, tap.k, tap.num_heads, tap.scale)


def iqr_outliers(scores: Tensor) -> Tensor:
    """bool mask of ``scores[N]`` above ``Q3 + 1.5 (Q3 - Q1)``."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return scores > q3 + 1.5 * (q3 - q1)


def sample_tokens(deep: Tensor, shallow: Tensor, budget: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Indices (ascending) of ``budget`` patches: deep-layer CLS outliers first, the rest drawn from
    the shallow layer's CLS attention as a distribution (without replacement)."""
    outliers = iqr_outliers(deep)
    picked = outliers.nonzero().flatten()
    if picked.numel() >= budget:
        top = deep[picked].topk(budget).indices
        return picked[top].sort().values
    rest = (~outliers).nonzero().flatten()
    probs = shallow[rest].float().clamp_min(1e-12)
    drawn = rest[torch.multinomial(probs, budget - picked.numel(), replacement=False, generator=generator)]
    return torch.cat([picked, drawn]).sort().values


def tokencorr_plan(keys: Tensor, deep: Tensor, shallow: Tensor, *, tau: float, c: int, merge: bool,
                   generator: Optional[torch.Generator] = None, min_tokens: int = 0) -> Tuple[Plan, int]:
    """One crop: ``keys[N, d]``, ``deep[N]`` and ``shallow[N]`` CLS attention -> (plan over the N
    patches, budget). The plan keeps ``budget`` patches (at least ``min_tokens``) and, with
    ``merge``, folds every other one into its most similar kept patch."""
    budget = crop_budget(keys, tau, c, min_tokens)
    keep = sample_tokens(deep, shallow, budget, generator)
    if not merge or budget in (0, keys.shape[0]):
        return Plan(keep=keep[None]), budget
    dropped = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
    dropped[keep] = False
    src = dropped.nonzero().flatten()
    k = F.normalize(keys.float(), dim=-1)
    dst = (k[src] @ k[keep].T).argmax(dim=-1)
    return Plan(keep=keep[None], merge_src=src[None], merge_dst=dst[None]), budget


def pool_to_cells(cells: Tensor, keys: Tensor, deep: Tensor, shallow: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Patch signals ``keys [B, N, d]``, ``deep``/``shallow [B, N]`` -> the signals of the ``M`` tokens a
    model builds from groups of patches after the tower (``cells [M, G]``: each token's patches, in the
    order the model concatenates them; InternVL's pixel shuffle, G = 4). A token's key is its patches'
    keys concatenated, so two tokens are alike when they are alike patch by patch, as the projector sees
    them; its [CLS] attention is the sum of its patches' (the attention its region receives)."""
    cells = cells.to(keys.device)
    return (keys[:, cells].reshape(keys.shape[0], cells.shape[0], -1), deep[:, cells].sum(dim=-1),
            shallow[:, cells].sum(dim=-1))


def compress_tokens(tokens: Tensor, plan: Plan, weights: Tensor, num_prefix: int = 0) -> Tensor:
    """Apply a crop's plan to ``tokens[num_prefix + N, D]`` (prefix tokens such as CLS are kept);
    merged tokens are averaged with ``weights[N]`` (the patches' CLS attention)."""
    size = torch.cat([weights.new_ones(num_prefix), weights.float().clamp_min(1e-12)])[None, :, None]
    state = TokenState(num_prefix=num_prefix, size=size)
    return apply_plan(tokens[None], state, plan)[0]


def reduce_crops(features: Tensor, layout: Tensor, keys: Tensor, deep: Tensor, shallow: Tensor, *, tau: float,
                 c: int, merge: bool, generator_of: Callable[[int], Optional[torch.Generator]], min_tokens: int = 0):
    """One image: ``features[L, D]`` in the model's packed order, ``layout[L]`` naming each packed
    token (``crop * N + patch``; -1 a row's newline; -2 CLS, kept), and per crop of the image its
    patch ``keys[crops, N, d]``, ``deep`` and ``shallow`` CLS attention ``[crops, N]`` -> reduced
    features, report. ``generator_of(crop)`` gives each crop's sampling generator. The report
    says, per crop, which patches of its ``N``-patch grid were kept (``kept``, in output order) and,
    with ``merge``, which dropped patch went into which kept one (``merged``)."""
    N = keys.shape[1]
    keep = layout == -2
    out = features.clone()
    crops = []
    for crop in range(keys.shape[0]):
        pos = ((layout >= 0) & (layout // N == crop)).nonzero().flatten()
        if pos.numel() == 0:
            continue
        patch = layout[pos] % N
        with torch.no_grad():
            plan, budget = tokencorr_plan(keys[crop, patch], deep[crop, patch], shallow[crop, patch],
                                          tau=tau, c=c, merge=merge, generator=generator_of(crop),
                                          min_tokens=min_tokens)
        kept = pos[plan.keep[0]]
        out[kept] = compress_tokens(features[pos], plan, deep[crop, patch]).to(out.dtype)
        keep[kept] = True
        record = {"crop": crop, "patches": int(pos.numel()), "budget": budget, "density": budget / pos.numel(),
                  "kept": patch[plan.keep[0]].tolist()}
        if plan.merges:  # [dropped patch, the kept patch it is folded into]
            record["merged"] = torch.stack([patch[plan.merge_src[0]], patch[plan.keep[0][plan.merge_dst[0]]]],
                                           dim=1).tolist()
        crops.append(record)
    newline = layout == -1
    if bool(newline.any()):
        # A newline ends its row of the anyres grid; it stays when a grid token of its row does.
        grid = layout >= 0
        if keys.shape[0] > 1:
            grid &= layout >= N  # the base crop precedes the grid and has no newlines
        row = torch.cumsum(newline.long(), 0) - newline.long()
        kept_in_row = torch.zeros(int(row.max()) + 1, dtype=torch.long, device=layout.device)
        kept_in_row.index_add_(0, row[grid & keep], torch.ones_like(row[grid & keep]))
        keep |= newline & (kept_in_row[row] > 0)
    return out[keep], {"crops": crops, "budget": sum(c["budget"] for c in crops),
                       "newline_tokens": int((newline & keep).sum()), "cls_tokens": int((layout == -2).sum())}


class TokenCorr(LlavaMethod):
    """Descriptor: reads the tower's q/k in :meth:`tower_layers` and reduces each crop of each
    image with :func:`reduce_crops`."""

    name = "tokencorr"
    kind = "prune"
    dynamic = True
    target = "llava"
    unit = "crop"  # reduces each image crop on its own, from signals of the vision tower
    defaults = {"tau": 0.9, "c": 4, "key_layer": -2, "deep_layer": -2, "shallow_layer": None,
                "merge": False, "seed": 0, "min_tokens": 1}
    option_help = {
        "tau": "cosine similarity above which two patches count as near-duplicates",
        "c": "a patch is redundant when more than c other patches are its near-duplicates",
        "key_layer": "vision-tower layer whose keys measure redundancy (negative: from the end)",
        "deep_layer": "layer whose [CLS] attention picks the outliers that are always kept",
        "shallow_layer": "layer whose [CLS] attention the rest is sampled from (None: a quarter of the depth)",
        "merge": "fold each dropped patch into its most similar kept one, weighted by [CLS] attention",
        "seed": "sampling seed (None: torch's global generator)",
        "min_tokens": "each crop keeps at least this many tokens (the formula gives 0 to a constant crop)",
    }
    default_budget = {"keep": None}  # content-dependent: ceil(rho * N) per crop
    family_defaults = {"internvl": {"key_layer": -1, "deep_layer": -1}}  # InternVL feeds the LM the last layer

    def check_budget(self, budget) -> None:
        if budget.value is not None:
            raise ValueError(f"{self.name} sets each crop's budget from its content (ceil(rho * N)); it takes "
                             f"no keep=/r=/flops= (got {budget.describe()}); tune it with tau= and c=")

    def validate(self, options) -> None:
        tau, c = options["tau"], options["c"]
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not -1.0 <= tau <= 1.0:
            raise ValueError(f"tau={tau!r}: a cosine-similarity threshold in [-1, 1], e.g. tau=0.9")
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"c={c!r}: the number of similar patches that makes a patch redundant, an int >= 0")
        for name in ("key_layer", "deep_layer", "shallow_layer"):
            v = options[name]
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"{name}={v!r}: an index into the vision tower's encoder layers (int; negative "
                                "counts from the end)")
        if not isinstance(options["merge"], bool):
            raise TypeError(f"merge={options['merge']!r}: True or False")
        seed = options["seed"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed={seed!r}: an int (deterministic sampling) or None (torch's global generator)")
        floor = options["min_tokens"]
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            raise ValueError(f"min_tokens={floor!r}: the fewest tokens a crop keeps, an int >= 0 (default 1; "
                             "0 is the paper's formula, which leaves a constant-colour crop no token)")

    def tower_layers(self, options, depth: int, feature_layer=None) -> Tuple[int, int, int]:
        """(key, deep, shallow) encoder-layer indices, resolved against a tower of ``depth`` layers."""
        shallow = depth // 4 if options["shallow_layer"] is None else options["shallow_layer"]
        resolved = []
        for name, v in (("key_layer", options["key_layer"]), ("deep_layer", options["deep_layer"]),
                        ("shallow_layer", shallow)):
            if not -depth <= v < depth:
                raise ValueError(f"{name}={v} is outside the vision tower's {depth} encoder layers "
                                 f"(use -{depth} .. {depth - 1})")
            resolved.append(v % depth)
        return tuple(resolved)

    def reduce_images(self, images: Sequence[Tensor], layouts: Sequence[Tuple[Tensor, int]], taps: Sequence[Any],
                      options: Dict[str, Any]) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
        """Every image of one call; ``taps``: the tower's q/k of the (key, deep, shallow) layers,
        all crops of the call together, so the signals are computed once per call."""
        key, deep, shallow = taps
        with torch.no_grad():
            keys = tap_keys(key)  # [crops, N, d]
            deep_attention = tap_attention(deep)
            shallow_attention = tap_attention(shallow)
        generator_of = functools.partial(self.generator, options, keys.device)
        cells = getattr(key, "cells", None)
        if cells is not None:  # the model folds groups of patches into one token after the tower
            keys, deep_attention, shallow_attention = pool_to_cells(cells, keys, deep_attention, shallow_attention)
        reduced, reports, first = [], [], 0
        for features, (layout, crops) in zip(images, layouts):
            span = slice(first, first + crops)
            first += crops
            tokens, report = reduce_crops(features, layout, keys[span], deep_attention[span], shallow_attention[span],
                                          tau=options["tau"], c=options["c"], merge=options["merge"],
                                          generator_of=generator_of, min_tokens=options["min_tokens"])
            reduced.append(tokens)
            reports.append(report)
        return reduced, reports

    def generator(self, options, device, crop: int = 0) -> Optional[torch.Generator]:
        """The sampling generator of crop ``crop`` of an image (None: torch's global one)."""
        if options["seed"] is None:
            return None
        return torch.Generator(device=device).manual_seed(options["seed"] + crop)
