"""Focus-DETR foreground token scoring (Zheng et al., "Less is More: Focus Attention for Efficient
DETR", ICCV 2023), for the encoder of a DETR-style detector.

Every encoder token gets a foreground score; the encoder runs only on the top ``rho`` of the real
(unpadded) tokens, with the cascade ``[1.0, 0.8, 0.6, 0.6, 0.4, 0.2]`` of that set over its six
layers (nested: layer ``l`` runs on the best fraction of layer ``l-1``'s tokens by the same scores);
the other tokens skip the layer unchanged, so the decoder still sees every position. Among a
layer's tokens the top ``dual_k`` by ``class probability x foreground score`` get an extra
self-attention first ("dual attention").

Scorers (option ``scorer``):

* ``"learned"``: the paper's foreground head (:class:`FocusScorer`), trained on a frozen detector
  with FCOS-style targets and focal loss (``experiments/training/train_focus_scorer.py``); loaded from
  ``scorer_path`` (what :func:`save_scorer` wrote) or given as a module in ``scorer_module``.
* ``"norm"`` (default, zero-shot proxy): the L2 norm of each token's feature.
* ``"attention"`` (zero-shot proxy): the attention a token receives in the first encoder layer
  (its probabilities computed on the fly over all real tokens; mean over heads, sum over queries).

Where the paper or its reference code (detrex ``projects/focus_detr``) leaves room, chosen here:

* Counts: an image with ``n`` real tokens keeps ``floor(rho * n)`` (at least 1); layer ``l`` runs
  on ``floor(c_l * that)`` (at least 1). Padded positions are never kept (scored ``-inf``), so every
  image of a padded batch keeps what it would keep alone. (The reference keeps ``int(rho * n) + 1``
  per image and lets padded tokens fill a batch's shorter rows.)
* Another number of encoder layers than six: the paper's cascade is stretched over the depth by
  linear interpolation at relative depth ``l / (L - 1)`` (e.g. 3 layers: ``[1.0, 0.6, 0.2]``,
  1 layer: ``[1.0]``); option ``cascade`` gives one ratio per layer instead.
* Dual attention: the reference gives it its own trained ``MultiheadAttention`` and LayerNorm
  (its "OESM" step, applied before the layer's deformable attention). A pretrained DETR has no such
  weights, so here it reuses the layer's own self-attention projections and its post-attention
  LayerNorm: ``x_d <- LN(x_d + SelfAttn(x_d))`` on the ``dual_k`` selected tokens (keys: those
  tokens only), before the layer runs. ``dual_k=0`` turns it off. In plain DETR the layer's own
  attention is already global over the kept tokens, so this step is the paper's, not a necessity.
* Class scores: Focus-DETR has an encoder-side class head per layer; DETR has only the decoder's
  ``class_labels_classifier``, applied here to the layer's input tokens as the proxy. The product
  uses probabilities, ``max_c softmax(logits)_c`` over the real classes (no-object excluded) times
  the foreground probability (``sigmoid`` of the learned logit, or the zero-shot score, which is
  non-negative), where the reference multiplies raw logits (whose signs make the product order
  meaningless). A ``DetrModel`` without a class head ranks by the foreground score alone.
* The learned head scores ``feature + position embedding`` of each token (the reference scores the
  flattened multi-scale features plus their level position embeddings); its global half averages
  over the real tokens only, so padding does not change any score.
* Top-down modulation across feature levels (the reference, fine <- coarse):
  ``x_l <- x_l + x_l * up(s_{l+1}) * alpha_l`` with ``up`` bilinear (``align_corners=True``) and
  ``alpha`` learned, then ``s_l = head(x_l)``; see :func:`foreground_logits`. The coarser score
  map is upsampled as it is, padded positions included, as in the reference. HF DETR encodes one
  feature level, so there it reduces to ``s = head(x)``.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.attention import softmax_attention
from ..interfaces import DetrMethod

PAPER_CASCADE = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
SCORERS = ("norm", "attention", "learned")


class FocusScorer(nn.Module):
    """The foreground head: LN -> Linear -> GELU; half the features stay local, the other half is
    replaced by its mean over the level's real tokens; then an MLP to one logit per token.
    ``alpha`` holds the top-down modulation weights (one per level below the coarsest)."""

    def __init__(self, dim: int, hidden: Optional[int] = None, num_levels: int = 1):
        super().__init__()
        hidden = dim if hidden is None else hidden
        if hidden % 4 or hidden <= 0:
            raise ValueError(f"FocusScorer hidden={hidden} must be a positive multiple of 4 "
                             "(it is split in half, then quartered)")
        if num_levels < 1:
            raise ValueError(f"FocusScorer num_levels={num_levels} must be at least 1")
        self.config = {"dim": dim, "hidden": hidden, "num_levels": num_levels}
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU())
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.GELU(), nn.Linear(hidden // 2, hidden // 4),
                                 nn.GELU(), nn.Linear(hidden // 4, 1))
        self.alpha = nn.Parameter(torch.empty(num_levels - 1).uniform_(-0.3, 0.3))

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, T]`` for the tokens ``x[B, T, dim]`` of one level; ``valid[B, T]`` marks real tokens."""
        z = self.embed(x)
        local, pooled = z.chunk(2, dim=-1)
        if valid is None:
            mean = pooled.mean(dim=1, keepdim=True)
        else:
            w = valid.unsqueeze(-1).to(z.dtype)
            mean = (pooled * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1)
        return self.mlp(torch.cat([local, mean.expand_as(pooled)], dim=-1)).squeeze(-1)


def foreground_logits(scorer: FocusScorer, levels: Sequence[torch.Tensor],
                      masks: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """Foreground logits ``[B, H_l, W_l]`` for feature levels ``[B, C, H_l, W_l]`` ordered fine to
    coarse, with top-down modulation: the coarsest level is scored first, each finer level is
    modulated by the upsampled score of the level above, ``x_l + x_l * up(s_{l+1}) * alpha_l``.
    ``masks[l][B, H_l, W_l]`` marks real (unpadded) positions."""
    if len(levels) != scorer.config["num_levels"]:
        raise ValueError(f"the scorer was built for {scorer.config['num_levels']} feature level(s), got {len(levels)}")
    out: List[Optional[torch.Tensor]] = [None] * len(levels)
    above = None
    for lvl in reversed(range(len(levels))):
        x = levels[lvl]
        B, C, H, W = x.shape
        if above is not None:
            up = F.interpolate(above.unsqueeze(1), size=(H, W), mode="bilinear", align_corners=True)
            x = x + x * up * scorer.alpha[lvl]
        valid = None if masks is None else masks[lvl].reshape(B, H * W)
        above = scorer(x.flatten(2).transpose(1, 2), valid).reshape(B, H, W)
        out[lvl] = above
    return out


def save_scorer(scorer: FocusScorer, path: str, **meta: Any) -> None:
    """Write the head's configuration and weights (plus JSON-able ``meta``) for :func:`load_scorer`."""
    torch.save({"config": dict(scorer.config), "state_dict": scorer.state_dict(), "meta": meta}, path)


def load_scorer(path: str) -> FocusScorer:
    """A :class:`FocusScorer` from a file written by :func:`save_scorer`."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Focus-DETR scorer file (expected the 'config' and 'state_dict' "
                         "that vitcompress.methods.focus_detr.save_scorer writes)")
    scorer = FocusScorer(**ckpt["config"])
    scorer.load_state_dict(ckpt["state_dict"])
    return scorer.eval()


def token_norm(x: torch.Tensor) -> torch.Tensor:
    """Zero-shot foreground proxy: the L2 norm of each token ``x[B, N, C]`` -> ``[B, N]``."""
    return x.float().pow(2).sum(dim=-1).sqrt()


def attention_received(q: torch.Tensor, k: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Zero-shot foreground proxy: attention each token receives, ``sum_i softmax(q_i k^T / sqrt(d))``
    over the real queries, averaged over heads. ``q, k [B, H, N, d]``; ``valid[B, N]`` -> ``[B, N]``."""
    _, probs = softmax_attention(q, k, scale=q.shape[-1] ** -0.5,
                                 bias=None if valid is None else valid[:, None, None, :])
    probs = probs.float()
    if valid is not None:
        probs = probs * valid[:, None, :, None]
    return probs.sum(dim=2).mean(dim=1)


def cascade_for_depth(depth: int, cascade: Optional[Sequence[float]] = None) -> Tuple[float, ...]:
    """The fraction of the kept set each of ``depth`` layers runs on: ``cascade`` checked, or the
    paper's six ratios stretched over the depth by linear interpolation."""
    if cascade is not None:
        ratios = tuple(float(c) for c in cascade)
        if len(ratios) != depth:
            raise ValueError(f"cascade has {len(ratios)} ratios but the encoder has {depth} layers; give one per layer")
        return ratios
    if depth == 1:
        return (PAPER_CASCADE[0],)
    last = len(PAPER_CASCADE) - 1
    ratios = []
    for layer in range(depth):
        t = layer * last / (depth - 1)
        i = min(int(t), last - 1)
        ratios.append(round(PAPER_CASCADE[i] + (t - i) * (PAPER_CASCADE[i + 1] - PAPER_CASCADE[i]), 6))
    return tuple(ratios)


def layer_token_counts(num_tokens: int, rho: float, cascade: Sequence[float]) -> List[int]:
    """Tokens each layer runs on for an image with ``num_tokens`` real tokens."""
    kept = max(1, math.floor(num_tokens * rho + 1e-9))
    return [max(1, math.floor(kept * c + 1e-9)) for c in cascade]


def select_layer_tokens(scores: torch.Tensor, valid: torch.Tensor, rho: float,
                        cascade: Sequence[float]) -> List[Tuple[torch.Tensor, torch.Tensor, List[int]]]:
    """Nested token sets per layer: ``(index [B, K_l], slot_valid [B, K_l], counts)``.

    ``scores[B, N]`` ranks the tokens (higher = more foreground), ``valid[B, N]`` marks real ones.
    Row ``b`` of layer ``l`` holds image ``b``'s ``counts[b]`` best tokens, best first; ``K_l`` is
    the largest count in the batch and the slots past an image's count are marked invalid (they
    hold its padded positions and are neither attended to nor written back).
    """
    ranked = scores.masked_fill(~valid, float("-inf"))
    per_image = [layer_token_counts(int(n), rho, cascade) for n in valid.sum(dim=1).tolist()]
    widths = [max(c[layer] for c in per_image) for layer in range(len(cascade))]
    order = ranked.topk(widths[0], dim=1).indices
    sets = []
    for layer, width in enumerate(widths):
        counts = [c[layer] for c in per_image]
        slot = torch.arange(width, device=scores.device)
        slot_valid = slot[None, :] < torch.tensor(counts, device=scores.device)[:, None]
        sets.append((order[:, :width], slot_valid, counts))
    return sets


def dual_attention_tokens(foreground: torch.Tensor, class_prob: Optional[torch.Tensor], slot_valid: torch.Tensor,
                          k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Among a layer's tokens, the ``k`` best by ``class_prob x foreground`` (both ``[B, K]``,
    non-negative): ``(index into the layer's tokens [B, D], valid [B, D])``, ``D = min(k, K)``."""
    score = foreground if class_prob is None else foreground * class_prob
    score = score.masked_fill(~slot_valid, float("-inf"))
    idx = score.topk(min(k, score.shape[1]), dim=1).indices
    return idx, slot_valid.gather(1, idx)


class FocusDETR(DetrMethod):
    name = "focus_detr"
    defaults = {"scorer": "norm", "scorer_path": None, "scorer_module": None, "cascade": None, "dual_k": 300}
    default_budget = {"keep": 0.5}
    option_help = {
        "scorer": "foreground scorer: 'norm' or 'attention' (zero-shot proxies) or 'learned' (a trained head)",
        "scorer_path": "file of a trained head (save_scorer), with scorer='learned'",
        "scorer_module": "a FocusScorer instance, with scorer='learned'",
        "cascade": "fraction of the kept set each encoder layer runs on (None: the paper's, stretched)",
        "dual_k": "tokens per layer given an extra self-attention (dual attention); 0 turns it off",
    }
    keep_means = "fraction of the encoder's tokens kept, rho"

    def validate(self, options: Dict[str, Any]) -> None:
        scorer = options["scorer"]
        if scorer not in SCORERS:
            raise ValueError(f"focus_detr scorer={scorer!r}; choose one of {', '.join(SCORERS)}")
        given = [n for n in ("scorer_path", "scorer_module") if options[n] is not None]
        if scorer == "learned" and len(given) != 1:
            raise ValueError("focus_detr scorer='learned' needs exactly one of scorer_path= (a file written by "
                             "save_scorer, e.g. by experiments/training/train_focus_scorer.py) or scorer_module= (a FocusScorer)")
        if scorer != "learned" and given:
            raise ValueError(f"focus_detr got {given[0]}= with scorer={scorer!r}; "
                             "pass scorer='learned' to use a trained head")
        if options["scorer_module"] is not None and not isinstance(options["scorer_module"], FocusScorer):
            raise TypeError("focus_detr scorer_module must be a FocusScorer, "
                            f"got {type(options['scorer_module']).__name__}")
        k = options["dual_k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"focus_detr dual_k={k!r} must be an int >= 0 "
                             "(tokens given dual attention; 0 turns it off)")
        cascade = options["cascade"]
        if cascade is not None:
            if not isinstance(cascade, (list, tuple)) or not all(
                    isinstance(c, (int, float)) and not isinstance(c, bool) for c in cascade):
                raise TypeError(f"focus_detr cascade={cascade!r} must be a sequence of numbers, one per encoder layer")
            if not all(0.0 < c <= 1.0 for c in cascade) or any(b > a for a, b in zip(cascade, cascade[1:])):
                raise ValueError(f"focus_detr cascade={list(cascade)} must be non-increasing ratios in (0, 1] "
                                 "(each layer runs on a subset of the previous layer's tokens)")

    def prepare(self, options: Dict[str, Any], dim: int) -> Optional[FocusScorer]:
        """The trained head for ``scorer='learned'`` (checked against the detector's width), else None."""
        if options["scorer"] != "learned":
            return None
        head = options["scorer_module"]
        if head is None:
            head = load_scorer(options["scorer_path"])
        if head.config["dim"] != dim:
            raise ValueError(f"the focus_detr scorer was trained for {head.config['dim']}-dim tokens but this "
                             f"detector's encoder has d_model={dim}; train one for this model with "
                             "experiments/training/train_focus_scorer.py")
        if head.config["num_levels"] != 1:
            raise ValueError(f"the focus_detr scorer has {head.config['num_levels']} feature levels; "
                             "a DETR encoder has one")
        return head

    def token_scores(self, options: Dict[str, Any], head: Optional[FocusScorer], x: torch.Tensor, pos: torch.Tensor,
                     valid: torch.Tensor, first_layer_qk) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rank [B, N], foreground [B, N] >= 0)`` for the encoder input ``x`` with position
        embeddings ``pos``; ``first_layer_qk()`` gives the first layer's ``q, k [B, H, N, d]``."""
        scorer = options["scorer"]
        if scorer == "norm":
            score = token_norm(x)
            return score, score
        if scorer == "attention":
            score = attention_received(*first_layer_qk(), None if bool(valid.all()) else valid)
            return score, score
        B, N, C = x.shape
        weight = next(head.parameters())
        if weight.device != x.device:  # the head is no submodule of the model, so model.to() did not move it
            head.to(device=x.device)
        # The head keeps its own dtype: casting it to the tokens' (bfloat16 under autocast) would
        # round a trained head's weights for good; the tokens are cast to it instead.
        tokens = (x + pos).to(weight.dtype)
        logits = foreground_logits(head, [tokens.transpose(1, 2).reshape(B, C, 1, N)],
                                   [valid.reshape(B, 1, N)])[0].reshape(B, N).float()
        return logits, logits.sigmoid()

    def layer_fractions(self, options: Dict[str, Any], depth: int) -> Tuple[float, ...]:
        """The fraction of the kept set each encoder layer runs on."""
        return cascade_for_depth(depth, options["cascade"])

    def planned_tokens(self, num_tokens: int, rho: float, cascade: Sequence[float]) -> List[int]:
        return layer_token_counts(num_tokens, rho, cascade)

    def layer_sets(self, scores: torch.Tensor, valid: torch.Tensor, rho: float, cascade: Sequence[float]):
        return select_layer_tokens(scores, valid, rho, cascade)

    def dual_set(self, options: Dict[str, Any], foreground: torch.Tensor, class_prob,
                 slot_valid: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The layer's dual-attention tokens (``index, valid``), or None when off. ``foreground[B, K]``
        of the layer's tokens; ``class_prob()`` their best-class probabilities (None without a class head)."""
        if options["dual_k"] == 0:
            return None
        return dual_attention_tokens(foreground, class_prob(), slot_valid, options["dual_k"])
