"""The sparse detection encoder: each encoder layer runs only on the tokens a detection method
selects, and its results are scattered back into the full sequence.

A :class:`~vitcompress.interfaces.DetrMethod` scores the encoder's tokens once and picks a nested
token set per layer (and, per layer, the tokens that get an extra self-attention first); this
module runs the layers on those sets. Keys are the selected tokens only, as in Sparse DETR /
Focus-DETR, with a padding-aware key mask where a batch's images keep different counts; tokens
outside a layer's set pass through unchanged, so the decoder still cross-attends to every position.

Adapters describe each post-norm encoder layer as its modules (:class:`EncoderLayerParts`); the
layer math lives here, once. Configuration on the model, state per call: :class:`DetrRuntime`
keeps the method, its options and the layers; the token counts of each forward
(:class:`EncoderForwardState`) are kept per thread.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.patching import Patcher, PerThread
from ..engine.schedule import Budget
from ..engine.tokens import gather_tokens
from ..interfaces import DetrMethod

Tensor = torch.Tensor


@dataclass
class EncoderLayerParts:
    """A post-norm encoder layer (self-attention -> residual -> LayerNorm -> MLP -> residual ->
    LayerNorm, position embeddings added to queries and keys) seen as its modules.

    Modules only (no closures), so a runtime holding them survives ``copy.deepcopy`` and pickling
    of the model; ``layer`` is the module whose ``training`` flag turns dropout on.
    """

    layer: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    attn_dropout: float
    norm1: nn.LayerNorm
    fc1: nn.Linear
    fc2: nn.Linear
    act: Callable[[Tensor], Tensor]
    act_dropout: float
    dropout: float
    norm2: nn.LayerNorm

    def _heads(self, t: Tensor) -> Tensor:
        B, N, C = t.shape
        return t.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def qk(self, x: Tensor, pos: Tensor):
        """Queries and keys ``[B, H, N, d]`` (position embeddings added, as DETR does)."""
        h = x + pos
        return self._heads(self.q(h)), self._heads(self.k(h))

    def attend(self, x: Tensor, pos: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        """Self-attention among ``x``'s tokens, residual, LayerNorm. ``key_mask[B, N]``: True = may be attended."""
        training = self.layer.training
        q, k = self.qk(x, pos)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, self._heads(self.v(x)), attn_mask=mask,
                                           dropout_p=self.attn_dropout if training else 0.0)
        o = self.o(o.transpose(1, 2).reshape(x.shape))
        return self.norm1(x + F.dropout(o, p=self.dropout, training=training))

    def forward(self, x: Tensor, pos: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        training = self.layer.training
        x = self.attend(x, pos, key_mask)
        h = F.dropout(self.act(self.fc1(x)), p=self.act_dropout, training=training)
        x = self.norm2(x + F.dropout(self.fc2(h), p=self.dropout, training=training))
        if training and not torch.isfinite(x).all():  # transformers clamps overflow while training
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(min=-limit, max=limit)
        return x


@dataclass
class EncoderForwardState:
    """The token counts of one forward of a sparse encoder: real tokens per image, tokens each image
    kept per layer, and the tokens each layer (and its dual attention) ran on; for drawing what each
    layer kept (:mod:`vitcompress.visualize`), ``layer_sets``: each layer's ``(index [B, K], slot_valid
    [B, K])`` into the encoder's tokens, and ``valid[B, N]``: the real (not padding) tokens."""

    encoder_tokens: List[int]
    kept_per_image: List[List[int]]
    layer_sets: List[Tuple[Tensor, Tensor]] = field(default_factory=list)
    valid: Optional[Tensor] = None
    tokens_seen: List[int] = field(default_factory=list)
    dual_seen: List[int] = field(default_factory=list)


def _scatter(t: Tensor, idx: Tensor, values: Tensor) -> Tensor:
    return t.scatter(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]), values)


class DetrRuntime:
    """A detection encoder's compression: the method, its options, ``keep`` (rho) and each layer's
    fraction of the kept set, what the method prepared at compress time, and the encoder's layers.

    The adapter gives ``depth``, ``dim``, ``layer_parts()`` (one :class:`EncoderLayerParts` per
    encoder layer) and ``class_prob(x)`` (each token's best real-class probability by the detector's
    class head, or None); its patched encoder forward calls :meth:`encode`.
    """

    def __init__(self, adapter, method: DetrMethod, options: Dict[str, Any], budget: Budget):
        if budget.kind != "keep":
            raise ValueError(f"{method.name} takes keep= (rho, the fraction of each image's encoder tokens the "
                             f"scorer keeps; default {method.default_budget['keep']}); {budget.kind}= is not supported "
                             "because a DETR's token count changes with every image size")
        self.adapter = adapter
        self.method = method
        self.options = options
        self.budget = budget
        self.rho = float(budget.value)
        self.cascade = method.layer_fractions(options, adapter.depth)
        self.prepared = method.prepare(options, adapter.dim)
        self.layers = adapter.layer_parts()
        self.patcher = Patcher()
        self._forward = PerThread()

    def encode(self, x: Tensor, pos: Tensor, valid: Tensor, hidden_states: Optional[list] = None) -> Tensor:
        """The encoder's output for input tokens ``x[B, N, C]`` with position embeddings ``pos`` and
        real tokens ``valid[B, N]``; appends each layer's output to ``hidden_states`` if given.
        This forward's token counts become the calling thread's (see :meth:`stats`)."""
        layers, method, options = self.layers, self.method, self.options
        rank, foreground = method.token_scores(options, self.prepared, x, pos, valid, lambda: layers[0].qk(x, pos))
        sets = method.layer_sets(rank, valid, self.rho, self.cascade)
        forward = EncoderForwardState(encoder_tokens=valid.sum(dim=1).tolist(),
                                      kept_per_image=[list(c) for c in zip(*(counts for _, _, counts in sets))],
                                      layer_sets=[(idx, slot_valid) for idx, slot_valid, _ in sets], valid=valid)
        self._forward.set(forward)
        for layer, (idx, slot_valid, _) in zip(layers, sets):
            key_mask = None if bool(slot_valid.all()) else slot_valid
            xk, pk = gather_tokens(x, idx), gather_tokens(pos, idx)
            dual = method.dual_set(options, foreground.gather(1, idx), lambda: self.adapter.class_prob(xk), slot_valid)
            if dual is not None:
                didx, dvalid = dual
                d_mask = None if bool(dvalid.all()) else dvalid
                attended = layer.attend(gather_tokens(xk, didx), gather_tokens(pk, didx), d_mask)
                xk = _scatter(xk.to(attended.dtype), didx, attended)
                forward.dual_seen.append(int(didx.shape[1]))
            xk = layer.forward(xk, pk, key_mask)
            if key_mask is not None:
                xk = torch.where(slot_valid.unsqueeze(-1), xk, gather_tokens(x, idx))
            x = _scatter(x.to(xk.dtype), idx, xk)  # autocast: the layer's LayerNorm returns float32
            forward.tokens_seen.append(int(idx.shape[1]))
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def last_forward(self) -> Optional[EncoderForwardState]:
        """This thread's last forward, or None before the first."""
        return self._forward.get()

    def planned_tokens_per_layer(self, num_tokens: int) -> List[int]:
        return self.method.planned_tokens(num_tokens, self.rho, self.cascade)

    def stats(self) -> Dict[str, Any]:
        last = self.last_forward() or EncoderForwardState(encoder_tokens=[], kept_per_image=[])
        largest = max(last.encoder_tokens, default=0)
        return {
            "method": self.method.name,
            "family": self.adapter.family,
            "budget": self.budget.describe(),
            "rho": self.rho,
            "cascade": list(self.cascade),
            "options": {k: v for k, v in self.options.items() if not isinstance(v, nn.Module)},
            "encoder_tokens": list(last.encoder_tokens),
            "planned_tokens_per_layer": self.planned_tokens_per_layer(largest) if largest else [],
            "tokens_per_layer": list(last.tokens_seen),
            "kept_per_image": [list(k) for k in last.kept_per_image],
            "dual_tokens_per_layer": list(last.dual_seen),
        }
