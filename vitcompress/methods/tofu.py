"""Token Fusion (ToFu; Kim et al., WACV 2024): ToMe's matching, pruning early, MLERP merging late.

The paper's observation: early blocks respond non-linearly to interpolated inputs, so averaging two
tokens there makes a token the block has never seen, while later blocks are close to linear and
merge well. ToFu therefore keeps ToMe's bipartite soft matching in every reducing block and changes
what a matched pair becomes: in the first blocks the matched A token is dropped and its B match kept
unchanged (a pruning decided by similarity), in the later blocks the pair is merged with MLERP, a
multi-token SLERP that keeps the merged token's norm -- the direction of the (size-weighted)
average, the largest norm among the tokens merged -- instead of the average's shrunken norm.

There is no official code. Where the paper leaves room (docs/methods/tofu.md says more): the switch
is after the first half of the blocks (``prune_fraction=0.5``); the average MLERP takes its
direction from is size-weighted, as ToMe's merge; a pruned token's patches leave the source map and
sizes stay as they are, as in any pruning.
"""
import math

from ..interfaces import Plan, Signals, ViTMethod
from .tome import ToMe, tome_matching


def prunes_at(layer: int, num_layers: int, prune_fraction: float) -> bool:
    """Whether block ``layer`` prunes (the first ``floor(prune_fraction * num_layers)`` blocks) rather than merges."""
    return layer < math.floor(prune_fraction * num_layers + 1e-9)


def tofu_plan(metric, r: int, num_prefix: int, class_token: bool, prune: bool, mlerp: bool = True) -> Plan:
    """ToMe's matching of ``r`` pairs (:func:`.tome.tome_matching`), then: ``prune`` drops the
    matched A tokens (their B matches stay as they are); otherwise they merge into their B matches,
    with MLERP's norm (``mlerp``) or ToMe's average."""
    plan = tome_matching(metric, r, num_prefix, class_token)
    if prune:
        return Plan(keep=plan.keep)
    return Plan(plan.keep, plan.merge_src, plan.merge_dst, merge_norm="max" if mlerp else None)


class ToFu(ViTMethod):
    name = "tofu"
    kind = "merge"
    defaults = {"prune_fraction": 0.5, "mlerp": True}
    option_help = {
        "prune_fraction": "the first floor(prune_fraction * depth) blocks prune (a matched token is dropped), "
                          "the rest merge; 0.5 = the paper's switch after the first half",
        "mlerp": "merge with MLERP (the average's direction, the largest norm of the merged tokens); "
                 "False: ToMe's size-weighted average",
    }

    def validate(self, options) -> None:
        f = options["prune_fraction"]
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 <= f <= 1.0:
            raise ValueError(f"tofu prune_fraction={f!r} must be a number in [0, 1] (default 0.5)")
        if not isinstance(options["mlerp"], bool):
            raise TypeError(f"tofu mlerp={options['mlerp']!r} must be True or False (default True)")

    def overhead_flops(self, tokens, num_prefix, remove, num_heads, head_dim, layer, num_layers, options):
        return ToMe.overhead_flops(self, tokens, num_prefix, remove, num_heads, head_dim, layer, num_layers, options)

    def plan(self, signals: Signals, remove: int, options) -> Plan:
        prune = prunes_at(signals.layer, signals.num_layers, options["prune_fraction"])
        return tofu_plan(signals.metric, remove, signals.num_prefix,
                         class_token=signals.cls_first and signals.num_prefix > 0, prune=prune, mlerp=options["mlerp"])
