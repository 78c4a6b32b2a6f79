"""Token-level correlation-guided compression of a VLM's visual tokens (document MLLMs).

Per image crop, parameter-free in the paper's sense (the budget comes from the content):

* **Redundancy**, :func:`redundant_patches`: the crop's patch keys ``K`` (one layer of the vision
  tower, averaged over heads like the ToMe metric), normalised; ``S = K Kᵀ``; a patch is redundant
  when more than ``c`` *other* patches exceed similarity ``tau`` with it.
* **Budget**, :func:`crop_budget`: information density ``rho = 1 - redundant / N`` and the crop
  keeps ``ceil(rho * N)`` tokens, which is exactly ``N - redundant`` (computed in integers). A
  crop of constant colour is nearly all redundant; a crop of dense text or noise keeps nearly all.
  A crop whose every patch is redundant keeps none (the formula's ``rho = 0``).
* **Sampling**, :func:`sample_tokens`: the [CLS]-attention outliers of a deep layer (scores above
  ``Q3 + 1.5 IQR`` of the crop's patches) are kept first (the highest ones when there are more
  outliers than budget); the rest of the budget is drawn without replacement from the remaining
  patches with probabilities proportional to a shallow layer's [CLS] attention.
* **Merging** (optional, ``merge=True``), :func:`tokencorr_plan`: each dropped patch is folded
  into the kept patch whose key it is most similar to (cosine), a weighted average with each
  patch's deep-layer [CLS] attention as its weight -- executed by the library's one apply path
  (:func:`vitcompress.tokens.apply_plan`) with the attention as the token ``size``.

Choices where the paper leaves room (no official code exists; each is an option of
:class:`TokenCorr`):

* ``tau=0.9``, ``c=4`` (a patch is redundant when at least 5 other patches are near-duplicates).
* Layers are indices into the vision tower's encoder layers (negative counts from the end):
  ``key_layer=-2`` and ``deep_layer=-2`` (the layer whose output LLaVA feeds to the language
  model by default, ``vision_feature_layer=-2``), ``shallow_layer=None`` meaning a quarter of the
  tower's depth (layer 6 of CLIP ViT-L/14's 24).
* [CLS] attention: LLaVA's default feature strategy drops CLS from the visual tokens, so the
  adapter reads the query and key projections of those tower layers during the same forward
  (forward hooks, no second pass) and computes ``softmax(q_cls kᵀ * scale)`` itself, averaged over
  heads; only the patch part of the row is used.
* Sampling is seeded (``seed=0``), per crop from the seed and the crop's index within its image:
  an image keeps the same tokens in every call whatever else is in the batch, so a ``forward``
  and a ``generate`` agree; ``seed=None`` draws from torch's global generator.
* The selection is applied to the projected visual tokens (the projector works token by token,
  so pruning before or after it is the same; merging averages projected tokens).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..interfaces import LlavaMethod, Plan
from ..tokens import TokenState, apply_plan

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


def crop_budget(keys: Tensor, tau: float, c: int) -> int:
    """``ceil(rho * N)`` tokens, i.e. the number of non-redundant patches."""
    return int(keys.shape[0] - redundant_patches(keys, tau, c).sum())


def cls_attention(q: Tensor, k: Tensor, num_heads: int, scale: float) -> Tensor:
    """``q, k [B, N, H*d]`` (CLS first) -> ``[B, N - 1]``: the CLS row of the softmax attention over
    all tokens, averaged over heads, restricted to the patches."""
    B, N, C = q.shape
    qh = q[:, :1].float().reshape(B, 1, num_heads, C // num_heads).transpose(1, 2)
    kh = k.float().reshape(B, N, num_heads, C // num_heads).transpose(1, 2)
    probs = ((qh * scale) @ kh.transpose(-2, -1)).softmax(dim=-1)  # [B, H, 1, N]
    return probs.mean(dim=1)[:, 0, 1:]


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
                   generator: Optional[torch.Generator] = None) -> Tuple[Plan, int]:
    """One crop: ``keys[N, d]``, ``deep[N]`` and ``shallow[N]`` CLS attention -> (plan over the N
    patches, budget). The plan keeps ``budget`` patches and, with ``merge``, folds every other one
    into its most similar kept patch."""
    budget = crop_budget(keys, tau, c)
    keep = sample_tokens(deep, shallow, budget, generator)
    if not merge or budget in (0, keys.shape[0]):
        return Plan(keep=keep[None]), budget
    dropped = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
    dropped[keep] = False
    src = dropped.nonzero().flatten()
    k = F.normalize(keys.float(), dim=-1)
    dst = (k[src] @ k[keep].T).argmax(dim=-1)
    return Plan(keep=keep[None], merge_src=src[None], merge_dst=dst[None]), budget


def compress_tokens(tokens: Tensor, plan: Plan, weights: Tensor, num_prefix: int = 0) -> Tensor:
    """Apply a crop's plan to ``tokens[num_prefix + N, D]`` (prefix tokens such as CLS are kept);
    merged tokens are averaged with ``weights[N]`` (the patches' CLS attention)."""
    size = torch.cat([weights.new_ones(num_prefix), weights.float().clamp_min(1e-12)])[None, :, None]
    state = TokenState(num_prefix=num_prefix, size=size)
    return apply_plan(tokens[None], state, plan)[0]


class TokenCorr(LlavaMethod):
    """Descriptor: the adapter captures the tower's q/k in :meth:`tower_layers` and calls
    :func:`tokencorr_plan` / :func:`compress_tokens` per crop."""

    name = "tokencorr"
    kind = "prune"
    dynamic = True
    target = "llava"
    unit = "crop"  # reduces each image crop on its own, from signals of the vision tower
    defaults = {"tau": 0.9, "c": 4, "key_layer": -2, "deep_layer": -2, "shallow_layer": None,
                "merge": False, "seed": 0}
    default_budget = {"keep": None}  # content-dependent: ceil(rho * N) per crop

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

    def tower_layers(self, options, depth: int) -> Tuple[int, int, int]:
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

    def generator(self, options, device, crop: int = 0) -> Optional[torch.Generator]:
        """The sampling generator of crop ``crop`` of an image (None: torch's global one)."""
        if options["seed"] is None:
            return None
        return torch.Generator(device=device).manual_seed(options["seed"] + crop)
