"""The ``torch.export`` program every export starts from: batch symbolic, token schedule static."""
from typing import Any, Optional

import torch
import torch.nn as nn

from ..interfaces import runtime_of
from ..runtimes.vit import ViTRuntime
from .checks import check_exportable, checked_input_shape


def has_dynamic_batch(program) -> bool:
    """Whether the image input of an ``ExportedProgram`` has a symbolic batch dimension."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    return isinstance(node.meta["val"].shape[0], torch.SymInt)


class Inference:
    """Eval mode and a saved / restored token state around a capture or a check."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.model.eval()
        runtime = runtime_of(self.model)
        self.runtime = runtime if isinstance(runtime, ViTRuntime) else None
        self.saved = None if self.runtime is None else self.runtime.last_forward()
        return self

    def __exit__(self, *exc):
        self.model.train(self.training)
        if self.runtime is not None:  # no fake tensors left behind by tracing
            self.runtime.set_last_forward(self.saved)
        return False


def export_program(model: nn.Module, example: Any = (2, 3, 224, 224), *, dynamic_batch: bool = True,
                   max_batch: Optional[int] = None) -> "torch.export.ExportedProgram":
    """``torch.export`` of a (compressed) image model; returns the ``ExportedProgram``.

    ``example`` is an input tensor ``[B, C, H, W]`` or its shape (random values). With
    ``dynamic_batch`` the batch dimension is symbolic (``1 <= B <= max_batch``, unbounded by
    default); the spatial size and therefore the token schedule are fixed. A batch of 1 in the
    example is traced as 2, since torch.export specialises dimensions of size 1.
    """
    check_exportable(model)
    x = example if isinstance(example, torch.Tensor) else torch.randn(checked_input_shape(example))
    if dynamic_batch and x.shape[0] == 1:
        x = torch.cat([x, x])
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
        dynamic_shapes = ({0: batch},)
    with Inference(model), torch.no_grad():  # no_grad: the blocks' own no_grad regions add no subgraphs
        return torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes, strict=False)
