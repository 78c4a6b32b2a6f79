"""Budgets -> tokens per layer.

A budget is exactly one of: ``keep`` (fraction of the reducible tokens kept by every reducing
block), ``r`` (tokens removed per block: an int, a per-block list, or ToMe's ``(r, inflection)``
ramp) or ``flops`` (target fraction of the uncompressed model's FLOPs). For a given input size the
schedule is static: every block's token count is known before the forward.
"""
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..interfaces import ViTMethod as Method


@dataclass(frozen=True)
class Budget:
    kind: str  # "keep" | "r" | "flops"
    value: Any

    def describe(self) -> str:
        return f"{self.kind}={self.value}"


def parse_budget(method: Method, keep=None, r=None, flops=None) -> Budget:
    """Validate the user's keep / r / flops and return the one in force."""
    given = {k: v for k, v in (("keep", keep), ("r", r), ("flops", flops)) if v is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one of keep=, r=, flops= (got {', '.join(given)}); "
                         "they are alternative ways to set the same budget")
    if not given:
        kind, value = next(iter(method.default_budget.items()))
        return Budget(kind, value)
    kind, value = next(iter(given.items()))
    if kind in ("keep", "flops"):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{kind}= must be a number in (0, 1], got {type(value).__name__}")
        if not 0.0 < float(value) <= 1.0:
            what = method.keep_means if kind == "keep" else "fraction of the uncompressed FLOPs"
            raise ValueError(f"{kind}={value} is outside (0, 1]: it is the {what}, e.g. {kind}=0.9")
        return Budget(kind, float(value))
    return Budget("r", _checked_r(value))


def _checked_r(r):
    """``r`` checked, with numpy / torch integers made ints (lists and ``(r, inflection)`` too)."""
    def checked_int(v, where):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"r{where} must be an int, got {v!r} ({type(v).__name__})")
        if v < 0:
            raise ValueError(f"r{where}={v} is negative: r counts tokens removed per block, use r >= 0")
        return int(v)

    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r={r!r}: a tuple must be ToMe's (r, inflection)")
        if isinstance(r[1], bool) or not isinstance(r[1], numbers.Real) or not -1.0 <= r[1] <= 1.0:
            raise ValueError(f"r={r!r}: the inflection must be a number in [-1, 1]")
        return checked_int(r[0], "[0]"), float(r[1])
    if isinstance(r, list):
        return [checked_int(v, f"[{i}]") for i, v in enumerate(r)]
    return checked_int(r, "")


def r_per_layer(r, depth: int) -> Tuple[int, ...]:
    """Expand an ``r`` budget to one removal count per block.

    A ``(r, inflection)`` pair ramps linearly from ``r * (1 - inflection)`` in the first block to
    ``r * (1 + inflection)`` in the last, so the total stays about ``r * depth`` (ToMe's schedule).
    """
    if isinstance(r, list):
        if len(r) > depth:
            raise ValueError(f"r has {len(r)} entries but the model has {depth} blocks")
        return tuple(r) + (0,) * (depth - len(r))
    if isinstance(r, tuple):
        total, inflection = r
        first = int(total * (1.0 - inflection))
        last = 2 * total - first
        if depth == 1:
            return (total,)
        step = (last - first) / (depth - 1)
        return tuple(int(first + step * i) for i in range(depth))
    return (r,) * depth


@dataclass(frozen=True)
class Schedule:
    """Tokens removed in each block (after its attention) and tokens entering each block."""

    remove: Tuple[int, ...]
    tokens: Tuple[int, ...]  # prefix tokens included
    final_tokens: int
    num_prefix: int
    keep: Optional[float] = None  # the per-block keep ratio, when the budget is one

    @property
    def depth(self) -> int:
        return len(self.remove)

    def as_dict(self) -> Dict[str, Any]:
        return {"remove": list(self.remove), "tokens_per_layer": list(self.tokens),
                "final_tokens": self.final_tokens, "keep": self.keep}


def build_schedule(method: Method, options: Dict[str, Any], kind: str, value, num_patches: int,
                   num_prefix: int, depth: int, clamp: bool = False) -> Schedule:
    """Turn a ``keep`` or ``r`` budget into a checked schedule for ``num_patches`` input patches.

    An int ``r`` (or a ramp) applies to the blocks the method reduces in; a per-block list that asks a
    block the method does not reduce in to remove tokens is an error.

    A block asked to remove more than the method can is an error, or with ``clamp`` removes what it
    can (as ToMe does): for token counts other than the one the budget was checked at.
    """
    requested = r_per_layer(value, depth) if kind == "r" else None
    remove, tokens = [], []
    t = num_patches
    for layer in range(depth):
        tokens.append(t + num_prefix)
        reduces = method.reduces(layer, depth, options)
        if kind == "keep":
            n = method.remove_for_keep(t, num_prefix, value) if reduces else 0
        else:
            n = requested[layer] if reduces or isinstance(value, list) else 0  # an int r: per reducing block
            if n and not reduces:
                raise ValueError(f"r asks block {layer} to remove {n} tokens, but {method.name} does not reduce "
                                 f"in that block; set its entry to 0")
        limit = method.max_remove(t, layer, depth, options)
        if clamp:
            n = min(n, limit)
        if n > limit:
            fix = ("use a larger keep" if kind == "keep" else "use a smaller r or a per-block list") + \
                method.limit_hint(options)
            raise ValueError(f"{kind}={value} asks block {layer} to remove {n} of the {t} tokens left, but "
                             f"{method.name} can remove at most {limit} there; {fix}")
        remove.append(n)
        t -= n
    return Schedule(tuple(remove), tuple(tokens), t + num_prefix, num_prefix,
                    keep=value if kind == "keep" else None)


@dataclass(frozen=True)
class ViTCost:
    """FLOPs of a ViT-like model as a function of its token schedule, counted the way fvcore counts
    them (multiply-adds of linear/conv/matmul/attention, 4-5 per element for norms)."""

    depth: int
    dim: int
    num_heads: int
    head_dim: int
    per_patch: int  # patch embedding, per patch token
    per_token_attn_in: int  # norm1 + qkv projection (+ gate)
    per_token_attn_out: int  # output projection (+ scale norm)
    per_token_mlp: int  # norm2 + MLP
    per_token_final: int  # final norm, per surviving token
    fixed: int  # pooling norm and classifier head

    def attention(self, n: int) -> int:
        return 2 * self.num_heads * n * n * self.head_dim

    def flops(self, schedule: Schedule, method: Optional[Method] = None,
              options: Optional[Dict[str, Any]] = None) -> int:
        p = schedule.num_prefix
        total = self.per_patch * (schedule.tokens[0] - p) + self.fixed
        for layer, (n, r) in enumerate(zip(schedule.tokens, schedule.remove)):
            total += n * (self.per_token_attn_in + self.per_token_attn_out) + self.attention(n)
            total += (n - r) * self.per_token_mlp
            if method is not None and r > 0:
                total += method.overhead_flops(n, p, r, self.num_heads, self.head_dim, layer, self.depth, options)
                if method.kind == "merge":
                    total += r * (self.dim + 1)  # scatter-add of merged tokens and their sizes
        return total + schedule.final_tokens * self.per_token_final


def resolve_flops(target: float, cost: ViTCost, method: Method, options: Dict[str, Any],
                  num_patches: int, num_prefix: int, resolution: int = 2000) -> Schedule:
    """The keep-ratio schedule whose FLOPs are closest to ``target`` x the uncompressed FLOPs."""
    base = cost.flops(build_schedule(method, options, "r", 0, num_patches, num_prefix, cost.depth))
    best, best_gap, lowest = None, math.inf, 1.0
    for i in range(resolution, 0, -1):
        try:
            sched = build_schedule(method, options, "keep", i / resolution, num_patches, num_prefix, cost.depth)
        except ValueError:
            break
        ratio = cost.flops(sched, method, options) / base
        lowest = min(lowest, ratio)
        if abs(ratio - target) < best_gap:
            best, best_gap = sched, abs(ratio - target)
    if lowest > target * 1.02:
        raise ValueError(f"flops={target} is unreachable with {method.name} on this model: the most it can "
                         f"reduce gives {lowest:.3f} of the uncompressed FLOPs; ask for flops >= {math.ceil(lowest * 1000) / 1000}")
    return best
