"""What ``compress`` attaches to a ViT-like model: the runtime that holds the configuration.

Configuration on the model, state per call: a runtime keeps the method, its options and the
schedules, which never change during a forward. The token state of one forward (sizes, sources,
token counts) is made by that forward and kept per thread, so several threads can run one
compressed model at once, and ``stats()`` / size-aware pooling read the calling thread's own last
forward.
"""
import dataclasses
import warnings
from typing import Any, Dict, List, Optional

import torch

from ..engine.blocks import ForwardState
from ..engine.patching import Patcher, PerThread
from ..engine.schedule import Budget, Schedule, build_schedule, resolve_flops
from ..engine.tokens import TokenState
from ..interfaces import CommonOptions, Method


def _tokens_after_each_block(schedule: Schedule) -> List[int]:
    """Reducible tokens left after each block."""
    p = schedule.num_prefix
    return [t - p for t in schedule.tokens[1:]] + [schedule.final_tokens - p]


class ViTRuntime:
    """A ViT-like model's compression: adapter, method, its options, the common options, budget and
    the schedules per input size; each forward's :class:`ForwardState` is kept per thread."""

    def __init__(self, adapter, method: Method, options: Dict[str, Any], budget: Budget, common: CommonOptions):
        self.adapter = adapter
        self.method = method
        self.options = options
        self.prop_attn = common.prop_attn
        self.trace_source = common.trace_source
        self.unmerge = common.unmerge
        if self.unmerge and method.dynamic:
            raise ValueError(f"unmerge=True needs a static schedule; {method.name}'s token counts depend on the "
                             "content: use a static ViT method (vitcompress.list_methods('vit'))")
        if adapter.needs_unmerge and not self.unmerge:
            raise ValueError(adapter.needs_unmerge)
        self.requested = budget
        self.patcher = Patcher()
        method.check_model(adapter.num_prefix, adapter.cls_first)
        self.plan(adapter.num_patches)  # fail at compress time, not mid-forward
        self._forward = PerThread()
        self._unmerge_request = PerThread()

    def plan(self, num_patches: int) -> None:
        """Plan the requested budget at the model's own input size, ``num_patches`` patches (at compress,
        and again when timm's ``set_input_size`` changes it): a flops budget resolved to a schedule, r
        and keep checked. Nothing changes when the budget does not fit that size."""
        budget = self.requested
        if budget.kind == "flops":
            schedule = resolve_flops(budget.value, self.cost(num_patches), self.method, self.options,
                                     num_patches, self.adapter.num_prefix)
            budget = Budget("keep", schedule.keep)  # carries the budget to other input sizes
        else:
            schedule = build_schedule(self.method, self.options, budget.kind, budget.value, num_patches,
                                      self.adapter.num_prefix, self.adapter.depth,
                                      clamp=self.method.clamps(self.options))
        self.num_patches, self.budget, self.schedule = num_patches, budget, schedule
        self._schedules: Dict[int, Schedule] = {num_patches: schedule}

    def cost(self, num_patches: int):
        """The FLOPs model a flops= budget is planned with, at ``num_patches`` patches: the adapter's, and
        under unmerge the final norm (and a pooling head) on every patch again (the gathers themselves
        are no multiply-adds)."""
        cost = self.adapter.cost()
        if not self.unmerge:
            return cost
        full = num_patches + self.adapter.num_prefix
        return dataclasses.replace(cost, fixed=cost.fixed + full * cost.per_token_final, per_token_final=0)

    def schedule_for(self, num_patches: int) -> Schedule:
        """The schedule for inputs of ``num_patches`` patches. The budget is checked at the model's
        own size (:meth:`plan`); other sizes (``dynamic_img_size``, patch dropout in training)
        remove at most what each block can."""
        if num_patches not in self._schedules:
            schedule = build_schedule(
                self.method, self.options, self.budget.kind, self.budget.value, num_patches,
                self.adapter.num_prefix, self.adapter.depth, clamp=True)
            self._warn_if_collapsed(schedule, num_patches)
            self._schedules[num_patches] = schedule
        return self._schedules[num_patches]

    def _warn_if_collapsed(self, schedule: Schedule, num_patches: int) -> None:
        """Warn (once per input size: schedules are cached) when this size leaves a block with
        fewer than 8 tokens or under a quarter of what the checked schedule keeps there, scaled
        to this size."""
        checked = _tokens_after_each_block(self.schedule)
        left = _tokens_after_each_block(schedule)
        scale = num_patches / self.num_patches
        short = [i for i, (n, c) in enumerate(zip(left, checked)) if n < 8 or n < scale * c / 4]
        if short:
            block = short[0]
            warnings.warn(f"vitcompress: at {num_patches} patches the {self.requested.describe()} budget leaves "
                          f"{left[block]} tokens after block {block} ({checked[block]} at the model's "
                          f"{self.num_patches} patches); use a keep= or flops= budget, which scales with "
                          "the input size, or a smaller r", RuntimeWarning, stacklevel=2)

    def begin(self, x: torch.Tensor) -> ForwardState:
        """Called by the first block of every forward: a fresh state for this forward, this thread's
        latest from now on."""
        checkpointing = getattr(self.adapter, "grad_checkpointing", None)
        if checkpointing is not None and torch.is_grad_enabled() and checkpointing():
            raise RuntimeError("gradient checkpointing re-runs blocks in backward without the token state of "
                               "their forward, which token reduction needs; turn it off "
                               "(model.set_grad_checkpointing(False)) while the model is compressed")
        p = self.adapter.num_prefix
        schedule = self.schedule_for(int(x.shape[1]) - p)  # int: shapes are tensors while tracing
        tokens = TokenState.start(x, p, trace_source=self.trace_source,
                                  track_position=getattr(self.adapter, "track_position", False), unmerge=self.unmerge)
        state = ForwardState(tokens, schedule)
        if self.unmerge:
            requested = self._unmerge_request.get()
            self._unmerge_request.set(None)
            state.unmerge_after = frozenset(requested or ()) | {schedule.depth - 1}
        self._forward.set(state)
        return state

    def unmerge_after(self, layers) -> None:
        """Under unmerge: the blocks (besides the last) whose outputs this thread's next forward puts
        back on the full grid, because the caller reads them (intermediates, hidden states)."""
        self._unmerge_request.set(frozenset(int(i) for i in layers))

    def current(self) -> ForwardState:
        """The state of this thread's forward in progress (or its last one)."""
        state = self._forward.get()
        if state is None:
            raise RuntimeError("this compressed model has not run a forward in this thread yet: the blocks "
                               "start each forward's token state (call the model, or forward_features first)")
        return state

    def last_forward(self) -> Optional[ForwardState]:
        """This thread's last forward, or None before the first."""
        return self._forward.get()

    def set_last_forward(self, state: Optional[ForwardState]) -> None:
        """Put back a state :meth:`last_forward` gave (after a capture that ran on fake tensors)."""
        self._forward.set(state)

    def stats(self) -> Dict[str, Any]:
        last = self.last_forward()
        schedule = self.schedule if last is None else last.schedule
        out = {
            "method": self.method.name,
            "family": self.adapter.family,
            "budget": self.requested.describe(),
            "options": dict(self.options, prop_attn=self.prop_attn, trace_source=self.trace_source,
                            unmerge=self.unmerge),
            "schedule": list(schedule.remove),
            "planned_tokens_per_layer": list(schedule.tokens),
            "keep": schedule.keep,
            "tokens_per_layer": [] if last is None else list(last.tokens_seen),
        }
        if last is not None:
            out["size"] = last.tokens.size
            if last.tokens.source is not None:
                out["source"] = last.tokens.source
        return out
