"""FLOPs of a DETR's encoder alone (plain or compressed), the part a sparse encoder reduces; the
backbone and decoder cost the same either way."""
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..adapters.detr import detr_parts, encoder_inputs
from ..interfaces import runtime_of
from ..runtimes.sparse_encoder import DetrRuntime
from .flops import count_flops


class EncoderCall(nn.Module):
    """The encoder of ``model`` as a function of its input tokens alone (mask and position
    embeddings bound), for FLOPs counting and timing. The whole model (whose class head the
    dual attention uses) and the modules a compression's method prepared (a trained scorer head)
    are submodules, so tracing sees every parameter the encoder touches."""

    def __init__(self, model: nn.Module, inputs: Dict[str, torch.Tensor]):
        super().__init__()
        self.model = model
        runtime = runtime_of(model)
        prepared = runtime.prepared if isinstance(runtime, DetrRuntime) else None
        self.prepared = prepared if isinstance(prepared, nn.Module) else None
        self.bound = {k: v for k, v in inputs.items() if k != "inputs_embeds"}
        self.train(model.training)  # a new module starts in training mode; counting would leave the model there

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return detr_parts(self.model)[0].encoder(inputs_embeds=inputs_embeds, **self.bound)[0]


def count_encoder_flops(model: nn.Module, pixel_values: torch.Tensor, pixel_mask: Optional[torch.Tensor] = None) -> int:
    """fvcore multiply-adds of the (compressed or plain) encoder alone for these images, token
    scoring and dual attention included."""
    with torch.no_grad():
        inputs = encoder_inputs(model, pixel_values, pixel_mask)
    return count_flops(EncoderCall(model, inputs), inputs["inputs_embeds"])
