"""compress / restore / list_methods / stats: find the adapter, build the runtime, patch."""
import numbers
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from . import methods as _methods
from .adapters import find_adapter
from .engine.schedule import parse_budget
from .interfaces import PART_ATTR, RUNTIME_ATTR, CommonOptions, runtime_of

#: The options of every ViT method besides its own (the fields of :class:`CommonOptions`).
COMMON_OPTION_HELP = {
    "prop_attn": "proportional attention: log(size) added to the attention logits (default on for merging methods)",
    "trace_source": "track which original patches each token covers (stats(model)['source'])",
    "unmerge": "dense outputs: final tokens, intermediates and hidden states back on the full patch grid (a merged "
               "token's value on each of its patches, a pruned patch its value when pruned)",
}


def list_methods(target: Optional[str] = None) -> List[str]:
    """Names of the registered token-reduction methods; ``target="vit"`` lists those for ViT-like
    encoders (timm, CLIP towers), ``"detr"`` detection encoders, ``"llava"`` visual tokens of a VLM."""
    return _methods.names(target)


def option_defaults(method) -> Dict[str, Any]:
    """Every option ``compress`` accepts for ``method``, with its default: the method's own, then
    (for a ViT method) the common ones."""
    defaults = dict(method.defaults)
    if method.target == "vit":
        # a method may set its own proportional-attention default (EViT's official code has none)
        defaults.update(prop_attn=defaults.get("prop_attn", method.kind == "merge"), trace_source=False,
                        unmerge=False)
    return defaults


def fitting_methods(adapter) -> List[str]:
    """The registered methods ``compress`` takes for the adapter's model with their default options
    and budget (a family may refuse some methods of a target it accepts: InternVL and Qwen-VL take
    no LLaVA method that reads the projected features)."""
    out = []
    for name in _methods.names():
        spec = _methods.get(name)
        if spec.target not in adapter.targets:
            continue
        own, common = split_options(spec, dict(option_defaults(spec), **spec.family_defaults.get(adapter.variant, {})))
        try:
            adapter.make_runtime(spec, own, parse_budget(spec), common)  # plans; patches nothing
        except (TypeError, ValueError):
            continue
        out.append(name)
    return out


def split_options(method, options: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[CommonOptions]]:
    """Every option of ``method`` (as :func:`option_defaults` lists them) -> the method's own and the
    :class:`CommonOptions` its runtime reads (None for a method of another target: it takes none)."""
    own = {k: v for k, v in options.items() if k not in COMMON_OPTION_HELP}
    if method.target != "vit":
        return own, None
    return own, CommonOptions(**{k: options[k] for k in COMMON_OPTION_HELP})


def _option_help(method) -> Dict[str, str]:
    return dict(method.option_help, **(COMMON_OPTION_HELP if method.target == "vit" else {}))


def _checked_type(method, name: str, value, default):
    """``value`` with numpy scalars made Python numbers, refused when the default's type (bool,
    int, float, str) says it cannot be right; None-defaulted options are the method's to check."""
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float)) and hasattr(value, "item"):
        value = value.item()  # numpy / torch scalars
    expected = None
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "True or False"
    elif isinstance(default, int):
        ok, expected = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an int"
    elif isinstance(default, float):
        ok, expected = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, expected = isinstance(value, str), "a string"
    else:
        return value
    if not ok:
        raise TypeError(f"{method.name} {name}={value!r} must be {expected} (default {default!r}: "
                        f"{_option_help(method).get(name, name)})")
    return int(value) if isinstance(default, int) and not isinstance(default, bool) else value


def resolve_options(method, options: Dict[str, Any],
                    variant: Optional[str] = None) -> Tuple[Dict[str, Any], Optional[CommonOptions]]:
    """The options ``compress`` gives ``method`` on a model of family ``variant``: the defaults, the
    family's, then ``options`` -- each checked (``TypeError`` / ``ValueError`` naming the fix) --
    split into the method's own and the common ones (:func:`split_options`)."""
    defaults = option_defaults(method)
    if "unmerge" in options and method.target != "vit":
        raise TypeError(f"unmerge puts a ViT encoder's tokens back on the patch grid; {method.name} reduces "
                        f"{method.target} models, which have no dense output to unmerge: drop unmerge=, or use a "
                        f"ViT method ({', '.join(_methods.names('vit'))}) on a ViT-like model")
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"{method.name} has no option {', '.join(unknown)}; its options are: "
                        f"{', '.join(sorted(defaults)) or 'none'} (vitcompress.describe({method.name!r}) explains them)")
    resolved = dict(defaults)
    resolved.update(method.family_defaults.get(variant, {}))  # e.g. PiToMe's margin for CLIP
    resolved.update({k: _checked_type(method, k, v, defaults[k]) for k, v in options.items()})
    own, common = split_options(method, resolved)
    method.validate(own)
    return own, common


def describe(method: str) -> Dict[str, Any]:
    """What ``method`` is and every option ``compress`` accepts for it: default, type and meaning,
    and the budget used when none is given."""
    spec = _methods.get(method)
    help_text = _option_help(spec)
    return {
        "name": spec.name,
        "target": spec.target,
        "kind": spec.kind,
        "dynamic": spec.dynamic,
        "default_budget": dict(spec.default_budget),
        "keep_means": spec.keep_means,
        "family_defaults": {k: dict(v) for k, v in spec.family_defaults.items()},
        "options": {name: {"default": default, "type": type(default).__name__ if default is not None else "see help",
                           "help": help_text.get(name, "")}
                    for name, default in option_defaults(spec).items()},
    }


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
        usable = ", ".join(fitting_methods(adapter))
        raise TypeError(f"method {spec.name!r} reduces {spec.target} models; a {adapter.family} takes: {usable}")
    own, common = resolve_options(spec, options, adapter.variant)
    budget = parse_budget(spec, keep=keep, r=r, flops=flops)
    runtime = adapter.make_runtime(spec, own, budget, common)
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
        inside = next((m for m in model.modules() if PART_ATTR in m.__dict__), None) if isinstance(model, nn.Module) else None
        if inside is not None:
            outer = type(inside.__dict__[PART_ATTR].runtime.adapter.model).__name__
            raise ValueError(f"restore(model): this {type(model).__name__} is part of a compressed {outer}; "
                             f"call vitcompress.restore on that {outer} (the model you passed to compress)")
        raise ValueError("restore(model): this model is not compressed by vitcompress")
    runtime.patcher.undo()
    return model


def stats(model: nn.Module) -> Dict[str, Any]:
    """Method, schedule, and what the calling thread's last forward did (tokens per block, sizes)."""
    runtime = runtime_of(model)
    if runtime is None:
        raise ValueError("stats(model): this model is not compressed; call vitcompress.compress first")
    return runtime.stats()
