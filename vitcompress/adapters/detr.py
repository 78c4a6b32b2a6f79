"""transformers DETR (``DetrForObjectDetection``, ``DetrModel``, ``DetrForSegmentation``): the
encoder runs each layer only on the tokens a detection method selects
(:mod:`vitcompress.runtimes.sparse_encoder` runs the layers; this module maps the model onto it).

The encoder's forward is replaced by one that takes transformers' arguments and hands the tokens,
their position embeddings and the padding mask to the :class:`~vitcompress.runtimes.sparse_encoder.DetrRuntime`.
Each layer is described by its modules (:func:`encoder_layer_parts`) and computed with
``torch.nn.functional.scaled_dot_product_attention`` (the same math as transformers' eager, SDPA
and flash implementations, whichever ``config._attn_implementation`` says), for both layer layouts:
transformers 5.x (``self_attn.o_proj``, ``mlp.fc1``) and 4.40-4.5x (``self_attn.out_proj``, ``fc1``).
The encoder's position-embedding argument is accepted under each version's name
(``spatial_position_embeddings`` in 5.x, ``object_queries`` / ``position_embeddings`` in 4.x).
Tested with transformers 4.46.3 and 5.24.0; another layer layout raises a ``TypeError``.
"""
import inspect
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..interfaces import part_of
from ..runtimes.sparse_encoder import DetrRuntime, EncoderLayerParts
from .common import family_class, patch_part

TESTED = "transformers 4.4x and 5.x (tested with 4.46.3 and 5.24.0)"
# The encoder's position-embedding argument: 5.x, 4.4x, and the deprecated 4.3x alias.
POSITION_ARGS = ("spatial_position_embeddings", "object_queries", "position_embeddings")


_MODEL_CLASSES = tuple(f"transformers.models.detr.modeling_detr.{name}" for name in (
    "DetrForObjectDetection", "DetrModel", "DetrForSegmentation"))


def detr_parts(model):
    """``(DetrModel, class head or None)`` of any supported DETR wrapper."""
    from transformers import DetrForObjectDetection, DetrForSegmentation

    if isinstance(model, DetrForSegmentation):
        return model.detr.model, model.detr.class_labels_classifier
    if isinstance(model, DetrForObjectDetection):
        return model.model, model.class_labels_classifier
    return model, None


def encoder_layer_parts(layer: nn.Module, index: int, num_heads: int, attn_dropout: float) -> EncoderLayerParts:
    """Encoder layer ``index`` as its modules, for both transformers layouts."""
    attn = getattr(layer, "self_attn", None)
    out = getattr(attn, "o_proj", getattr(attn, "out_proj", None))  # 5.x: o_proj, 4.x: out_proj
    ffn = getattr(layer, "mlp", layer)  # 5.x keeps fc1/fc2 in layer.mlp, 4.x on the layer itself
    needed = [attn, out, getattr(attn, "q_proj", None), getattr(ffn, "fc1", None), getattr(ffn, "fc2", None),
              getattr(layer, "self_attn_layer_norm", None), getattr(layer, "final_layer_norm", None)]
    if any(m is None for m in needed):
        raise TypeError(f"encoder layer {index} ({type(layer).__name__}) does not have the layout of {TESTED} "
                        "(self_attn.q/k/v_proj + o_proj or out_proj, fc1/fc2, self_attn_layer_norm, "
                        "final_layer_norm); this transformers version is not supported")
    return EncoderLayerParts(layer=layer, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=out, num_heads=num_heads,
                             attn_dropout=attn_dropout, norm1=layer.self_attn_layer_norm, fc1=ffn.fc1, fc2=ffn.fc2,
                             act=ffn.activation_fn, act_dropout=float(ffn.activation_dropout),
                             dropout=float(layer.dropout), norm2=layer.final_layer_norm)


def _sparse_encoder_forward(encoder, inputs_embeds=None, attention_mask=None, spatial_position_embeddings=None,
                            object_queries=None, position_embeddings=None, output_attentions=None,
                            output_hidden_states=None, return_dict=None, **kwargs):
    """``DetrEncoder.forward`` running each layer on the method's tokens (signature of 4.x and 5.x)."""
    from transformers.modeling_outputs import BaseModelOutput

    runtime = part_of(encoder).runtime
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
    x = runtime.encode(x, pos, valid, states)
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
        return family_class(model, _MODEL_CLASSES) is not None

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

    def make_runtime(self, method, options, budget, common) -> DetrRuntime:
        return DetrRuntime(self, method, options, budget)

    def patch(self, runtime: DetrRuntime, patcher) -> None:
        patch_part(patcher, self.encoder, runtime, "forward", _sparse_encoder_forward)

    def layer_parts(self) -> List[EncoderLayerParts]:
        return [encoder_layer_parts(layer, i, self.num_heads, self.attn_dropout)
                for i, layer in enumerate(self.encoder.layers)]

    def encoder_inputs(self, pixel_values: torch.Tensor,
                       pixel_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """:func:`encoder_inputs` of this model: with :attr:`encoder`, what
        :mod:`vitcompress.profile.detr` counts and times the encoder on."""
        return encoder_inputs(self.model, pixel_values, pixel_mask)

    def class_prob(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Best real-class probability of each token by the detector's class head (DETR's last
        class is "no object" and is left out), or None for a ``DetrModel`` without a head."""
        if self.class_head is None:
            return None
        return self.class_head(x).float().softmax(dim=-1)[..., :-1].amax(dim=-1)


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
