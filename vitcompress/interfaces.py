"""The types every part of vitcompress shares, in one leaf module (it imports only torch).

* :class:`Plan` and :class:`Signals`: what a ViT method receives and returns.
* The method protocol per target: :class:`Method` (what every method declares), and what each
  target adds: :class:`ViTMethod` (a plan per reducing block), :class:`DetrMethod` (token sets for a
  sparse detection encoder), :class:`LlavaMethod` (the visual tokens a VLM hands its language model).
* :class:`Adapter` and :class:`Runtime`: what an adapter tells the core about a model, and what
  ``compress`` attaches to it; :class:`CommonOptions`: what a ViT runtime takes besides the method's
  options.
* Where a compression lives on a model: :data:`RUNTIME_ATTR` and :func:`runtime_of`.

Core modules, methods and adapters import from here; nothing here imports them.
"""
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

Tensor = torch.Tensor

#: The attribute ``compress`` sets on the model it compressed: its :class:`Runtime`.
RUNTIME_ATTR = "_vitcompress"
#: The attribute an adapter sets on each submodule it patched: a :class:`PatchedPart` (so a
#: compression of an outer model is seen from inside it).
PART_ATTR = "_vitcompress_part"

TARGETS = ("vit", "detr", "llava")


def runtime_of(model) -> Optional["Runtime"]:
    """The runtime ``compress`` attached to ``model`` itself, or None (not inherited from a class)."""
    return getattr(model, "__dict__", {}).get(RUNTIME_ATTR)


@dataclass
class PatchedPart:
    """What a patched submodule (a block, a pooler, an encoder) knows of its compression: the
    runtime, its index among the blocks (-1 for a part that is not a block) and adapter details."""

    runtime: Any
    layer: int = -1
    details: Any = None


def part_of(module) -> PatchedPart:
    return module.__dict__[PART_ATTR]


# --------------------------------------------------------------------------- plans and signals


@dataclass
class Plan:
    """What one reducing layer does to the reducible (non-special) tokens.

    ``keep[B, Nk]`` indexes the reducible tokens that survive, in output order.
    ``merge_src[B, Nm]`` indexes reducible tokens folded into survivors and ``merge_dst[B, Nm]``
    gives, for each, the position in ``keep`` it folds into. Tokens in neither are pruned.
    ``merge_mask[B, Nm]`` (bool, optional): False where a listed source is pruned instead of merged,
    so one static plan can merge in some images and prune in others (PPT's per-image choice).

    ``merge_weight[B, T]`` (optional, over all reducible tokens): each output token becomes the plain
    sum of the tokens it gathers, each scaled by its weight -- the method normalises them (MCTF's
    attention-weighted mean) or not (EViT's fused token) -- instead of the size-weighted mean;
    sizes and sources still add up. None: the size-weighted mean.

    ``merge_norm`` (optional): None merges to the size-weighted average; ``"max"`` is MLERP (ToFu): a token
    that received merges keeps the average's direction and takes the largest norm among the tokens
    folded into it (its own included). A plan sets at most one of the three.
    """

    keep: Tensor
    merge_src: Optional[Tensor] = None
    merge_dst: Optional[Tensor] = None
    merge_mask: Optional[Tensor] = None
    merge_weight: Optional[Tensor] = None
    merge_norm: Optional[str] = None

    @property
    def merges(self) -> bool:
        return self.merge_src is not None and self.merge_src.shape[1] > 0


@dataclass
class Signals:
    """Everything a reducing layer can offer a ViT method, computed once in the shared block.

    ``metric[B, T, d]``: keys averaged over heads (the ToMe metric), reducible tokens only.
    ``x[B, T, C]``: hidden states of the reducible tokens after the attention residual.
    ``attn[B, H, N, N]``: attention probabilities over all N tokens (prefix included), present only
    in layers where the method asked for them. ``cls_first``: whether the first special token is a
    class token (a timm ViT without one may still have register tokens). ``v[B, H, N, d]``: the
    attention's values over all N tokens (a reference, nothing is computed for it). ``size[B, T]``: how
    many original patches each reducible token stands for (float32).
    """

    metric: Tensor
    x: Tensor
    attn: Optional[Tensor]
    num_prefix: int
    layer: int
    num_layers: int
    cls_first: bool = True
    v: Optional[Tensor] = None
    size: Optional[Tensor] = None


# --------------------------------------------------------------------------- methods


class Method:
    """What every method declares: its name, options with defaults, default budget and target.

    A method is a set of pure tensor functions (in its own module) plus a small descriptor class
    of one of the target protocols below; the descriptor never touches an ``nn.Module``.
    """

    name: str = ""
    kind: str = "merge"  # "merge" keeps mass (size-weighted); "prune" drops tokens
    dynamic: bool = False  # True when token counts depend on the content (no static schedule; not exportable)
    # What the method reduces: "vit" (the token sequence of a ViT-like encoder: timm, CLIP towers),
    # "detr" (a detection encoder), "llava" (the visual tokens handed to a language model).
    target: str = "vit"
    defaults: Dict[str, Any] = {}
    # What each option is, for describe(): name -> one line.
    option_help: Dict[str, str] = {}
    # Defaults a paper sets per model family, keyed by the adapter's ``variant`` (e.g. "clip");
    # applied over ``defaults``, under the user's options.
    family_defaults: Dict[str, Dict[str, Any]] = {}
    default_budget: Dict[str, Any] = {"keep": 0.9}
    keep_means: str = "fraction of tokens kept per reducing block"  # what keep= is, for error messages

    def validate(self, options: Dict[str, Any]) -> None:
        """Raise ValueError / TypeError for option values outside their domain."""


class ViTMethod(Method):
    """A method on the token sequence of a ViT-like encoder: a plan per reducing block, executed by
    the one apply path (:func:`vitcompress.engine.tokens.apply_plan`)."""

    target = "vit"

    def max_remove(self, tokens: int, layer: int, num_layers: int, options: Dict[str, Any]) -> int:
        """Most reducible tokens this layer can remove when ``tokens`` enter it."""
        return tokens // 2

    def reduces(self, layer: int, num_layers: int, options: Dict[str, Any]) -> bool:
        """Whether block ``layer`` reduces at all (static)."""
        return True

    def limit_hint(self, options) -> str:
        """What else lifts :meth:`max_remove`'s limit, for the error that reports it ("" if nothing)."""
        return ""

    def remove_for_keep(self, tokens: int, num_prefix: int, keep: float) -> int:
        """Tokens a block removes under a ``keep=`` budget when ``tokens`` reducible tokens (after
        ``num_prefix`` special ones) enter it: all but ``floor(tokens * keep)``."""
        return tokens - math.floor(tokens * keep + 1e-9)

    def clamps(self, options: Dict[str, Any]) -> bool:
        """Whether a budget too large for a block removes what it can instead of being refused."""
        return False

    def needs_attention(self, layer: int, num_layers: int, options: Dict[str, Any]) -> bool:
        return False

    def check_model(self, num_prefix: int, cls_first: bool) -> None:
        """Refuse, at compress time, a model whose special tokens the method cannot work with
        (``num_prefix`` of them, the first a class token when ``cls_first``)."""

    def overhead_flops(self, tokens: int, num_prefix: int, remove: int, num_heads: int, head_dim: int,
                       layer: int, num_layers: int, options: Dict[str, Any]) -> int:
        """Multiply-adds the scoring itself costs in a reducing layer (for FLOPs planning), as
        fvcore counts them: only its matrix products."""
        return 0

    def plan(self, signals: Signals, remove: int, options: Dict[str, Any]) -> Plan:
        raise NotImplementedError


class DetrMethod(Method):
    """A method for a sparse detection encoder: it scores the encoder's tokens once per forward and
    chooses the nested token set of every layer; :class:`vitcompress.runtimes.sparse_encoder.DetrRuntime`
    runs the layers on those sets and calls exactly the hooks below.

    At compress time: :meth:`layer_fractions`, :meth:`prepare`. Per forward: :meth:`token_scores`,
    :meth:`layer_sets`, then per layer :meth:`dual_set`. For ``stats()``: :meth:`planned_tokens`.
    ``keep`` is the budget's value (rho, the fraction of each image's real tokens kept).
    """

    target = "detr"
    kind = "prune"

    def layer_fractions(self, options: Dict[str, Any], depth: int) -> Tuple[float, ...]:
        """The fraction of the kept set each of the ``depth`` encoder layers runs on."""
        raise NotImplementedError

    def prepare(self, options: Dict[str, Any], dim: int) -> Any:
        """Anything the method builds once at compress time for ``dim``-wide tokens (a trained
        scorer head; an ``nn.Module`` is traced with the encoder when FLOPs are counted), or None.
        The runtime passes it back to :meth:`token_scores` as ``prepared``."""
        return None

    def token_scores(self, options: Dict[str, Any], prepared: Any, x: Tensor, pos: Tensor, valid: Tensor,
                     first_layer_qk: Callable[[], Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        """``(rank [B, N], foreground [B, N] >= 0)`` of the encoder input ``x[B, N, C]`` (position
        embeddings ``pos``, real tokens ``valid[B, N]``); ``first_layer_qk()`` computes the first
        layer's ``q, k [B, H, N, d]`` on demand."""
        raise NotImplementedError

    def layer_sets(self, rank: Tensor, valid: Tensor, keep: float,
                   fractions: Sequence[float]) -> List[Tuple[Tensor, Tensor, List[int]]]:
        """Per layer, nested: ``(index [B, K], slot_valid [B, K], tokens kept per image)``; slots
        past an image's count are invalid (neither attended to nor written back)."""
        raise NotImplementedError

    def dual_set(self, options: Dict[str, Any], foreground: Tensor, class_prob: Callable[[], Optional[Tensor]],
                 slot_valid: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """The layer's tokens that get an extra self-attention first, ``(index into the layer's
        tokens [B, D], valid [B, D])``, or None. ``foreground[B, K]`` of the layer's tokens;
        ``class_prob()`` their best real-class probabilities (None without a class head)."""
        return None

    def planned_tokens(self, num_tokens: int, keep: float, fractions: Sequence[float]) -> List[int]:
        """Tokens each layer runs on for an image with ``num_tokens`` real tokens."""
        raise NotImplementedError


class LlavaMethod(Method):
    """A method on the visual tokens a VLM hands its language model (:class:`vitcompress.runtimes.vlm.LlavaRuntime`
    encodes the call's pixels, calls it, and rewrites the prompt to the counts it returns).

    ``unit = "crop"``: each image crop is reduced on its own from signals of the vision tower:
    :meth:`tower_layers` names the layers whose q/k projections the runtime captures while the
    model encodes, and :meth:`reduce_images` reduces every image of the call. ``unit = "video"``:
    one budget per video is split across its frames (:meth:`reduce_video`).
    """

    target = "llava"
    unit: str = ""  # "crop" | "video"
    #: a crop method that also reads the features the model projects: the runtime then taps the output
    #: of the model's feature layer as the last of :meth:`reduce_images`'s ``taps`` (``hidden``) and
    #: passes ``project=``, the model's projector on such features
    reads_features: bool = False
    #: a crop method given each image's question (``questions=``, from the call's ``question=``)
    needs_question: bool = False

    def check_budget(self, budget: Any) -> None:
        """Refuse a budget (``schedule.Budget``) this method cannot take; by default only ``keep=``."""
        if budget.kind != "keep":
            raise ValueError(f"{self.name} takes keep= ({self.keep_means}), not {budget.kind}=")

    def tower_layers(self, options: Dict[str, Any], depth: int, feature_layer: Optional[int] = None) -> Tuple[int, ...]:
        """The encoder layers (resolved for a tower of ``depth`` layers) whose q/k :meth:`reduce_images`
        reads, in the order it takes them. ``feature_layer``: the layer whose output the model hands its
        projector (0-based), which a method may take as its default."""
        raise NotImplementedError

    def reduce_images(self, images: Sequence[Tensor], layouts: Sequence[Tuple[Tensor, int]], taps: Sequence[Any],
                      options: Dict[str, Any]) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
        """Every image of one call -> its reduced tokens and a report per image.

        ``images[i][L, D]``: an image's visual tokens in the model's packed order; ``layouts[i]``:
        ``(layout [L], crops)``, ``layout`` naming each token (``crop * N + patch``, the crop counted
        within the image; -1 a row's newline; -2 CLS) and ``crops`` the image's number of crops;
        ``taps``: per layer of :meth:`tower_layers`, the tower's ``q``, ``k`` ``[crops, 1 + N, H * d]``
        (CLS first) of every crop of the call, image after image, with the layer's ``num_heads``
        and softmax ``scale`` (and its output ``hidden``), and ``cells`` when the model builds each token from
        several patches (InternVL's pixel shuffle): the patch signals are then pooled to those tokens.
        ``questions`` / ``project``: see :attr:`needs_question` / :attr:`reads_features` (passed only to
        such methods).
        """
        raise NotImplementedError

    def reduce_video(self, frames: Tensor, grids: Sequence[Tensor], keep: float, question: str,
                     options: Dict[str, Any]) -> Tuple[List[Tensor], Dict[str, Any]]:
        """One video: ``frames[F, 3, H, W]`` (the processor's pixels), ``grids`` its F frames' token
        grids ``[h, w, D]``, ``keep`` the budget, ``question`` the call's -> the tokens ``[n, D]``
        each frame keeps, and a report."""
        raise NotImplementedError


# --------------------------------------------------------------------------- adapters and runtimes


@dataclass(frozen=True)
class CommonOptions:
    """The options ``compress`` takes for every ViT method besides the method's own: the runtime and
    the reducing blocks read them, the method never does, so they travel apart from its options."""

    prop_attn: bool  # log(size) added to the attention logits
    trace_source: bool  # track which original patches each token covers
    unmerge: bool = False  # outputs a dense head reads back on the full patch grid


@runtime_checkable
class Adapter(Protocol):
    """Model surgery for one family: where it keeps blocks, q/k/v, special tokens and pooling.

    ``targets``: which method targets it takes; ``family``: a name for messages; ``variant``: the
    key of a method's ``family_defaults`` (e.g. "clip") or None. ``make_runtime`` builds what
    ``compress`` attaches (``common``: a ViT method's :class:`CommonOptions`, None for the other
    targets); ``patch`` swaps the model's pieces through the given patcher.
    """

    family: str
    targets: Tuple[str, ...]
    variant: Optional[str]

    def make_runtime(self, method: Method, options: Dict[str, Any], budget: Any,
                     common: Optional[CommonOptions]) -> "Runtime": ...

    def patch(self, runtime: "Runtime", patcher: Any) -> None: ...


@runtime_checkable
class Runtime(Protocol):
    """What ``compress`` attaches to a model: the configuration (method, options, budget) and the
    patcher that undoes the surgery. The state of a forward is never kept here for other calls:
    each forward makes its own, and :meth:`stats` reports the calling thread's last one."""

    method: Method
    adapter: Any
    options: Dict[str, Any]
    patcher: Any

    def stats(self) -> Dict[str, Any]: ...


@dataclass(frozen=True)
class TokenSignals:
    """What one layer of a VLM's vision tower without a [CLS] token gives a crop method in place of
    its q/k (an entry of :meth:`LlavaMethod.reduce_images`' ``taps``): per crop, the keys of its
    visual tokens ``[crops, N, d]`` and the attention each receives ``[crops, N]``, which stands in
    for the [CLS] row. The adapter that computes them says what they are (Qwen-VL:
    :mod:`vitcompress.adapters.qwen_vl`)."""

    keys: torch.Tensor
    attention: torch.Tensor


# --------------------------------------------------------------------------- methods inside a VLM's language model


@dataclass
class DropSignals:
    """What a language-model method sees where visual tokens drop (before layer ``layer`` runs), for
    the ``T`` tokens the batch still has there (a sample with fewer kept tokens is padded on the left
    with invalid slots).

    ``hidden[B, T, C]``: the hidden states entering the layer. ``visual[B, T]``: the visual tokens
    still present. ``valid[B, T]``: real tokens (not padding, not an invalid slot).
    ``visual_before[B]``: each sample's visual tokens at the input of the language model.
    ``stage``: which of the method's drop layers this is (0 first). ``query_key(layer)``: ``q``,
    ``k`` ``[B, H, T, d]`` (rotary applied, key heads repeated to the query heads) of ``layer``
    on the hidden states that entered it in this forward, one of :meth:`LanguageModelMethod.signal_layers`;
    computed on demand. ``final_norm(x)``: the language model's output norm.
    """

    hidden: Tensor
    visual: Tensor
    valid: Tensor
    visual_before: Tensor
    layer: int
    stage: int
    query_key: Callable[[int], Tuple[Tensor, Tensor]]
    final_norm: Callable[[Tensor], Tensor]


class LanguageModelMethod(LlavaMethod):
    """A method that drops visual tokens inside a VLM's language model during prefill
    (:class:`vitcompress.runtimes.language_model.LanguageModelRuntime` applies it): before each of
    :meth:`drop_layers` it chooses the visual tokens that stay, from :class:`DropSignals`; every
    later layer, its KV cache and the decoding steps see only those. ``keep`` is the budget's value."""

    unit = "language_model"
    kind = "prune"

    def drop_layers(self, options: Dict[str, Any], depth: int) -> Tuple[int, ...]:
        """The layers (0-based, increasing, at least 1) before which visual tokens drop, for a
        language model of ``depth`` layers; refuse options that do not fit it."""
        raise NotImplementedError

    def signal_layers(self, options: Dict[str, Any], depth: int) -> Tuple[int, ...]:
        """The layers whose inputs :meth:`select` reads through ``query_key``."""
        return ()

    def select(self, signals: DropSignals, keep: float, options: Dict[str, Any]) -> Tensor:
        """``[B, T]`` bool: the visual tokens of ``signals`` that stay (only visual ones count)."""
        raise NotImplementedError


@dataclass
class TokenFeatures:
    """What a VLM's projector turns into each visual token, on a tower without a [CLS] token, for a
    crop method that reads the features (:attr:`LlavaMethod.reads_features`; the last entry of
    :meth:`LlavaMethod.reduce_images`' ``taps``): per image ``hidden[N, G, C]``, the ``G`` patch
    features the projector folds into each of its ``N`` tokens, in the projector's order (Qwen-VL:
    the 2 x 2 patches its merger concatenates). The ``project=`` of such a call takes ``[n, G, C]``."""

    hidden: List[torch.Tensor]
