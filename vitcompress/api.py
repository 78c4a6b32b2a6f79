"""compress / restore / methods / stats: find the adapter, build the plan, patch."""
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from . import methods as _methods
from .adapters import find_adapter
from .schedule import Budget, Schedule, build_schedule, parse_budget, resolve_flops
from .tokens import TokenState

_ATTR = "_vitcompress"
COMMON_OPTIONS = ("prop_attn", "trace_source")


class Patcher:
    """Sets attributes on modules and remembers how to put every one of them back exactly."""

    def __init__(self):
        self._undo = []

    def set(self, obj, name: str, value) -> None:
        had = name in obj.__dict__
        self._undo.append((obj, name, had, obj.__dict__.get(name)))
        object.__setattr__(obj, name, value)

    def undo(self) -> None:
        for obj, name, had, old in reversed(self._undo):
            if had:
                object.__setattr__(obj, name, old)
            else:
                del obj.__dict__[name]
        self._undo.clear()


class Compression:
    """What ``compress`` attaches to a model: the configuration, and the state of the last forward."""

    def __init__(self, adapter, method, options: Dict[str, Any], budget: Budget):
        self.adapter = adapter
        self.method = method
        self.options = options
        self.prop_attn = options.pop("prop_attn")
        self.trace_source = options.pop("trace_source")
        self.requested = budget
        self.patcher = Patcher()
        self._schedules: Dict[int, Schedule] = {}
        if budget.kind == "flops":
            planned = resolve_flops(budget.value, adapter.cost(), method, options,
                                    adapter.num_patches, adapter.num_prefix)
            self._schedules[adapter.num_patches] = planned
            budget = Budget("keep", planned.keep)  # carries the budget to other input sizes
        self.budget = budget
        self.schedule = self.schedule_for(adapter.num_patches)  # fail at compress time, not mid-forward
        self.state: Optional[TokenState] = None
        self.tokens_seen: List[int] = []

    def schedule_for(self, num_patches: int) -> Schedule:
        """The schedule for inputs of ``num_patches`` patches. The budget is checked at the model's
        own size (at compress time); other sizes (``dynamic_img_size``, patch dropout in training)
        remove at most what each block can."""
        if num_patches not in self._schedules:
            self._schedules[num_patches] = build_schedule(
                self.method, self.options, self.budget.kind, self.budget.value, num_patches,
                self.adapter.num_prefix, self.adapter.depth, clamp=num_patches != self.adapter.num_patches)
        return self._schedules[num_patches]

    def begin(self, x) -> None:
        """Called by the first block of every forward: fresh token state, schedule for this size."""
        checkpointing = getattr(self.adapter, "grad_checkpointing", None)
        if checkpointing is not None and torch.is_grad_enabled() and checkpointing():
            raise RuntimeError("gradient checkpointing re-runs blocks in backward without the token state of "
                               "their forward, which token reduction needs; turn it off "
                               "(model.set_grad_checkpointing(False)) while the model is compressed")
        p = self.adapter.num_prefix
        self.schedule = self.schedule_for(int(x.shape[1]) - p)  # int: shapes are tensors while tracing
        self.state = TokenState.start(x, p, trace_source=self.trace_source)
        self.tokens_seen = []

    def stats(self) -> Dict[str, Any]:
        out = {
            "method": self.method.name,
            "family": self.adapter.family,
            "budget": self.requested.describe(),
            "options": dict(self.options, prop_attn=self.prop_attn, trace_source=self.trace_source),
            "schedule": list(self.schedule.remove),
            "planned_tokens_per_layer": list(self.schedule.tokens),
            "keep": self.schedule.keep,
            "tokens_per_layer": list(self.tokens_seen),
        }
        if self.state is not None and self.state.source is not None:
            out["source"] = self.state.source
        return out


def methods(target: Optional[str] = None) -> List[str]:
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
    accepted = getattr(adapter, "targets", ("vit",))
    if spec.target not in accepted:
        usable = ", ".join(n for t in accepted for n in _methods.names(t))
        raise TypeError(f"method {spec.name!r} reduces {spec.target} models; a {adapter.family} takes: {usable}")
    opts = _resolve_options(spec, options, getattr(adapter, "variant", None))
    budget = parse_budget(spec, keep=keep, r=r, flops=flops)
    # A family whose reduction is not the ViT block schedule (a DETR encoder, a VLM's visual
    # tokens) builds its own runtime; it has the same patcher / stats() interface.
    make_runtime = getattr(adapter, "make_runtime", None)
    runtime = make_runtime(spec, opts, budget) if make_runtime else Compression(adapter, spec, opts, budget)
    _release(model)
    adapter.patch(runtime, runtime.patcher)
    runtime.patcher.set(model, _ATTR, runtime)
    return model


def _release(model: nn.Module) -> None:
    """Compressing replaces, never stacks: undo earlier compressions of ``model`` and of modules
    inside it (a CLIP's image tower); refuse when a model containing it patched it."""
    for module in model.modules():
        if _ATTR in module.__dict__:
            restore(module)
    for name, module in model.named_modules():
        if "_vitcompress_runtime" in module.__dict__:
            raise ValueError(f"{name or 'this model'} is already compressed through a model that contains it "
                             "(e.g. the whole CLIP or LLaVA); call vitcompress.restore on that model first")


def restore(model: nn.Module) -> nn.Module:
    """Undo ``compress``: the model computes exactly what it computed before."""
    runtime = getattr(model, _ATTR, None)
    if runtime is None:
        raise ValueError("restore(model): this model is not compressed by vitcompress")
    runtime.patcher.undo()
    return model


def stats(model: nn.Module) -> Dict[str, Any]:
    """Method, schedule and the tokens that entered each block in the last forward."""
    runtime = getattr(model, _ATTR, None)
    if runtime is None:
        raise ValueError("stats(model): this model is not compressed; call vitcompress.compress first")
    return runtime.stats()
