"""transformers pre-norm vision encoders, through one adapter: ViT, DeiT, DINOv2 (with and without
registers) and the SigLIP image tower.

Models
------
* ``ViTModel``, ``ViTForImageClassification`` (class token),
* ``DeiTModel``, ``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher`` (class and
  distillation tokens: two special tokens, as timm's distilled DeiT),
* ``Dinov2Model``, ``Dinov2ForImageClassification`` (LayerScale, drop-path, SwiGLU MLP),
  ``Dinov2WithRegistersModel``, ``Dinov2WithRegistersForImageClassification`` (class token + registers),
* ``SiglipVisionModel`` (and 4.x's ``SiglipVisionTransformer``), ``SiglipForImageClassification`` and the
  image tower of a ``SiglipModel`` (its text tower is never touched). SigLIP has no class token:
  every token may be reduced.

The special tokens (class, distillation, registers) are never reduced. Every encoder layer (norm ->
q/k/v -> output projection [-> LayerScale / drop-path / dropout] -> residual; norm -> MLP -> residual)
is mapped onto the shared reducing block, for both layer layouts of transformers: 5.x (``q_proj`` /
``k_proj`` / ``v_proj`` / ``o_proj``, the layer takes ``(hidden_states, attention_mask, **kwargs)``
and returns a tensor) and 4.4x (``attention.attention.query`` / ``key`` / ``value``,
``attention.output.dense``, ``intermediate`` / ``output``; the layer takes ``head_mask`` or
``attention_mask`` and ``output_attentions`` and returns a tuple). The attention implementations
eager, SDPA and flash compute the same softmax attention; any other (flex, whose models always pass a
BlockMask, or a registered custom one) is refused.

Pooling of a compressed model
-----------------------------
* class-token heads (``pooler``, ViT/DeiT classifiers, DeiT's distillation head, DINOv2's
  ``pooler_output``): unchanged, the special tokens are never reduced.
* ``Dinov2(WithRegisters)ForImageClassification``: class token + the mean of the patch tokens, the
  mean weighted by how many patches each token stands for; ``SiglipForImageClassification``: the
  size-weighted mean of all tokens.
* SigLIP's attention-pooling head (``SiglipMultiheadAttentionPoolingHead``): ``log(size)`` is added to
  its attention logits (proportional attention), so a merged token gets the weight its patches would
  get together (exact when they were identical).

What else a compressed model returns: ``last_hidden_state`` holds the reduced tokens (special tokens
first); with ``output_hidden_states=True``, ``hidden_states[i]`` (the input of layer ``i``) has the
count the earlier layers left (``vitcompress.stats(model)["planned_tokens_per_layer"][i]``).
``interpolate_pos_encoding=True`` (and DINOv2, which always interpolates) works at any input size:
the schedule is planned per size. Refused with an error naming the fix: ``output_attentions=True``,
attention or head masks, masked-image-modeling models, and gradient checkpointing while training (4.x;
in 5.x a patched layer is simply not checkpointed).

Dense outputs (``unmerge=True``): ``last_hidden_state`` and the hidden states asked for come back on the
patch grid; ``Dinov2Backbone`` / ``Dinov2WithRegistersBackbone`` (the layers of their feature maps) and
``DepthAnythingForDepthEstimation`` / ``DPTForDepthEstimation`` on a DINOv2 backbone take only that.
"""
import functools
import inspect
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..engine.blocks import BlockParts, reducing_forward
from ..engine.schedule import ViTCost
from ..interfaces import part_of
from .common import (MAPPABLE_ATTENTION, ViTAdapter, family_class, identity, patch_blocks, patch_flops, patch_part,
                     per_token_flops, refuse_grad_checkpointing, unmerge_hidden_states)

# flex attention is refused: these models build a BlockMask even without padding, which the reducing
# block cannot tell from a real mask.
_ATTENTION = tuple(a for a in MAPPABLE_ATTENTION if a != "flex_attention")

# model_type -> (module, family name, classes taken, classes refused with the reason)
_MIM = ("reconstructs the image from the patch grid, which reduced tokens no longer form; compress the encoder "
        "it wraps (its .{}) for features instead")
_BACKBONE = ("returns feature maps on the patch grid, which reduced tokens no longer form: compress it with "
             "unmerge=True (the tokens go back on the full grid after the layers it reads), or use {}Model")
_FAMILIES = {
    "vit": ("transformers.models.vit.modeling_vit", "ViT",
            ("ViTModel", "ViTForImageClassification"), {"ViTForMaskedImageModeling": _MIM.format("vit")}),
    "deit": ("transformers.models.deit.modeling_deit", "DeiT",
             ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
             {"DeiTForMaskedImageModeling": _MIM.format("deit")}),
    "dinov2": ("transformers.models.dinov2.modeling_dinov2", "Dinov2",
               ("Dinov2Model", "Dinov2ForImageClassification", "Dinov2Backbone"), {}),
    "dinov2_with_registers": ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
                              "Dinov2WithRegisters",
                              ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification",
                               "Dinov2WithRegistersBackbone"), {}),
    # dense heads on a DINOv2 backbone (checked to be one); unmerge=True only
    "depth_anything": ("transformers.models.depth_anything.modeling_depth_anything", "DepthAnything",
                       ("DepthAnythingForDepthEstimation",), {}),
    "dpt": ("transformers.models.dpt.modeling_dpt", "DPT", ("DPTForDepthEstimation",), {}),
    "siglip": ("transformers.models.siglip.modeling_siglip", "Siglip",
               ("SiglipVisionModel", "SiglipVisionTransformer", "SiglipModel", "SiglipForImageClassification"), {}),
}
# Where a wrapper keeps the encoder it wraps, in the order they are tried.
_INNER = ("vit", "deit", "dinov2", "dinov2_with_registers", "vision_model", "backbone")
# Models that read every patch token (feature maps, dense heads): they take unmerge=True only.
_DENSE = ("Dinov2Backbone", "Dinov2WithRegistersBackbone", "DepthAnythingForDepthEstimation", "DPTForDepthEstimation")
# Classification heads that average tokens: class name -> whether the class token is concatenated first.
_MEAN_HEADS = {"Dinov2ForImageClassification": True, "Dinov2WithRegistersForImageClassification": True,
               "SiglipForImageClassification": False}
# Linear heads applied to one token (counted once per image).
_TOKEN_HEADS = ("classifier", "cls_classifier", "distillation_classifier")


_BY_CLASS = {f"{module}.{name}": (model_type, why)
             for model_type, (module, _, taken, refused) in _FAMILIES.items()
             for name, why in [(n, None) for n in taken] + list(refused.items())}


def _known(model) -> Optional[Tuple[str, Optional[str]]]:
    """``(model_type, refusal reason or None)`` for a model of a class this adapter knows (or a
    subclass of one), else None."""
    name = family_class(model, _BY_CLASS)
    return None if name is None else _BY_CLASS[name]


def _first(obj, *names):
    return next((getattr(obj, n) for n in names if getattr(obj, n, None) is not None), None)


def _encoder(model) -> nn.Module:
    """The module holding ``embeddings`` and the layers (``layers`` or ``encoder.layer(s)``)."""
    module = model
    for _ in range(3):
        if hasattr(module, "embeddings") and _layers_of(module) is not None:
            return module
        module = _first(module, *_INNER)
        if module is None:
            break
    raise TypeError(f"{type(model).__name__} has no vision encoder (embeddings and encoder layers) where "
                    "transformers puts it")


def _layers_of(encoder) -> Optional[nn.ModuleList]:
    layers = getattr(encoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    inner = getattr(encoder, "encoder", None)
    layers = _first(inner, "layer", "layers") if inner is not None else None
    return layers if isinstance(layers, nn.ModuleList) else None


# --------------------------------------------------------------------------- one layer, both layouts


class _Layout:
    """Where one encoder layer keeps its pieces (found once, at compress time)."""

    def __init__(self, layer, index: int):
        self.norm1 = _first(layer, "layernorm_before", "norm1", "layer_norm1")
        self.norm2 = _first(layer, "layernorm_after", "norm2", "layer_norm2")
        attn = _first(layer, "self_attn", "attention")
        if self.norm1 is None or self.norm2 is None or attn is None:
            raise TypeError(f"layer {index} ({type(layer).__name__}) is not a pre-norm encoder layer vitcompress "
                            "knows (norms before attention and MLP)")
        if hasattr(attn, "q_proj"):  # transformers 5.x (and SigLIP in 4.x)
            self.q, self.k, self.v = attn.q_proj, attn.k_proj, attn.v_proj
            self.out = _first(attn, "o_proj", "out_proj")
            self.out_dropout = identity
            self.heads = _first(attn, "num_attention_heads", "num_heads")
            self.head_dim = attn.head_dim
            self.scale = _first(attn, "scaling", "scale")
            dropout = _first(attn, "attention_dropout", "dropout")
            self.attn_dropout = float(getattr(dropout, "p", dropout) or 0.0)
        elif hasattr(getattr(attn, "attention", None), "query"):  # 4.x ViT / DeiT / DINOv2
            inner = attn.attention
            self.q, self.k, self.v = inner.query, inner.key, inner.value
            self.out, self.out_dropout = attn.output.dense, attn.output.dropout
            self.heads, self.head_dim = inner.num_attention_heads, inner.attention_head_size
            self.scale = self.head_dim ** -0.5
            self.attn_dropout = float(inner.dropout.p if isinstance(inner.dropout, nn.Dropout) else
                                      getattr(inner, "dropout_prob", 0.0))
        else:
            raise TypeError(f"layer {index}: attention {type(attn).__name__} has no q/k/v projections vitcompress "
                            "knows")
        if self.out is None or self.heads is None:
            raise TypeError(f"layer {index}: attention {type(attn).__name__} has no output projection or head count")
        if hasattr(layer, "mlp"):
            self.mlp_modules = (layer.mlp,)
        elif hasattr(layer, "intermediate") and hasattr(getattr(layer, "output", None), "dense"):  # 4.x ViT / DeiT
            self.mlp_modules = (layer.intermediate, layer.output.dense)
        else:
            raise TypeError(f"layer {index} ({type(layer).__name__}) has no MLP vitcompress knows")
        self.config = getattr(attn, "config", None)

    def parts(self, layer) -> BlockParts:
        q_proj, k_proj, v_proj, out, out_dropout = self.q, self.k, self.v, self.out, self.out_dropout
        heads, head_dim = self.heads, self.head_dim

        def qkv(h):
            B, N, _ = h.shape
            shape = (B, N, heads, head_dim)
            return q_proj(h).view(shape).transpose(1, 2), k_proj(h).view(shape).transpose(1, 2), \
                v_proj(h).view(shape).transpose(1, 2)

        if len(self.mlp_modules) == 1:
            mlp = self.mlp_modules[0]
        else:  # 4.x: ViTIntermediate (dense + activation), ViTOutput.dense, its dropout (the residual is ours)
            intermediate, dense = self.mlp_modules
            mlp = lambda h: layer.output.dropout(dense(intermediate(h)))  # noqa: E731

        # DINOv2: LayerScale then drop-path; 5.x ViT / DeiT: the layer's hidden dropout; SigLIP: nothing.
        scale1, scale2 = getattr(layer, "layer_scale1", None), getattr(layer, "layer_scale2", None)
        drop_path = getattr(layer, "drop_path", None)
        dropout = getattr(layer, "dropout", None) if len(self.mlp_modules) == 1 else None
        if scale1 is not None:
            residual1 = lambda y: drop_path(scale1(y)) if drop_path is not None else scale1(y)  # noqa: E731
            residual2 = lambda y: drop_path(scale2(y)) if drop_path is not None else scale2(y)  # noqa: E731
        elif isinstance(dropout, nn.Dropout):
            residual1 = residual2 = dropout
        else:
            residual1 = residual2 = identity
        return BlockParts(
            norm1=self.norm1, qkv=qkv, attn_out=lambda o, h: out_dropout(out(o)), residual1=residual1,
            norm2=self.norm2, mlp=mlp, residual2=residual2,
            scale=self.scale, attn_dropout=lambda: self.attn_dropout, training=lambda: layer.training,
        )

    def flops(self) -> Tuple[int, int, int]:
        """(attention input, attention output, MLP) multiply-adds per token."""
        attn_in = per_token_flops(self.norm1) + sum(per_token_flops(p) for p in (self.q, self.k, self.v))
        mlp = per_token_flops(self.norm2) + sum(per_token_flops(m) for m in self.mlp_modules)
        return attn_in, per_token_flops(self.out), mlp


# --------------------------------------------------------------------------- the adapter


class HFViTAdapter(ViTAdapter):
    family = "transformers.ViT/DeiT/Dinov2/SiglipVision"
    description = ("transformers ViTModel / DeiTModel / Dinov2Model / Dinov2WithRegistersModel / SiglipVisionModel, "
                   "their image classifiers and SiglipModel (image tower)")

    @staticmethod
    def matches(model) -> bool:
        return _known(model) is not None

    def __init__(self, model):
        known = _known(model)
        if known is None:
            raise TypeError(f"HFViTAdapter does not know {type(model).__name__}")
        model_type, refused = known
        if refused is not None:
            raise TypeError(f"{type(model).__name__} {refused}")
        self.model = model
        self.model_type = model_type
        self.family = f"transformers.{_FAMILIES[model_type][1]}"
        if model_type in ("depth_anything", "dpt"):
            backbone = getattr(model, "backbone", None)
            if family_class(backbone, [c for c in _BY_CLASS if c.endswith("Backbone")]) is None:
                raise TypeError(f"{type(model).__name__} is supported with a DINOv2 backbone (backbone_config="
                                f"Dinov2Config); this one has {type(backbone).__name__ if backbone else 'its own ViT'}")
        if type(model).__name__ in _DENSE:
            self.needs_unmerge = (f"{type(model).__name__} reads every patch token (feature maps on the patch grid), "
                                  "which reduced tokens no longer form: compress it with unmerge=True")
        self.encoder = encoder = _encoder(model)
        self.layers = _layers_of(encoder)
        self.layouts = [_Layout(layer, i) for i, layer in enumerate(self.layers)]
        config = self.layouts[0].config or getattr(encoder, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        if implementation not in _ATTENTION:
            raise ValueError(f"attention implementation {implementation!r} cannot be mapped onto vitcompress's "
                             "reducing attention; load the model with attn_implementation='sdpa' (or 'eager')")
        emb = encoder.embeddings
        self.cls_first = getattr(emb, "cls_token", None) is not None
        registers = getattr(emb, "register_tokens", None)
        self.num_prefix = (int(self.cls_first) + int(getattr(emb, "distillation_token", None) is not None)
                           + (registers.shape[1] if registers is not None else 0))
        patches = getattr(emb, "patch_embeddings", None)
        self.num_patches = int(getattr(patches, "num_patches", None) or emb.num_patches)
        self.depth = len(self.layers)
        # SigLIP is a contrastive image-text model: PiToMe's CLIP defaults (as for CLIP towers)
        self.variant = "clip" if model_type == "siglip" else None
        # Layer signature: the names of its arguments after hidden_states; 4.x layers return tuples.
        params = list(inspect.signature(type(self.layers[0]).forward).parameters)[2:]
        self.layer_args = tuple(p for p in params if p not in ("kwargs", "args"))
        self.tuple_outputs = "output_attentions" in params
        self.head = getattr(encoder, "head", None) if getattr(encoder, "use_head", True) else None
        if self.head is not None and not isinstance(getattr(self.head, "attention", None), nn.MultiheadAttention):
            raise TypeError(f"the pooling head {type(self.head).__name__} is not SigLIP's attention-pooling head")
        self.mean_head = _MEAN_HEADS.get(type(model).__name__)

    def patch(self, runtime, patcher) -> None:
        details = _Layers(tuple(self.layouts), self.layer_args, self.tuple_outputs,
                          getattr(self.encoder, "encoder", None) if self.tuple_outputs else None)
        patch_blocks(patcher, self.layers, runtime, _reducing_layer_forward, details=details)
        # A mask the caller passes is refused here; the layers then accept the full mask transformers
        # builds from none while torch.export traces the model (it cannot check a mask's contents there).
        names = tuple(p for p in list(inspect.signature(type(self.encoder).forward).parameters)[1:]
                      if p not in ("args", "kwargs"))
        patcher.hook(self.encoder.register_forward_pre_hook(functools.partial(_refuse_masks, names),
                                                            with_kwargs=True))
        if runtime.unmerge:  # the layers the caller reads put their outputs back on the grid; heads see every patch
            patcher.hook(self.encoder.register_forward_pre_hook(functools.partial(unmerge_hidden_states, runtime),
                                                                with_kwargs=True))
        else:
            self._patch_heads(runtime, patcher)
        refuse_grad_checkpointing(patcher, self.model, "gradient_checkpointing_enable",
                                  "activation_checkpointing_enable")

    def _patch_heads(self, runtime, patcher) -> None:
        """Pooling heads over reduced tokens: size-aware."""
        if self.head is not None:  # SigLIP: log(size) in the attention-pooling head's logits
            patch_part(patcher, self.head.attention, runtime, "forward", _size_aware_mha_forward)
        if self.mean_head is not None:
            params = tuple(p for p in list(inspect.signature(type(self.model).forward).parameters)[1:]
                           if p not in ("kwargs", "args"))
            backbone = next(name for name in _INNER if getattr(self.model, name, None) is not None)
            start = self.num_prefix if self.mean_head else 0
            patch_part(patcher, self.model, runtime, "forward", _size_weighted_classifier_forward,
                       details=(params, backbone, self.mean_head, start))

    def grad_checkpointing(self) -> bool:
        # 4.x encoders checkpoint through layer.__call__ (the recomputed layer would see a finished
        # forward's token state); 5.x checkpoints the class's forward, which a patched layer bypasses.
        return self.tuple_outputs and _checkpointing(getattr(self.encoder, "encoder", None))

    def cost(self) -> ViTCost:
        enc, layout = self.encoder, self.layouts[0]
        emb = enc.embeddings
        conv = _first(getattr(emb, "patch_embeddings", None), "projection") or emb.patch_embedding
        attn_in, attn_out, mlp = layout.flops()
        final = per_token_flops(_first(enc, "layernorm", "post_layernorm"))
        fixed = per_token_flops(getattr(enc, "pooler", None))
        fixed += sum(per_token_flops(getattr(self.model, name, None)) for name in _TOKEN_HEADS)
        # SiglipForImageClassification runs the vision model's head but uses its own mean: a traced graph
        # (what count_flops measures) drops the unused head, so it is not counted here either.
        if self.head is not None and self.mean_head is None:  # SigLIP's head: keys and values per token, probes once
            mha = self.head.attention
            dim = mha.embed_dim
            queries = self.head.probe.shape[1]
            final += 2 * dim * dim + 2 * queries * dim
            fixed += queries * (2 * dim * dim + per_token_flops(self.head.layernorm) + per_token_flops(self.head.mlp))
        return ViTCost(depth=self.depth, dim=conv.out_channels,
                       num_heads=layout.heads, head_dim=layout.head_dim, per_patch=patch_flops(conv),
                       per_token_attn_in=attn_in, per_token_attn_out=attn_out, per_token_mlp=mlp,
                       per_token_final=final, fixed=fixed)


# --------------------------------------------------------------------------- patched forwards

_MASKS = ("attention_mask", "head_mask", "causal_attention_mask")


def _exporting() -> bool:
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _check_no_mask(given) -> None:
    if any(given.get(name) is not None for name in _MASKS):
        raise ValueError("a compressed transformers vision encoder cannot take an attention or head mask (token "
                         "reduction changes the token set the mask refers to)")


def _refuse_masks(names, module, args, kwargs):
    """Forward pre-hook of the encoder: no mask from the caller."""
    given = dict(zip(names, args))
    given.update(kwargs)
    _check_no_mask(given)


class _Layers:
    """What every patched layer of a model knows: the layouts, the names of the layer's arguments
    after ``hidden_states``, whether it returns a tuple (4.x), and a 4.x encoder (its checkpointing flag)."""

    def __init__(self, layouts, names, tuple_outputs: bool, encoder):
        self.layouts, self.names, self.tuple_outputs, self.encoder = layouts, names, tuple_outputs, encoder


def _checkpointing(encoder) -> bool:
    return bool(encoder is not None and getattr(encoder, "gradient_checkpointing", False) and encoder.training)


def _reducing_layer_forward(layer, hidden_states, *args, **kwargs):
    """An encoder layer's forward with token reduction, for the 5.x and the 4.x signatures."""
    part = part_of(layer)
    details = part.details
    layouts, names, tuple_outputs = details.layouts, details.names, details.tuple_outputs
    if part.layer == 0 and _checkpointing(details.encoder):  # 4.x runs the layers in a (reentrant) checkpoint
        raise RuntimeError("gradient checkpointing re-runs layers in backward without the token state of their "
                           "forward, which token reduction needs; turn it off (model.gradient_checkpointing_disable()) "
                           "while the model is compressed")
    given = dict(zip(names, args))
    given.update(kwargs)
    if not _exporting():
        _check_no_mask(given)
    output_attentions = given.get("output_attentions")
    layout = layouts[part.layer]
    if output_attentions is None:  # transformers 5.x passes it only when the caller does
        output_attentions = getattr(layout.config, "output_attentions", False)
    if output_attentions:
        raise ValueError("output_attentions=True is not available on a compressed vision encoder: its layers do "
                         "not materialise attention maps; call vitcompress.restore(model) first")
    out = reducing_forward(layout.parts(layer), part.runtime, part.layer, hidden_states)
    return (out,) if tuple_outputs else out


def _current_sizes(module, batch: int, tokens: int):
    """The token state of this thread's latest forward, checked against the tokens being pooled."""
    state = part_of(module).runtime.current().tokens
    if tuple(state.size.shape[:2]) != (batch, tokens):
        raise ValueError(f"pooling {(batch, tokens)} tokens with the sizes of the latest forward "
                         f"({tuple(state.size.shape[:2])}): on a compressed model run the pooling head right after "
                         "the encoder forward that produced its input")
    return state


def _size_aware_mha_forward(mha, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                            **kwargs):
    """The ``nn.MultiheadAttention`` of SigLIP's pooling head with ``log(size)`` added to its logits:
    a token standing for k patches weighs as the k patches would (proportional attention)."""
    if key_padding_mask is not None or attn_mask is not None:
        raise ValueError("the pooling head of a compressed SigLIP tower takes no masks")
    B, S = key.shape[:2] if mha.batch_first else (key.shape[1], key.shape[0])
    state = _current_sizes(mha, B, S)
    if state.merged:
        L = query.shape[1] if mha.batch_first else query.shape[0]
        attn_mask = state.size.log().to(query.dtype).reshape(B, 1, 1, S).expand(B, mha.num_heads, L, S)
        attn_mask = attn_mask.reshape(B * mha.num_heads, L, S)
    return type(mha).forward(mha, query, key, value, need_weights=need_weights, attn_mask=attn_mask, **kwargs)


def _size_weighted_classifier_forward(model, *args, **kwargs):
    """``Dinov2ForImageClassification`` (class token + mean of the patch tokens) and
    ``SiglipForImageClassification`` (mean of all tokens) with the mean weighted by token size."""
    from transformers.modeling_outputs import ImageClassifierOutput

    names, backbone, with_cls, start = part_of(model).details
    call = dict(zip(names, args))
    call.update(kwargs)
    labels = call.pop("labels", None)
    return_dict = call.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    call = {k: v for k, v in call.items() if v is not None}
    outputs = getattr(model, backbone)(return_dict=True, **call)
    tokens = outputs.last_hidden_state
    size = _current_sizes(model, tokens.shape[0], tokens.shape[1]).size[:, start:].to(tokens.dtype)
    mean = (tokens[:, start:] * size).sum(dim=1) / size.sum(dim=1)
    logits = model.classifier(torch.cat([tokens[:, 0], mean], dim=1) if with_cls else mean)
    loss = None if labels is None else _classification_loss(labels, logits, model.config)
    out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                attentions=outputs.attentions)
    return out if return_dict else out.to_tuple()


def _classification_loss(labels, logits, config):
    """transformers' image-classification loss (its ``problem_type`` rules), the same in 4.x and 5.x."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        if num_labels == 1:
            return nn.functional.mse_loss(logits.squeeze(), labels.squeeze())
        return nn.functional.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)
