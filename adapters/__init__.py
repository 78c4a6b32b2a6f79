"""Model surgery, one module per family. Adapters know where a family keeps its blocks, q/k/v,
special tokens and pooling, and nothing about any method."""
from typing import List

import torch.nn as nn

from .detr import DetrAdapter
from .hf_clip import HFCLIPVisionAdapter
from .llava import LlavaAdapter
from .open_clip_vit import OpenCLIPVisionAdapter
from .timm_vit import TimmViTAdapter

ADAPTERS: List[type] = [TimmViTAdapter, DetrAdapter, OpenCLIPVisionAdapter, HFCLIPVisionAdapter, LlavaAdapter]


def find_adapter(model: nn.Module):
    """The adapter for ``model``; a clear error naming the supported families otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress() takes a torch.nn.Module, got {type(model).__name__}")
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    families = "; ".join(a.description for a in ADAPTERS)
    raise TypeError(f"vitcompress cannot compress a {type(model).__module__}.{type(model).__name__}: "
                    f"supported families are {families}")


__all__ = ["ADAPTERS", "find_adapter"]
