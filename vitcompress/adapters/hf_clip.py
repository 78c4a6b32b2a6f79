"""transformers CLIP image towers: ``CLIPVisionModel`` (LLaVA's ``vision_tower``),
``CLIPVisionModelWithProjection``, ``CLIPVisionTransformer`` (transformers 4.x) and the image tower of
a ``CLIPModel`` (the text tower is never touched).

Works with transformers 4.4x-4.5x, where a ``CLIPEncoderLayer`` takes ``(hidden_states,
attention_mask, causal_attention_mask, output_attentions)`` and returns a tuple and the tower is
``CLIPVisionModel.vision_model``, and with 5.x, where the layer takes ``(hidden_states,
attention_mask, **kwargs)``, returns a tensor and ``CLIPVisionModel`` is the tower itself. Each layer
(``layer_norm1`` -> q/k/v/out projections -> ``layer_norm2`` -> MLP) is mapped onto the shared
reducing block, whichever of the standard attention implementations (eager, SDPA, flash, flex)
the model was loaded with: they all compute the same softmax attention. Any other registered
attention function is refused.

What a compressed tower returns:

* ``pooler_output`` / ``image_embeds``: the class token (after ``post_layernorm`` / projection),
  never reduced: shapes unchanged.
* ``last_hidden_state``: the reduced tokens, class token first.
* ``output_hidden_states=True``: ``hidden_states[0]`` is the input of the first layer (all
  patches); ``hidden_states[i]`` is the output of layer ``i - 1``, with the token count that layer
  left (``vitcompress.stats(model)["planned_tokens_per_layer"][i]`` for ``i < depth``). A LLaVA
  reading ``hidden_states[-2][:, 1:]`` gets the reduced patch tokens.
* ``output_attentions=True`` is refused (the reduced layers do not materialise attention maps).

Training with gradient checkpointing is not supported (recomputed layers would see the token
state of the finished forward).
"""
import functools
import inspect

from ..engine.blocks import BlockParts, reducing_forward
from ..engine.schedule import ViTCost
from ..interfaces import part_of
from .common import (MAPPABLE_ATTENTION, ViTAdapter, family_class, identity, patch_blocks, patch_flops, per_token_flops,
                     refuse_grad_checkpointing, unmerge_hidden_states)

_MODEL_CLASSES = tuple(f"transformers.models.clip.modeling_clip.{name}" for name in (
    "CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPVisionTransformer"))


def _layer_parts(layer) -> BlockParts:
    attn = layer.self_attn

    def qkv(h):
        B, N, _ = h.shape
        shape = (B, N, attn.num_heads, attn.head_dim)
        return tuple(proj(h).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    return BlockParts(
        norm1=layer.layer_norm1, qkv=qkv, attn_out=lambda o, h: attn.out_proj(o), residual1=identity,
        norm2=layer.layer_norm2, mlp=layer.mlp, residual2=identity,
        scale=attn.scale, attn_dropout=lambda: attn.dropout, training=lambda: layer.training,
    )


def _find_tower(model):
    """The module holding ``embeddings``, ``pre_layrnorm``, ``encoder``, ``post_layernorm``."""
    tower = model
    while not hasattr(tower, "pre_layrnorm") and hasattr(tower, "vision_model"):
        tower = tower.vision_model
    return tower


class HFCLIPVisionAdapter(ViTAdapter):
    family = "transformers.CLIPVision"
    description = ("transformers CLIPVisionModel / CLIPVisionModelWithProjection / CLIPVisionTransformer "
                   "and CLIPModel (image tower)")
    variant = "clip"

    @staticmethod
    def matches(model) -> bool:
        return family_class(model, _MODEL_CLASSES) is not None

    def __init__(self, model):
        from transformers.models.clip import modeling_clip as mc

        self.model = model
        self.tower = tower = _find_tower(model)
        if not isinstance(getattr(tower, "embeddings", None), mc.CLIPVisionEmbeddings):
            raise TypeError(f"{type(model).__name__} has no CLIP image tower (embeddings, pre_layrnorm, encoder, "
                            "post_layernorm) where transformers puts it")
        for i, layer in enumerate(tower.encoder.layers):
            attn = getattr(layer, "self_attn", None)
            if type(layer) is not mc.CLIPEncoderLayer or not isinstance(attn, mc.CLIPAttention):
                raise TypeError(f"layer {i} of the CLIP image tower is a {type(layer).__name__} with "
                                f"{type(attn).__name__}; vitcompress supports transformers' CLIPEncoderLayer "
                                "with CLIPAttention")
        implementation = getattr(tower.encoder.layers[0].self_attn.config, "_attn_implementation", None)
        if implementation not in MAPPABLE_ATTENTION:
            raise ValueError(f"attention implementation {implementation!r} cannot be mapped onto vitcompress's "
                             "reducing attention; load the model with attn_implementation='sdpa' (or 'eager')")
        # transformers 4.x layers take output_attentions and return a tuple; 5.x return a tensor.
        self.tuple_outputs = "output_attentions" in inspect.signature(type(tower.encoder.layers[0]).forward).parameters
        self.num_prefix = 1
        self.num_patches = tower.embeddings.num_patches
        self.depth = len(tower.encoder.layers)

    def patch(self, runtime, patcher) -> None:
        patch_blocks(patcher, self.tower.encoder.layers, runtime, _reducing_layer_forward, details=self.tuple_outputs)
        if runtime.unmerge:  # hidden states asked for go back on the patch grid, as the last layer's output does
            patcher.hook(self.tower.register_forward_pre_hook(functools.partial(unmerge_hidden_states, runtime),
                                                              with_kwargs=True))
        refuse_grad_checkpointing(patcher, self.model, "gradient_checkpointing_enable",
                                  "activation_checkpointing_enable")

    def cost(self) -> ViTCost:
        t = self.tower
        layer = t.encoder.layers[0]
        attn = layer.self_attn
        conv = t.embeddings.patch_embedding
        per_patch = patch_flops(conv)
        per_patch += per_token_flops(t.pre_layrnorm)
        fixed = self.num_prefix * per_token_flops(t.pre_layrnorm) + per_token_flops(t.post_layernorm)
        fixed += per_token_flops(getattr(self.model, "visual_projection", None))
        return ViTCost(
            depth=self.depth, dim=attn.embed_dim, num_heads=attn.num_heads, head_dim=attn.head_dim,
            per_patch=per_patch,
            per_token_attn_in=per_token_flops(layer.layer_norm1) + sum(
                per_token_flops(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)),
            per_token_attn_out=per_token_flops(attn.out_proj),
            per_token_mlp=per_token_flops(layer.layer_norm2) + per_token_flops(layer.mlp),
            per_token_final=0, fixed=fixed,
        )


def _reducing_layer_forward(layer, hidden_states, attention_mask=None, causal_attention_mask=None,
                            output_attentions=None, **kwargs):
    """``CLIPEncoderLayer.forward`` with token reduction, for both the 4.x and the 5.x signature."""
    if attention_mask is not None or causal_attention_mask is not None:
        raise ValueError("a compressed CLIP image tower cannot take an attention mask (token reduction changes "
                         "the token set the mask refers to)")
    if output_attentions is None:  # transformers 5.x passes it only when the caller does
        output_attentions = layer.self_attn.config.output_attentions
    if output_attentions:
        raise ValueError("output_attentions=True is not available on a compressed CLIP image tower: its layers "
                         "do not materialise attention maps; call vitcompress.restore(model) first")
    part = part_of(layer)
    out = reducing_forward(_layer_parts(layer), part.runtime, part.layer, hidden_states)
    return (out,) if part.details else out
