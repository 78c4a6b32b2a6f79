"""compress / restore / list_methods / stats: find the adapter, build the runtime, patch."""
from typing import Any, Dict, List, Optional

import torch.nn as nn

from . import methods as _methods
from .adapters import find_adapter
from .interfaces import PART_ATTR, RUNTIME_ATTR, runtime_of
from .schedule import parse_budget

COMMON_OPTIONS = ("prop_attn", "trace_source")


def list_methods(target: Optional[str] = None) -> List[str]:
    """Names of the registered token-reduction methods; ``target="vit"`` lists those for ViT-like
    encoders (timm, CLIP towers), ``"detr"`` detection encoders, ``"llava"`` visual tokens of a VLM."""
    return _methods.names(target)


def _resolve_options(method, options: Dict[str, Any], variant: Optional[str] = None) -> Dict[str, Any]:
    common = COMMON_OPTIONS if method.target == "vit" else ()
    allowed = set(method.defaults) | set(common)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"{method.name} has no option {', '.join(unknown)}; its options are: "
                        f"{', '.join(sorted(allowed)) or 'none'}")
    resolved = dict(method.defaults)
    resolved.update(method.family_defaults.get(variant, {}))  # e.g. PiToMe's margin for CLIP
    if common:
        resolved.update(prop_attn=method.kind == "merge", trace_source=False)
    resolved.update(options)
    method.validate(resolved)
    return resolved


def compress(model: nn.Module, method: str, *, keep: Optional[float] = None, r=None,
             flops: Optional[float] = None, **options) -> nn.Module:
    """Insert token reduction into ``model`` in place and return it.

    Give at most one budget: ``keep`` (fraction of tokens kept per reducing block), ``r`` (tokens
    removed per block: int, per-block list or ``(r, inflection)``) or ``flops`` (target fraction of
    the uncompressed FLOPs at the model's input size). None gives the method's default. Method
    options (e.g. ``margin=`` for pitome) and ``prop_attn`` / ``trace_source`` go in ``options``.
    Compressing an already compressed model replaces the previous configuration.
    """
    spec = _methods.get(method)
    adapter = find_adapter(model)
    accepted = adapter.targets
    if spec.target not in accepted:
        usable = ", ".join(n for t in accepted for n in _methods.names(t))
        raise TypeError(f"method {spec.name!r} reduces {spec.target} models; a {adapter.family} takes: {usable}")
    opts = _resolve_options(spec, options, adapter.variant)
    budget = parse_budget(spec, keep=keep, r=r, flops=flops)
    runtime = adapter.make_runtime(spec, opts, budget)
    _release(model)
    adapter.patch(runtime, runtime.patcher)
    runtime.patcher.set(model, RUNTIME_ATTR, runtime)
    return model


def _release(model: nn.Module) -> None:
    """Compressing replaces, never stacks: undo earlier compressions of ``model`` and of modules
    inside it (a CLIP's image tower); refuse when a model containing it patched it."""
    for module in model.modules():
        if runtime_of(module) is not None:
            restore(module)
    for name, module in model.named_modules():
        if PART_ATTR in module.__dict__:
            raise ValueError(f"{name or 'this model'} is already compressed through a model that contains it "
                             "(e.g. the whole CLIP or LLaVA); call vitcompress.restore on that model first")


def restore(model: nn.Module) -> nn.Module:
    """Undo ``compress``: the model computes exactly what it computed before."""
    runtime = runtime_of(model)
    if runtime is None:
        raise ValueError("restore(model): this model is not compressed by vitcompress")
    runtime.patcher.undo()
    return model


def stats(model: nn.Module) -> Dict[str, Any]:
    """Method, schedule, and what the calling thread's last forward did (tokens per block, sizes)."""
    runtime = runtime_of(model)
    if runtime is None:
        raise ValueError("stats(model): this model is not compressed; call vitcompress.compress first")
    return runtime.stats()
