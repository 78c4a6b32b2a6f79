"""Registered token-reduction methods, one module per paper."""
from typing import Dict, List

from .base import Method, Signals
from .pitome import PiToMe
from .tome import ToMe
from .zero_tprune import ZeroTPrune

REGISTRY: Dict[str, Method] = {m.name: m for m in (ToMe(), PiToMe(), ZeroTPrune())}


def get(name: str) -> Method:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def names() -> List[str]:
    return sorted(REGISTRY)


__all__ = ["Method", "Signals", "REGISTRY", "get", "names"]
