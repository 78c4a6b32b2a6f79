"""``supported(model)``: which registered methods fit a model, and why the others do not.

It asks what ``compress`` would ask -- the model's adapter, the method's target, the family's option
defaults validated as ``compress`` validates them, and the method's default budget planned into a
schedule -- without patching anything, so the model is left exactly as it was. An option the user
must supply (one without a default, such as quota's ``scorer=``) does not decide whether a method
fits a model: the refusal that asks for it is not counted.
"""
from typing import Dict, Optional, Tuple, Union

import torch.nn as nn

from . import methods as _methods
from .adapters import find_adapter
from .api import option_defaults, split_options
from .engine.schedule import Budget, parse_budget
from .interfaces import CommonOptions


def supported(model: nn.Module) -> Dict[str, Union[bool, str]]:
    """Every registered method -> ``True`` when ``compress(model, method)`` (with the method's
    default budget, and the options it cannot do without) fits this model, else the reason it does
    not, as ``compress`` would word it.

    When no method fits because vitcompress does not handle the model at all, every method maps to
    that one reason (which names the supported families, or the submodule to pass instead)::

        >>> vitcompress.supported(timm.create_model("deit_small_patch16_224"))
        {'focus_detr': 'focus_detr reduces detr models; a timm.VisionTransformer takes: pitome, tome, zero_tprune',
         'pitome': True, 'quota': '...', 'tokencorr': '...', 'tome': True, 'zero_tprune': True}
    """
    names = _methods.names()
    try:
        adapter = find_adapter(model)
    except (TypeError, ValueError) as err:
        return {name: str(err) for name in names}
    out: Dict[str, Union[bool, str]] = {}
    for name in names:
        spec = _methods.get(name)
        if spec.target not in adapter.targets:
            continue
        try:
            options, common = _options(spec, adapter.variant)
        except (TypeError, ValueError) as err:
            out[name] = f"{name} refuses its default options for this {adapter.family} model: {err}"
            continue
        budget = parse_budget(spec)
        try:
            adapter.make_runtime(spec, options, budget, common)  # plans the default budget; patches nothing
        except (TypeError, ValueError) as err:
            out[name] = _budget_reason(adapter, spec, options, common, budget, err)
        else:
            out[name] = True
    fits = ", ".join(n for n, ok in out.items() if ok is True) or "none of the registered methods"
    for name in names:
        spec = _methods.get(name)
        if spec.target not in adapter.targets:
            out[name] = f"{name} reduces {spec.target} models; a {adapter.family} takes: {fits}"
    return {name: out[name] for name in names}


def _options(spec, variant) -> Tuple[Dict[str, object], Optional[CommonOptions]]:
    """The options ``compress`` resolves when none are given (defaults, then the family's), split as
    ``compress`` splits them and validated by the method; a refusal that names an option without a
    default (``scorer=``) asks the user for it, says nothing about the model, and is let through."""
    options, common = split_options(spec, dict(option_defaults(spec), **spec.family_defaults.get(variant, {})))
    try:
        spec.validate(options)
    except (TypeError, ValueError) as err:
        if not any(value is None and f"{option}=" in str(err) for option, value in options.items()):
            raise
    return options, common


def _budget_reason(adapter, spec, options, common, budget, err: Exception) -> str:
    """Why ``spec`` does not fit: the error, said to be its default budget's when keeping every
    token would have worked."""
    if budget.kind == "keep" and budget.value == 1.0:
        return str(err)
    try:
        adapter.make_runtime(spec, options, Budget("keep", 1.0), common)
    except (TypeError, ValueError):
        return str(err)
    return (f"{spec.name} fits this model but not with its default budget {budget.describe()}: {err}. "
            f"Give compress a budget this model allows (keep=, r= or flops=)")


__all__ = ["supported"]
