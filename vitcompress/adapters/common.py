"""What the adapters share, in the one module they share it through: the ViT adapter base,
the family check by class name, patching blocks, FLOPs per token of a module (as fvcore counts
them), binding patched methods, the attention implementations transformers models may use, and the
pieces of the timm adapters (their base, size-weighted and MAP pooling)."""
import functools
import inspect
import math
import sys
from typing import Any, Callable, Collection, Iterable, Optional, Tuple

import torch
import torch.nn as nn
from torch.fx import Proxy

from ..interfaces import PART_ATTR, PatchedPart, part_of, runtime_of
from ..runtimes.vit import ViTRuntime
from ..runtimes.vlm import compressed_generate, prefill_hook

#: transformers' attention implementations that compute plain softmax attention (what the reducing
#: block runs); a model loaded with another is refused.
MAPPABLE_ATTENTION = (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def family_class(model, classes: Collection[str]) -> Optional[str]:
    """The first of ``model``'s class and its bases named in ``classes`` (``"module.QualName"``), or
    None. By name: an adapter's ``matches`` imports nothing, so a model of another family never loads
    (or trips over) this family's library."""
    for cls in type(model).__mro__:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in classes:
            return name
    return None


class ViTAdapter:
    """Base of the adapters of ViT-like encoders (timm, open_clip and transformers towers): they
    take ViT methods, run under a :class:`~vitcompress.runtimes.vit.ViTRuntime` and set
    ``num_prefix``, ``num_patches``, ``depth`` and ``cost()``."""

    family = ""
    description = ""
    targets = ("vit",)
    variant: Optional[str] = None
    cls_first = True  # the first special token is a class token
    # Why this model only works with unmerge=True (it reads every patch: a backbone's feature maps), or None.
    needs_unmerge: Optional[str] = None

    def make_runtime(self, method, options, budget, common) -> ViTRuntime:
        return ViTRuntime(self, method, options, budget, common)

    def grad_checkpointing(self) -> bool:
        return False


def patch_part(patcher, module: nn.Module, runtime, name: str, fn: Callable, layer: int = -1,
               details: Any = None) -> None:
    """Replace ``module.<name>`` by ``fn`` bound to it, and tell the module its part in ``runtime``
    (read back with :func:`vitcompress.interfaces.part_of`)."""
    patcher.set(module, PART_ATTR, PatchedPart(runtime, layer, details))
    patcher.set(module, name, bind(fn, module))


def require_block_types(blocks: Iterable[nn.Module], block_type: type, attention_type: type, family: str,
                        supported: str) -> None:
    """Refuse a model whose blocks are not exactly ``block_type`` with ``attention_type``: an adapter
    re-implements those forwards, so a subclass or another attention would be silently replaced. A
    block of another kind may have no ``attn`` at all (timm's ``ParallelScalingBlock``)."""
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if type(block) is not block_type or type(attn) is not attention_type:
            what = type(block).__name__ + ("" if attn is None else f" with {type(attn).__name__}")
            raise TypeError(f"block {i} of this {family} is a {what}; {supported}")


def patch_blocks(patcher, blocks: Iterable[nn.Module], runtime, forward: Callable, details: Any = None) -> None:
    """Give every block its reducing ``forward``, bound to it with its index. Module-level functions
    bound with :func:`bind` and plain attributes only, so ``copy.deepcopy`` and pickle /
    ``torch.save`` of a compressed model carry the patch over to the copy."""
    for layer, block in enumerate(blocks):
        patch_part(patcher, block, runtime, "forward", forward, layer, details)


def per_token_flops(module) -> int:
    """Multiply-adds a module spends per token: in*out for every Linear, 5 (affine) or 4 per
    element for every LayerNorm, the rest (activations, scaling) uncounted, as in fvcore."""
    if module is None:
        return 0
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, nn.LayerNorm):
            total += (5 if m.elementwise_affine else 4) * math.prod(m.normalized_shape)
    return total


def patch_flops(conv) -> int:
    """Multiply-adds of a patch-embedding convolution per output position (per patch)."""
    return conv.out_channels * conv.in_channels * math.prod(conv.kernel_size) // conv.groups


def identity(y):
    """A no-op branch (a block without layer scale or drop-path); module-level, so it pickles."""
    return y


class PatchedMethod(functools.partial):
    """A module-level function bound to a module, set as an instance attribute (a patched
    ``forward``). A ``functools.partial`` rather than ``types.MethodType``: both survive
    ``copy.deepcopy`` (the copy is bound to the copied module), but only the partial survives
    ``pickle`` / ``torch.save`` -- a bound method is unpickled by looking its name up on the class,
    which does not have it."""

    def __call__(self, *args, **kwargs):
        """torch.fx symbolic tracing passes Proxies: refused here, before the patched method reads
        them (a Proxy mask is not None, a Proxy shape is no int). torch.compile and torch.export
        pass tensors."""
        if any(isinstance(value, Proxy) for value in (*args, *kwargs.values())):
            raise RuntimeError("torch.fx symbolic tracing cannot trace a model compressed by vitcompress (the tokens "
                               "its blocks keep depend on values a symbolic trace does not have); use torch.compile, "
                               "torch.jit.trace, vitcompress.export_program (torch.export) or vitcompress.export_onnx "
                               "instead, and for features forward_intermediates(x, output_fmt='NLC') or "
                               "output_hidden_states=True")
        return super().__call__(*args, **kwargs)

    @property
    def __globals__(self):
        """A partial has none (AttributeError, which torch.export and others expect); TorchScript
        reads it first when scripting, so there the error says what to use instead."""
        if sys._getframe(1).f_globals.get("__name__", "").startswith(("torch.jit", "torch._jit_internal")):
            raise RuntimeError("torch.jit.script cannot compile a model compressed by vitcompress (its blocks run "
                               "Python that TorchScript does not support); use torch.compile, torch.jit.trace, "
                               "vitcompress.export_program (torch.export) or vitcompress.export_onnx instead")
        raise AttributeError("__globals__")


def bind(fn, module) -> PatchedMethod:
    """``fn`` bound to ``module`` (see :class:`PatchedMethod`)."""
    return PatchedMethod(fn, module)


def patch_vlm_prefill(model: nn.Module, patcher) -> None:
    """What every VLM adapter patches on the model: the prefill hook (prepended, so it sees the call
    as the caller made it) and the compressed ``generate``. Public hook handles and module-level
    functions (:func:`bind`): deepcopy / pickle of a compressed model carry them to the copy, and
    restore removes exactly these, leaving every hook the user registered."""
    patcher.hook(model.register_forward_pre_hook(prefill_hook, with_kwargs=True, prepend=True))
    patcher.set(model, "generate", bind(compressed_generate, model))


def refuse_grad_checkpointing(patcher, module: nn.Module, *switches: str) -> None:
    """Make the switches of ``module`` that turn gradient checkpointing on (timm's and open_clip's
    ``set_grad_checkpointing``, transformers' ``gradient_checkpointing_enable``) refuse at the call,
    not at the next forward; turning it off still works. Switches the module lacks are left out."""
    for name in switches:
        if hasattr(module, name):
            patcher.set(module, name, PatchedMethod(_checkpointing_switch, module, name))


def _checkpointing_switch(module, name: str, *args, **kwargs):
    """``module.<name>`` while compressed: the class's own switch when it turns checkpointing off
    (``enable=False``); a refusal when it turns it on (or has no ``enable``: it only turns it on)."""
    original = getattr(type(module), name)
    call = inspect.signature(original).bind(module, *args, **kwargs)
    call.apply_defaults()
    if call.arguments.get("enable", True):
        raise RuntimeError("gradient checkpointing re-runs blocks in backward without the token state of their "
                           "forward, which token reduction needs; call vitcompress.restore(model) before turning "
                           "it on, or compress the model after training")
    return original(*call.args, **call.kwargs)


def plan_again_after_resize(patcher, model: nn.Module) -> None:
    """timm's ``set_input_size`` changes the model's input size, which ``compress`` planned the budget
    at (a flops budget's schedule, r checked against the tokens): resizing plans it again at the new
    size, as compressing the resized model would."""
    if hasattr(model, "set_input_size"):  # older timm releases have none
        patcher.set(model, "set_input_size", bind(_resize_and_plan_again, model))


def _resize_and_plan_again(model, *args, **kwargs) -> None:
    """``set_input_size`` of a compressed timm model: timm's own, then the budget planned at the new size
    (a budget that size cannot take is refused, the model left resized and restored)."""
    type(model).set_input_size(model, *args, **kwargs)
    runtime = runtime_of(model)
    try:
        runtime.plan(model.patch_embed.num_patches)
    except (TypeError, ValueError) as err:
        runtime.patcher.undo()
        raise type(err)(f"{err} (set_input_size left the model resized and uncompressed: compress it again "
                        "with a budget this size can take)") from err


def token_intermediates(model, runtime, *args, **kwargs):
    """``forward_intermediates`` of a compressed timm ViT or open_clip tower. Under unmerge the blocks
    it takes put their outputs back on the patch grid (any ``output_fmt``); otherwise reduced tokens
    have no patch grid, so only ``output_fmt="NLC"`` is possible."""
    original = type(model).forward_intermediates
    call = inspect.signature(original).bind(model, *args, **kwargs)
    call.apply_defaults()
    if runtime.unmerge:
        runtime.unmerge_after(taken_indices(call.arguments.get("indices"), runtime.adapter.depth))
    elif call.arguments.get("output_fmt") != "NLC":
        raise ValueError("forward_intermediates on a compressed model needs output_fmt='NLC' (timm's "
                         "get_intermediate_layers: reshape=False; a whole open_clip CLIP: image_output_fmt='NLC'): "
                         "the reduced tokens no longer form the patch grid NCHW would reshape them to; compress "
                         "with unmerge=True for outputs on the patch grid")
    return original(*call.args, **call.kwargs)


def taken_indices(indices, depth: int) -> Tuple[int, ...]:
    """The blocks whose outputs ``forward_intermediates(indices=...)`` takes (timm's rule: None all,
    an int the last n, a list the blocks named, negative from the end)."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        return tuple(range(depth - indices, depth))
    return tuple(i % depth for i in indices)


def unmerge_hidden_states(runtime, module, args, kwargs):
    """Forward pre-hook of a transformers encoder under unmerge: with hidden states asked for (by the caller or
    the config) every layer's output goes back on the grid; else a backbone's, those of its feature maps
    (``stage_names[i]`` is the output of layer ``i - 1``); the last layer's always."""
    asked = kwargs.get("output_hidden_states")
    if asked is None:
        asked = getattr(getattr(module, "config", None), "output_hidden_states", False)
    if asked:
        layers = range(runtime.adapter.depth)
    else:
        layers = [module.stage_names.index(name) - 1 for name in getattr(module, "out_features", ())]
    runtime.unmerge_after(layer for layer in layers if layer >= 0)


# --------------------------------------------------------------------------- timm


class TimmAdapter(ViTAdapter):
    """Base of the timm adapters (``VisionTransformer``, ``Eva``, ``Beit``): the model class by name,
    every block exactly of :meth:`block_types`, the special tokens, patches and depth as timm keeps
    them."""

    model_class = ""  # "module.Name" of the timm model class (its subclasses match too)
    supported_blocks = ""  # what the refusal of another block says is supported

    @classmethod
    def matches(cls, model) -> bool:
        return family_class(model, (cls.model_class,)) is not None

    @staticmethod
    def block_types() -> Tuple[type, type]:
        """The block and attention classes the adapter's forwards re-implement (imported from timm)."""
        raise NotImplementedError

    def __init__(self, model):
        block, attention = self.block_types()
        self.model = model
        require_block_types(model.blocks, block, attention, self.model_class.rpartition(".")[2],
                            self.supported_blocks)
        self.num_prefix = model.num_prefix_tokens
        self.cls_first = getattr(model, "cls_token", None) is not None  # else the prefix is registers only
        self.num_patches = model.patch_embed.num_patches
        self.depth = len(model.blocks)

    def grad_checkpointing(self) -> bool:
        return bool(getattr(self.model, "grad_checkpointing", False))

    def patch_model_methods(self, runtime, patcher) -> None:
        """What every timm model gets besides its blocks: intermediates as token lists, gradient
        checkpointing refused by its switch, the budget planned again after ``set_input_size``."""
        m = self.model
        if hasattr(m, "forward_intermediates"):
            patcher.set(m, "forward_intermediates", PatchedMethod(token_intermediates, m, runtime))
        refuse_grad_checkpointing(patcher, m, "set_grad_checkpointing")
        plan_again_after_resize(patcher, m)


def refuse_attn_mask(attn_mask, is_causal: bool) -> None:
    """A reducing timm block refuses the mask arguments of timm's: they refer to the full token set."""
    if attn_mask is not None or is_causal:
        raise ValueError("a compressed model cannot take attn_mask/is_causal (token reduction changes "
                         "the token set the mask refers to)")


#: timm's pool types that average tokens, weighted by size on a compressed model
WEIGHTED_POOLS = ("avg", "avgmax", "max")


def latest_sizes(module, x: torch.Tensor) -> torch.Tensor:
    """The sizes of this thread's latest forward, checked to describe ``x``."""
    size = part_of(module).runtime.current().tokens.size
    if size.shape[:2] != x.shape[:2]:
        raise ValueError(f"pooling {tuple(x.shape[:2])} tokens with the sizes of the latest forward "
                         f"({tuple(size.shape[:2])}): on a compressed model call forward_head right after the "
                         "forward_features that produced its input")
    return size


def weighted_pool(x: torch.Tensor, size: torch.Tensor, pool_type: str) -> torch.Tensor:
    """timm's ``global_pool_nlc`` over reduced tokens ``x[B, N, C]``, the mean weighted by ``size``."""
    size = size.to(x.dtype)
    mean = (x * size).sum(dim=1) / size.sum(dim=1)
    if pool_type == "avg":
        return mean
    if pool_type == "max":
        return x.amax(dim=1)
    return 0.5 * (x.amax(dim=1) + mean)


def size_weighted_pool(model, x: torch.Tensor, pool_type=None) -> torch.Tensor:
    """timm's ``pool`` (``VisionTransformer``, ``Eva``) over reduced tokens: the average pools weighted
    by how many patches each token stands for; a MAP pool (patched on its own) and the other pool
    types are timm's."""
    pool_type = model.global_pool if pool_type is None else pool_type
    if getattr(model, "attn_pool", None) is not None or pool_type not in WEIGHTED_POOLS:
        return type(model).pool(model, x, pool_type)
    start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
    return weighted_pool(x[:, start:], latest_sizes(model, x)[:, start:], pool_type)


def size_aware_attn_pool_forward(pool, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """timm's ``AttentionPoolLatent`` over reduced tokens: ``log(size)`` added to its attention logits
    (the sizes of this thread's latest forward, the special tokens left out when the pool leaves them out)."""
    if attn_mask is not None:
        raise ValueError("the attention pool of a compressed model takes no attn_mask")
    state = part_of(pool).runtime.current().tokens
    B, N = x.shape[:2]
    size = state.size
    if size.shape[0] == B and size.shape[1] == N + state.num_prefix:  # pool_include_prefix=False
        size = size[:, state.num_prefix:]
    if tuple(size.shape[:2]) != (B, N):
        raise ValueError(f"pooling {(B, N)} tokens with the sizes of the latest forward "
                         f"({tuple(state.size.shape[:2])}): on a compressed model call forward_head right after the "
                         "forward_features that produced its input")
    bias = size.log().to(x.dtype).transpose(1, 2).unsqueeze(1) if state.merged else None  # [B, 1, 1, N]
    return type(pool).forward(pool, x, attn_mask=bias)


def attn_pool_cost(pool) -> Tuple[int, int]:
    """(per pooled token, once) multiply-adds of timm's ``AttentionPoolLatent``: keys and values per
    pooled token, the latent queries once."""
    queries, width = pool.latent_len, pool.num_heads * pool.head_dim
    per_token = per_token_flops(pool.kv) + pool.num_heads * per_token_flops(pool.k_norm) + 2 * queries * width
    once = queries * (per_token_flops(pool.q) + pool.num_heads * per_token_flops(pool.q_norm)
                      + per_token_flops(pool.proj) + per_token_flops(pool.norm) + per_token_flops(pool.mlp))
    return per_token, once
