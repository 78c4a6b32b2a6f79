"""Random pruning: keep a uniformly random subset of the reducible tokens, the floor a scorer must beat.

Benchmarks of token pruning (UniPruneBench, VTC-Bench) found random pruning at the same budget
beating many published methods, so ``vitcompress.tune`` measures it beside every method. The
subset depends on the seed, the block and the token count only, never on the image: one fixed
draw per block, the same for every image of the batch, so the schedule is static and the plan a
constant for export and CUDA graphs.
"""
import random
from typing import Dict, List, Tuple

import torch

from ..interfaces import Plan, Signals, ViTMethod


def random_keep(tokens: int, remove: int, seed: int, layer: int) -> List[int]:
    """The ascending indices of a uniformly random subset of ``tokens - remove`` of ``tokens``, drawn
    by Python's generator seeded by ``(seed, layer)``: the same draw on every machine, and a constant
    (not a random op) in an exported or compiled graph."""
    return sorted(random.Random(seed * 1000 + layer).sample(range(tokens), tokens - remove))


class RandomPrune(ViTMethod):
    name = "random"
    kind = "prune"
    defaults = {"seed": 0}
    option_help = {"seed": "which random subset each block keeps (one fixed draw per block and token count)"}

    def __init__(self):
        self._drawn: Dict[Tuple[int, int, int, int, torch.device], torch.Tensor] = {}

    def validate(self, options) -> None:
        if options["seed"] < 0:
            raise ValueError(f"random seed={options['seed']} must be >= 0")

    def max_remove(self, tokens, layer, num_layers, options):
        return tokens - 1

    def plan(self, signals: Signals, remove: int, options) -> Plan:
        Bsz, T = signals.metric.shape[:2]
        key = (int(options["seed"]), signals.layer, T, remove, signals.metric.device)
        keep = self._drawn.get(key)
        if keep is None:  # kept per device: no host-to-device copy inside a captured CUDA graph
            keep = torch.tensor(random_keep(T, remove, key[0], signals.layer), device=signals.metric.device)
            if not torch.compiler.is_compiling():  # a tensor made while tracing is the trace's own
                self._drawn[key] = keep
        return Plan(keep=keep.expand(Bsz, -1))
