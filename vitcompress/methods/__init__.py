"""Registered token-reduction methods, one module per paper."""
from typing import Dict, List, Optional

from ..interfaces import TARGETS, Method
from .atc import ATC
from .dart import DART
from .evit import EViT
from .fastv import FastV
from .focus_detr import FocusDETR
from .mctf import MCTF
from .pitome import PiToMe
from .ppt import PPT
from .pyramiddrop import PyramidDrop
from .quota import QuoTA
from .random_prune import RandomPrune
from .tofu import ToFu
from .tokencorr import TokenCorr
from .tome import ToMe
from .zero_tprune import ZeroTPrune
from .visionzip import VisionZip
from .cdpruner import CDPruner

REGISTRY: Dict[str, Method] = {m.name: m for m in (ToMe(), PiToMe(), ZeroTPrune(), EViT(), ToFu(), MCTF(), PPT(),
                                                   ATC(), RandomPrune(), FocusDETR(), TokenCorr(), QuoTA(),
                                                   FastV(), PyramidDrop(), DART(), VisionZip(), CDPruner())}


def get(name: str) -> Method:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def names(target: Optional[str] = None) -> List[str]:
    """Registered names, optionally only those reducing ``target`` ("vit", "detr", "llava")."""
    if target is not None and target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; methods reduce one of: {', '.join(TARGETS)}")
    return sorted(n for n, m in REGISTRY.items() if target is None or m.target == target)


__all__ = ["REGISTRY", "get", "names"]
