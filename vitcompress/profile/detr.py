"""FLOPs of a DETR's encoder alone (plain or compressed), the part a sparse encoder reduces; the
backbone and decoder cost the same either way.

The DETR adapter (from :func:`vitcompress.adapters.find_adapter`, as ``compress`` finds it) says
where the encoder is and what it is called with; nothing here knows a DETR's layout."""
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..adapters import find_adapter
from ..interfaces import runtime_of
from ..runtimes.sparse_encoder import DetrRuntime
from .flops import count_flops


def _detr_adapter(model: nn.Module):
    adapter = find_adapter(model)
    if "detr" not in adapter.targets:
        raise TypeError(f"count_encoder_flops and EncoderCall take a DETR model, not a {adapter.family} model")
    return adapter


class EncoderCall(nn.Module):
    """The encoder of ``model`` as a function of its input tokens alone (mask and position
    embeddings bound), for FLOPs counting and timing. The whole model (whose class head the
    dual attention uses) and the modules a compression's method prepared (a trained scorer head)
    are submodules, so tracing sees every parameter the encoder touches."""

    def __init__(self, model: nn.Module, inputs: Dict[str, torch.Tensor]):
        super().__init__()
        self.model = model
        self.adapter = _detr_adapter(model)  # not a module: the encoder is the model's
        runtime = runtime_of(model)
        prepared = runtime.prepared if isinstance(runtime, DetrRuntime) else None
        self.prepared = prepared if isinstance(prepared, nn.Module) else None
        self.bound = {k: v for k, v in inputs.items() if k != "inputs_embeds"}
        self.train(model.training)  # a new module starts in training mode; counting would leave the model there

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.adapter.encoder(inputs_embeds=inputs_embeds, **self.bound)[0]


def count_encoder_flops(model: nn.Module, pixel_values: torch.Tensor, pixel_mask: Optional[torch.Tensor] = None) -> int:
    """fvcore multiply-adds of the (compressed or plain) encoder alone for these images, token
    scoring and dual attention included."""
    with torch.no_grad():
        inputs = _detr_adapter(model).encoder_inputs(pixel_values, pixel_mask)
    return count_flops(EncoderCall(model, inputs), inputs["inputs_embeds"])
