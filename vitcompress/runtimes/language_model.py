"""Visual tokens dropped inside a VLM's language model during prefill (FastV, PyramidDrop, DART), for any
decoder whose layers take ``hidden_states`` and the keyword arguments ``attention_mask``,
``position_embeddings`` and ``position_ids`` (transformers' Llama, Qwen2, Mistral, ... decoders).

An adapter names the parts (:class:`LanguageModelParts`): the module whose ``forward`` runs the
layers, the layers, the output norm, how a layer computes its q / k, and the placeholder token ids of
the visual tokens; it calls :meth:`LanguageModelRuntime.prepare` with each call's ``input_ids``
before the language model runs. Nothing of the model's code is replaced: forward pre-hooks on the
layers cut what each layer reads, so every layer keeps the model's attention implementation (SDPA).

At prefill, before each of the method's drop layers, the method chooses the visual tokens that stay
(:class:`~vitcompress.interfaces.DropSignals`); from there on every layer gets the kept tokens'
hidden states, their own position embeddings / ids (the positions they had uncompressed) and the
attention mask's kept rows and columns; each layer's KV cache therefore holds only its own kept
tokens. A batch whose samples keep different numbers of tokens is padded on the left with invalid
slots (copies of the sample's first kept token that no query attends to). The cache object carries
which original position each of its columns holds per layer (``vitcompress_kept``), so the decoding
steps slice the model's mask to the columns each layer kept; decoded tokens keep their uncompressed
positions (the model derives them from the unpruned first layers' cache and the full 2-D mask).

Limits: the cache must be dynamic (a static cache is refused) and empty at prefill; rows that beam
search reorders must share their prompt (beams of one sample do), as they share the kept columns.
"""
import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..engine.patching import Patcher, PerThread
from ..interfaces import DropSignals, LanguageModelMethod

Tensor = torch.Tensor

#: the attribute a prefill's cache carries: {"length": prompt length, "layers": {layer: (index, slot_valid)}}
CACHE_ATTR = "vitcompress_kept"


def llama_query_key(layer, hidden: Tensor, position_embeddings) -> Tuple[Tensor, Tensor]:
    """``q``, ``k`` ``[B, H, T, d]`` that a Llama-like decoder layer (``input_layernorm``,
    ``self_attn.q_proj / k_proj``, optional ``q_norm / k_norm``, its module's ``apply_rotary_pos_emb``)
    computes on ``hidden``, rotary applied and key heads repeated to the query heads."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    return q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


@dataclass
class LanguageModelParts:
    """What an adapter names of its language model. ``module``: whose forward runs ``layers``
    (``inputs_embeds``, ``cache`` keyword arguments); ``query_key(layer, hidden, position_embeddings)``:
    a layer's q / k (:func:`llama_query_key` for Llama-like layers); ``visual_token_ids``: the
    placeholder ids whose positions hold visual tokens."""

    module: Any
    layers: Sequence[Any]
    final_norm: Callable[[Tensor], Tensor]
    visual_token_ids: Tuple[int, ...]
    query_key: Callable[[Any, Tensor, Any], Tuple[Tensor, Tensor]] = llama_query_key


def gather_tokens(t: Tensor, index: Tensor, dim: int) -> Tensor:
    """``t`` (sequence on axis ``dim`` < 0, batch of 1 or B just before it) at ``index[B, T']``."""
    dim = dim % t.dim()
    shape = list(t.shape)
    shape[dim - 1] = index.shape[0]
    t = t.expand(shape)
    view = [1] * t.dim()
    view[dim - 1], view[dim] = index.shape
    full = list(shape)
    full[dim] = index.shape[1]
    return t.gather(dim, index.view(view).expand(full))


def blocked(mask: Tensor, allowed: Tensor) -> Tensor:
    """``mask`` (bool: True attends; float: added to the logits) with the ``allowed == False`` entries blocked."""
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def prefill_mask(mask: Optional[Tensor], index: Tensor, slot_valid: Tensor) -> Optional[Tensor]:
    """The model's prefill mask ``[b, 1, T, T]`` (or None: causal) at the kept rows and columns
    ``index[B, T']``, the invalid slots' columns blocked."""
    if mask is None:
        if bool(slot_valid.all()):
            return None  # kept tokens stay in order: still causal
        allowed = (index[:, None, :] <= index[:, :, None]) & slot_valid[:, None, :]
        return allowed[:, None]
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        raise TypeError(f"visual tokens dropped inside the language model need a [batch, 1, queries, keys] attention "
                        f"mask or None (SDPA / eager attention), got {getattr(mask, 'shape', type(mask).__name__)}")
    rows = gather_tokens(mask[:, 0], index, -2)
    return blocked(gather_tokens(rows.transpose(-1, -2), index, -2).transpose(-1, -2), slot_valid[:, None, :])[:, None]


def decode_mask(mask: Optional[Tensor], index: Tensor, slot_valid: Tensor, prompt: int, total: int,
                queries: int) -> Optional[Tensor]:
    """A decoding step's mask for a layer whose cache holds the prompt's kept tokens ``index[B, T']``
    then the tokens after the ``prompt``: the model's mask ``[b, 1, q, total]`` (or None) at those columns."""
    batch = index.shape[0]
    after = torch.arange(prompt, total, device=index.device).expand(batch, -1)
    columns = torch.cat([index, after], dim=1)
    valid = torch.cat([slot_valid, torch.ones_like(after, dtype=torch.bool)], dim=1)
    if mask is None:
        if bool(slot_valid.all()):
            return None
        position = torch.arange(total - queries, total, device=index.device)
        return ((columns[:, None, :] <= position[None, :, None]) & valid[:, None, :])[:, None]
    sliced = gather_tokens(mask[:, 0].transpose(-1, -2), columns, -2).transpose(-1, -2)
    return blocked(sliced, valid[:, None, :])[:, None]


def kept_slots(keep: Tensor) -> Tuple[Tensor, Tensor]:
    """``keep[B, T]`` bool -> ``(local index [B, T'], slot_valid [B, T'])``: each row's kept tokens in
    order, rows with fewer padded on the left with copies of their first kept token."""
    counts = keep.sum(1)
    width = int(counts.max())
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]  # kept first, in order
    shift = width - counts
    slot = torch.arange(width, device=keep.device)[None] - shift[:, None]
    slot_valid = slot >= 0
    return order.gather(1, slot.clamp(min=0)), slot_valid


class _Prefill:
    """One prefill forward's state: the tokens still present (original positions ``index``, None
    before the first drop), what the method's signal layers read, the kept sets per drop layer."""

    def __init__(self, visual: Tensor, valid: Tensor, cache):
        self.visual, self.valid, self.cache = visual, valid, cache
        self.length = visual.shape[1]
        self.visual_before = visual.sum(1)
        self.index: Optional[Tensor] = None
        self.slot_valid: Optional[Tensor] = None
        self.captured: Dict[int, Tuple[Tensor, Any]] = {}
        self.layers: Dict[int, Tuple[Tensor, Tensor]] = {}
        self.stages: List[Dict[str, Any]] = []
        self.sliced: Optional[Tuple[Tuple[int, ...], Dict[str, Any]]] = None


class LanguageModelRuntime:
    """What ``compress`` attaches for a :class:`~vitcompress.interfaces.LanguageModelMethod`: the
    method, its options and budget, and the hooks on the language model's layers."""

    taps = None  # the LLaVA adapter's tower hooks and ViT runtime: none here
    tower = None

    def __init__(self, adapter, method: LanguageModelMethod, options: Dict[str, Any], budget,
                 parts: LanguageModelParts):
        method.check_budget(budget)
        self.adapter = adapter
        self.method = method
        self.options = options
        self.budget = budget
        self.parts = parts
        depth = len(parts.layers)
        self.drop_layers = tuple(method.drop_layers(options, depth))
        self.signal_layers = tuple(method.signal_layers(options, depth))
        if not self.drop_layers or self.drop_layers[0] < 1 or list(self.drop_layers) != sorted(set(self.drop_layers)):
            raise ValueError(f"{method.name}: drop layers {self.drop_layers} must increase from 1")
        self.patcher = Patcher()
        self._pending = PerThread()  # the visual-token mask of this thread's next language-model call
        self._pass = PerThread()  # the running forward's _Prefill, ("decode", record) or None
        self._last_prefill = PerThread()

    # ---------------------------------------------------------------- hooks
    def hook_language_model(self, patcher: Patcher) -> None:
        module = self.parts.module
        patcher.hook(module.register_forward_pre_hook(self._start, with_kwargs=True))
        patcher.hook(module.register_forward_hook(self._finish))
        first = min(self.drop_layers + self.signal_layers)
        for i in range(first, len(self.parts.layers)):
            patcher.hook(self.parts.layers[i].register_forward_pre_hook(functools.partial(self._layer, i),
                                                                        with_kwargs=True))

    def prepare(self, inputs: Dict[str, Any], question=None, expansion: int = 1) -> Dict[str, Any]:
        """Called with each call's arguments before the model runs: notes where the visual tokens
        are for the language model's next forward; the arguments pass unchanged."""
        ids = inputs.get("input_ids")
        visual = None
        if ids is not None and ids.shape[1] > 1:
            visual = torch.isin(ids, torch.tensor(self.parts.visual_token_ids, device=ids.device))
        self._pending.set(visual)
        return inputs

    def _start(self, module, args, kwargs):
        visual = self._pending.get()
        self._pending.set(None)
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state = None
        announced = visual is not None and embeds is not None and tuple(visual.shape) == tuple(embeds.shape[:2])
        if announced and visual.any():
            if cache is not None and getattr(cache, "is_compileable", False):
                raise TypeError(f"{self.method.name} keeps fewer tokens in later layers' caches; a fixed-size cache "
                                f"({type(cache).__name__}) cannot hold that: use the default dynamic cache")
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(f"{self.method.name} drops visual tokens during the prefill of an empty cache; this "
                                 "cache already holds tokens")
            mask = kwargs.get("attention_mask")
            valid = mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else torch.ones_like(visual)
            state = _Prefill(visual.to(embeds.device), valid.to(embeds.device), cache)
        elif getattr(cache, CACHE_ATTR, None) is not None:
            state = ("decode", getattr(cache, CACHE_ATTR), cache)
        self._pass.set(state)

    def _finish(self, module, args, output):
        state = self._pass.get()
        self._pass.set(None)
        if isinstance(state, _Prefill):
            if state.cache is not None:
                setattr(state.cache, CACHE_ATTR, {"length": state.length, "layers": state.layers})
            self._last_prefill.set({"visual_tokens_before": state.visual_before.tolist(), "stages": state.stages})

    def _layer(self, i: int, module, args, kwargs):
        state = self._pass.get()
        if state is None:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if not isinstance(state, _Prefill):
            record, cache = state[1], state[2]
            if i not in record["layers"]:
                return None
            index, slot_valid = record["layers"][i]
            mask = kwargs.get("attention_mask")
            total = mask.shape[-1] if isinstance(mask, Tensor) else cache.get_seq_length()
            kwargs["attention_mask"] = decode_mask(mask, index, slot_valid, record["length"], total, hidden.shape[1])
            return (hidden,) + tuple(args[1:]), kwargs
        original = dict(kwargs)
        kwargs = self._sliced(state, original)
        if i in self.signal_layers:
            state.captured[i] = (hidden, kwargs.get("position_embeddings"))
        if i in self.drop_layers:
            hidden = self._drop(state, i, hidden)
            kwargs = self._sliced(state, original)
        if state.index is not None:
            state.layers[i] = (state.index, state.slot_valid)
        return (hidden,) + tuple(args[1:]), kwargs

    # ---------------------------------------------------------------- the drop
    def _signals(self, state: _Prefill, layer: int, hidden: Tensor) -> DropSignals:
        index = state.index
        visual = state.visual if index is None else state.visual.gather(1, index) & state.slot_valid
        valid = state.valid if index is None else state.valid.gather(1, index) & state.slot_valid
        parts = self.parts

        def query_key(at: int) -> Tuple[Tensor, Tensor]:
            if at not in state.captured:
                raise RuntimeError(f"{self.method.name} reads layer {at}, which is not among its signal layers "
                                   f"{self.signal_layers}")
            h, position_embeddings = state.captured[at]
            if h.shape[1] != hidden.shape[1]:
                raise RuntimeError(f"{self.method.name} reads layer {at}, whose tokens were dropped since")
            return parts.query_key(parts.layers[at], h, position_embeddings)

        return DropSignals(hidden=hidden, visual=visual, valid=valid, visual_before=state.visual_before, layer=layer,
                           stage=self.drop_layers.index(layer), query_key=query_key, final_norm=parts.final_norm)

    def _drop(self, state: _Prefill, layer: int, hidden: Tensor) -> Tensor:
        signals = self._signals(state, layer, hidden)
        chosen = self.method.select(signals, self.budget.value, self.options)
        present = torch.ones_like(signals.visual) if state.slot_valid is None else state.slot_valid
        keep = present & (chosen.to(torch.bool) | ~signals.visual)
        local, slot_valid = kept_slots(keep)
        state.index = local if state.index is None else state.index.gather(1, local)
        state.slot_valid = slot_valid
        state.sliced = None
        kept_visual = state.visual.gather(1, state.index) & slot_valid
        state.stages.append({"layer": layer, "visual_tokens": kept_visual.sum(1).tolist(),
                             "kept": [state.index[b][kept_visual[b]] for b in range(keep.shape[0])]})
        return hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))

    def _sliced(self, state: _Prefill, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The layer's keyword arguments at the tokens still present (computed once per drop and per
        set of arguments: layers of different attention types may get different masks)."""
        if state.index is None:
            return kwargs
        key = tuple(id(kwargs.get(name)) for name in ("attention_mask", "position_embeddings", "position_ids"))
        if state.sliced is None or state.sliced[0] != key:
            index, out = state.index, {}
            cos_sin = kwargs.get("position_embeddings")
            if cos_sin is not None:
                out["position_embeddings"] = tuple(gather_tokens(t, index, -2) for t in cos_sin)
            if isinstance(kwargs.get("position_ids"), Tensor):
                out["position_ids"] = gather_tokens(kwargs["position_ids"], index, -1)
            out["attention_mask"] = prefill_mask(kwargs.get("attention_mask"), index, state.slot_valid)
            state.sliced = (key, out)
        return dict(kwargs, **state.sliced[1])

    # ---------------------------------------------------------------- reporting
    def stats(self) -> Dict[str, Any]:
        """Method, options and what the calling thread's last prefill kept: per drop layer, each
        sample's visual tokens and the original positions of those kept (``kept``)."""
        last = self._last_prefill.get() or {"visual_tokens_before": [], "stages": []}
        before = last["visual_tokens_before"]
        after = last["stages"][-1]["visual_tokens"] if last["stages"] else before
        return {
            "method": self.method.name,
            "family": self.adapter.family,
            "budget": self.budget.describe(),
            "options": dict(self.options),
            "drop_layers": list(self.drop_layers),
            "stages": last["stages"],
            "visual_tokens_before": sum(before),
            "visual_tokens_after": sum(after),
        }
