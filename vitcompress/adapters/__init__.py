"""Model surgery, one module per family. Adapters know where a family keeps its blocks, q/k/v,
special tokens and pooling, and nothing about any method."""
from typing import List

import torch.nn as nn

from .detr import DetrAdapter
from .hf_clip import HFCLIPVisionAdapter
from .hf_vit import HFViTAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .open_clip_vit import OpenCLIPVisionAdapter
from .qwen_vl import QwenVLAdapter
from .timm_rope_bias import TimmBeitAdapter, TimmEvaAdapter
from .timm_vit import TimmViTAdapter

ADAPTERS: List[type] = [TimmViTAdapter, TimmEvaAdapter, TimmBeitAdapter, DetrAdapter, OpenCLIPVisionAdapter,
                        HFCLIPVisionAdapter, HFViTAdapter, LlavaAdapter, QwenVLAdapter,
                        InternVLAdapter]


def _matching(model: nn.Module):
    return next((adapter for adapter in ADAPTERS if adapter.matches(model)), None)


def find_adapter(model: nn.Module):
    """The adapter for ``model``; a clear error naming the supported families otherwise, and the
    module to pass instead when a supported model is wrapped (DataParallel, a Sequential, ...)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress() takes a torch.nn.Module, got {type(model).__name__}")
    adapter = _matching(model)
    if adapter is not None:
        return adapter(model)
    what = f"vitcompress cannot compress a {type(model).__module__}.{type(model).__name__}"
    inner = getattr(model, "module", None)
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) and isinstance(inner, nn.Module):
        raise TypeError(f"{what}: compress the model it wraps, vitcompress.compress(model.module, ...), then wrap "
                        "it again")
    for name, sub in model.named_modules():
        if name and _matching(sub) is not None:
            path = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split("."))
            raise TypeError(f"{what}: it contains a supported {type(sub).__name__}; compress that instead, "
                            f"vitcompress.compress(model{path}, ...)")
    families = ", ".join(a.family for a in ADAPTERS)
    raise TypeError(f"{what}: supported families are {families} (see the README's support table)")


__all__ = ["ADAPTERS", "find_adapter"]
