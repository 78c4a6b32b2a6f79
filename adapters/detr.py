"""transformers DETR (``DetrForObjectDetection``, ``DetrModel``, ``DetrForSegmentation``): the
encoder runs each layer only on the tokens a detection method selects.

The encoder's forward is replaced: the method scores every token, then each layer gathers its
tokens (with their position embeddings), runs on them alone (keys: the selected tokens only, as
in Sparse DETR / Focus-DETR; a padding-aware key mask where a batch's images keep different
counts) and scatters the results back into the full sequence, so the decoder cross-attends to
every position with the usual padding mask. The layer is computed from its own modules with
``torch.nn.functional.scaled_dot_product_attention`` (the same math as transformers' eager, SDPA
and flash implementations, whichever ``config._attn_implementation`` says), for both layer layouts:
transformers 5.x (``self_attn.o_proj``, ``mlp.fc1``) and 4.40-4.5x (``self_attn.out_proj``, ``fc1``).
The encoder's position-embedding argument is accepted under each version's name
(``spatial_position_embeddings`` in 5.x, ``object_queries`` / ``position_embeddings`` in 4.x).
Tested with transformers 4.46.3 and 5.24.0; another layer layout raises a ``TypeError``.
"""
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitcompress.runtime import Patcher
from vitcompress.tokens import gather_tokens

from .common import bind

TESTED = "transformers 4.4x and 5.x (tested with 4.46.3 and 5.24.0)"
# The encoder's position-embedding argument: 5.x, 4.4x, and the deprecated 4.3x alias.
POSITION_ARGS = ("spatial_position_embeddings", "object_queries", "position_embeddings")


def _classes():
    if "transformers" not in sys.modules:  # a DETR instance exists only once transformers is imported
        return None
    from transformers import DetrForObjectDetection, DetrForSegmentation, DetrModel
    return DetrForObjectDetection, DetrModel, DetrForSegmentation


def detr_parts(model):
    """``(DetrModel, class head or None)`` of any supported DETR wrapper."""
    detection, _, segmentation = _classes()
    if isinstance(model, segmentation):
        return model.detr.model, model.detr.class_labels_classifier
    if isinstance(model, detection):
        return model.model, model.class_labels_classifier
    return model, None


@dataclass
class EncoderLayerParts:
    """A post-norm DETR encoder layer seen as its pieces, for both transformers layouts."""

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
    act: Callable
    act_dropout: float
    dropout: float
    norm2: nn.LayerNorm

    @classmethod
    def of(cls, layer, index: int, num_heads: int, attn_dropout: float) -> "EncoderLayerParts":
        attn = getattr(layer, "self_attn", None)
        out = getattr(attn, "o_proj", getattr(attn, "out_proj", None))  # 5.x: o_proj, 4.x: out_proj
        ffn = getattr(layer, "mlp", layer)  # 5.x keeps fc1/fc2 in layer.mlp, 4.x on the layer itself
        needed = [attn, out, getattr(attn, "q_proj", None), getattr(ffn, "fc1", None), getattr(ffn, "fc2", None),
                  getattr(layer, "self_attn_layer_norm", None), getattr(layer, "final_layer_norm", None)]
        if any(m is None for m in needed):
            raise TypeError(f"encoder layer {index} ({type(layer).__name__}) does not have the layout of {TESTED} "
                            "(self_attn.q/k/v_proj + o_proj or out_proj, fc1/fc2, self_attn_layer_norm, "
                            "final_layer_norm); this transformers version is not supported")
        return cls(layer=layer, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=out, num_heads=num_heads,
                   attn_dropout=attn_dropout, norm1=layer.self_attn_layer_norm, fc1=ffn.fc1, fc2=ffn.fc2,
                   act=ffn.activation_fn, act_dropout=float(ffn.activation_dropout), dropout=float(layer.dropout),
                   norm2=layer.final_layer_norm)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, C = t.shape
        return t.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def qk(self, x: torch.Tensor, pos: torch.Tensor):
        """Queries and keys ``[B, H, N, d]`` (position embeddings added, as DETR does)."""
        h = x + pos
        return self._heads(self.q(h)), self._heads(self.k(h))

    def attend(self, x: torch.Tensor, pos: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Self-attention among ``x``'s tokens, residual, LayerNorm. ``key_mask[B, N]``: True = may be attended."""
        training = self.layer.training
        q, k = self.qk(x, pos)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, self._heads(self.v(x)), attn_mask=mask,
                                           dropout_p=self.attn_dropout if training else 0.0)
        o = self.o(o.transpose(1, 2).reshape(x.shape))
        return self.norm1(x + F.dropout(o, p=self.dropout, training=training))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        training = self.layer.training
        x = self.attend(x, pos, key_mask)
        h = F.dropout(self.act(self.fc1(x)), p=self.act_dropout, training=training)
        x = self.norm2(x + F.dropout(self.fc2(h), p=self.dropout, training=training))
        if training and not torch.isfinite(x).all():  # transformers clamps overflow while training
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(min=-limit, max=limit)
        return x


def _scatter(t: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return t.scatter(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]), values)


class SparseEncoderRuntime:
    """What ``compress`` attaches to a DETR: the method's configuration, the patcher and the token
    counts of the last forward. The method (a ``target = "detr"`` descriptor) scores the tokens and
    picks each layer's set; this runtime runs the layers on them."""

    def __init__(self, adapter: "DetrAdapter", method, options: Dict[str, Any], budget):
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
        self.head = method.prepare(options, adapter.dim)
        self.parts = [EncoderLayerParts.of(layer, i, adapter.num_heads, adapter.attn_dropout)
                      for i, layer in enumerate(adapter.encoder.layers)]
        self.class_head = adapter.class_head
        self.patcher = Patcher()
        self.encoder_tokens: List[int] = []
        self.kept_per_image: List[List[int]] = []
        self.tokens_seen: List[int] = []
        self.dual_seen: List[int] = []

    def class_prob(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Best real-class probability of each token by the detector's class head (no-object excluded)."""
        if self.class_head is None:
            return None
        return self.class_head(x).float().softmax(dim=-1)[..., :-1].amax(dim=-1)

    def run(self, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
            hidden_states: Optional[list]) -> torch.Tensor:
        parts, method, options = self.parts, self.method, self.options
        rank, foreground = method.token_scores(options, self.head, x, pos, valid, lambda: parts[0].qk(x, pos))
        sets = method.layer_sets(rank, valid, self.rho, self.cascade)
        self.encoder_tokens = valid.sum(dim=1).tolist()
        self.kept_per_image = [list(c) for c in zip(*(counts for _, _, counts in sets))]
        self.tokens_seen, self.dual_seen = [], []
        for layer, (idx, slot_valid, _) in zip(parts, sets):
            key_mask = None if bool(slot_valid.all()) else slot_valid
            xk, pk = gather_tokens(x, idx), gather_tokens(pos, idx)
            dual = method.dual_set(options, foreground.gather(1, idx), lambda: self.class_prob(xk), slot_valid)
            if dual is not None:
                didx, dvalid = dual
                d_mask = None if bool(dvalid.all()) else dvalid
                attended = layer.attend(gather_tokens(xk, didx), gather_tokens(pk, didx), d_mask)
                xk = _scatter(xk.to(attended.dtype), didx, attended)
                self.dual_seen.append(int(didx.shape[1]))
            xk = layer.forward(xk, pk, key_mask)
            if key_mask is not None:
                xk = torch.where(slot_valid.unsqueeze(-1), xk, gather_tokens(x, idx))
            x = _scatter(x.to(xk.dtype), idx, xk)  # autocast: the layer's LayerNorm returns float32
            self.tokens_seen.append(int(idx.shape[1]))
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def planned_tokens_per_layer(self, num_tokens: int) -> List[int]:
        return self.method.planned_tokens(num_tokens, self.rho, self.cascade)

    def stats(self) -> Dict[str, Any]:
        largest = max(self.encoder_tokens, default=0)
        return {
            "method": self.method.name,
            "family": self.adapter.family,
            "budget": self.budget.describe(),
            "rho": self.rho,
            "cascade": list(self.cascade),
            "options": {k: v for k, v in self.options.items() if k != "scorer_module"},
            "encoder_tokens": list(self.encoder_tokens),
            "planned_tokens_per_layer": self.planned_tokens_per_layer(largest) if largest else [],
            "tokens_per_layer": list(self.tokens_seen),
            "kept_per_image": [list(k) for k in self.kept_per_image],
            "dual_tokens_per_layer": list(self.dual_seen),
        }


def _sparse_encoder_forward(encoder, inputs_embeds=None, attention_mask=None, spatial_position_embeddings=None,
                            object_queries=None, position_embeddings=None, output_attentions=None,
                            output_hidden_states=None, return_dict=None, **kwargs):
    """``DetrEncoder.forward`` running each layer on the method's tokens (signature of 4.x and 5.x)."""
    from transformers.modeling_outputs import BaseModelOutput

    runtime = encoder._vitcompress_runtime
    config = encoder.config
    pos = next((p for p in (spatial_position_embeddings, object_queries, position_embeddings) if p is not None), None)
    if inputs_embeds is None or pos is None:
        raise ValueError("a compressed DETR encoder needs inputs_embeds and the spatial position embeddings "
                         "(call the DETR model, which passes both)")
    if output_attentions if output_attentions is not None else config.output_attentions:
        raise ValueError("a compressed DETR encoder cannot return attentions (each layer attends over a different "
                         "token subset); call without output_attentions, or vitcompress.restore(model) first")
    if output_hidden_states is None:
        output_hidden_states = config.output_hidden_states
    x = F.dropout(inputs_embeds, p=encoder.dropout, training=encoder.training)
    if attention_mask is None:
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    else:
        valid = attention_mask.bool()
    states = [x] if output_hidden_states else None
    x = runtime.run(x, pos, valid, states)
    if return_dict is False:
        return tuple(v for v in (x, tuple(states) if states else None) if v is not None)
    return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(states) if states else None)


class DetrAdapter:
    family = "transformers.DETR"
    description = "transformers DETR (DetrForObjectDetection, DetrModel, DetrForSegmentation; detection methods only)"
    targets = ("detr",)
    variant = None

    @staticmethod
    def matches(model) -> bool:
        classes = _classes()
        return classes is not None and isinstance(model, classes)

    def __init__(self, model):
        self.model = model
        detr, self.class_head = detr_parts(model)
        self.family = f"transformers.{type(model).__name__}"
        self.encoder = detr.encoder
        config = detr.config
        self.depth = len(self.encoder.layers)
        self.dim = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.attn_dropout = float(config.attention_dropout)
        if self.depth == 0:
            raise ValueError("this DETR has no encoder layers (encoder_layers=0); there is nothing to reduce")

    def make_runtime(self, method, options, budget) -> SparseEncoderRuntime:
        return SparseEncoderRuntime(self, method, options, budget)

    def patch(self, runtime: SparseEncoderRuntime, patcher) -> None:
        patcher.set(self.encoder, "_vitcompress_runtime", runtime)
        patcher.set(self.encoder, "forward", bind(_sparse_encoder_forward, self.encoder))


class _EncoderInputsCaptured(Exception):
    pass


def encoder_inputs(model: nn.Module, pixel_values: torch.Tensor,
                   pixel_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The tensors a DETR hands its encoder for these images, by the encoder's argument names
    (``inputs_embeds``, ``attention_mask`` and the position embeddings, see
    :func:`encoder_position_embeddings`); the encoder and decoder do not run."""
    encoder = detr_parts(model)[0].encoder
    captured: Dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
        captured.update({k: v for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)})
        raise _EncoderInputsCaptured

    handle = encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    except _EncoderInputsCaptured:
        pass
    finally:
        handle.remove()
    if "inputs_embeds" not in captured:
        raise RuntimeError("the DETR model did not call its encoder (were encoder_outputs given?)")
    return captured


def encoder_position_embeddings(inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The position embeddings in :func:`encoder_inputs`, under whichever name this transformers uses."""
    return next(inputs[k] for k in POSITION_ARGS if k in inputs)


class EncoderCall(nn.Module):
    """The encoder of ``model`` as a function of its input tokens alone (mask and position
    embeddings bound), for FLOPs counting and timing. The whole model (whose class head the
    dual attention uses) and a compressed model's scorer head are submodules, so tracing sees
    every parameter the encoder touches."""

    def __init__(self, model: nn.Module, inputs: Dict[str, torch.Tensor]):
        super().__init__()
        self.model = model
        runtime = getattr(model, "_vitcompress", None)
        self.scorer = getattr(runtime, "head", None)
        self.bound = {k: v for k, v in inputs.items() if k != "inputs_embeds"}
        self.train(model.training)  # a new module starts in training mode; counting would leave the model there

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return detr_parts(self.model)[0].encoder(inputs_embeds=inputs_embeds, **self.bound)[0]


def count_encoder_flops(model: nn.Module, pixel_values: torch.Tensor, pixel_mask: Optional[torch.Tensor] = None) -> int:
    """fvcore multiply-adds of the (compressed or plain) encoder alone for these images, token
    scoring and dual attention included."""
    from vitcompress.profile import count_flops

    with torch.no_grad():
        inputs = encoder_inputs(model, pixel_values, pixel_mask)
    return count_flops(EncoderCall(model, inputs), inputs["inputs_embeds"])
