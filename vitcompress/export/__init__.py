"""Deployment: ``torch.export`` and ONNX of a compressed model, checked in onnxruntime.

How it works
------------
``export_program`` captures the model with ``torch.export.export`` (non-strict) under
``torch.no_grad()``, with the batch dimension symbolic (``torch.export.Dim``). The token schedule
of a compressed model is static for a given input size -- the reducing block looks it up from the
(static) token count at block 0 -- so every layer's token count is a constant in the graph and only
the batch varies. ``export_onnx`` converts that ``ExportedProgram`` with the torch.export-based
ONNX exporter (``torch.onnx.export(..., dynamo=True)``, the default exporter since torch 2.9; the
legacy TorchScript exporter is deprecated and mis-exports some of the methods' ops), checks the
file with ``onnx.checker``, and runs it in onnxruntime against the PyTorch model on random inputs
at two batch sizes and, when given, on real images.

ONNX-friendliness
-----------------
* Merging is gather + ``scatter_add`` + divide (``vitcompress.engine.tokens``), i.e. ``GatherElements``
  and ``ScatterElements(reduction="add")``; there is no ``scatter_reduce("mean")``.
  :func:`scatter_reductions` lists the reductions in a file and ``export_onnx`` refuses a graph
  with a mean reduction.
* Methods rank tokens with ``torch.sort(..., stable=True)``, which torch's ONNX function library
  does not cover (torch 2.14). It is exported here as ``TopK`` over the whole axis: the ONNX spec
  breaks ties by the lower index, which is exactly a stable sort (checked in the tests).
* The similarity / top-k kernels dispatch to their torch references while a graph is captured.

Methods whose token counts depend on the content (``Method.dynamic = True``, e.g. token-correlation
compression) cannot be exported as a static graph and are refused with a ``ValueError``.

The functions are generic over any ``nn.Module`` that takes one image tensor ``[B, C, H, W]`` and
returns one tensor: timm models today; open_clip image towers go through the same path once their
adapter exists. The model is exported in eval mode.

Edge runtimes
-------------
* ``quantize="int8"``: onnxruntime static quantization (QDQ, per-channel int8 weights, int8
  activations calibrated with min/max on a few images) of the linear layers only -- the MatMul /
  Gemm / Conv nodes whose weight is a constant (:func:`linear_nodes`). Token selection (the
  similarity and attention MatMuls between activations, ArgMax, TopK, GatherElements and the
  ScatterElements merge) stays in float, so int8 rounding only perturbs the scores, it never
  rounds them onto ties. The file is judged by its top-1 agreement with the fp32 PyTorch model.
* ``runtime="openvino"``: the ONNX file is read and compiled by OpenVINO for the CPU (fp32
  inference precision, so bf16-capable CPUs do not silently downcast) and checked like onnxruntime.
* :func:`export_executorch`: the ``torch.export`` program lowered to an ExecuTorch ``.pte`` with
  the XNNPACK backend, checked in ExecuTorch's Python runtime.

Requires the ``export`` extra: ``pip install "vitcompress[export]"`` (onnx, onnxruntime, onnxscript);
OpenVINO needs the ``edge`` extra, ExecuTorch ``pip install executorch``.

Modules
-------
``checks`` (what export refuses before any work), ``program`` (the ``torch.export`` program),
``onnx_export`` (``export_onnx``: conversion, opset, the checks of the file), ``onnx_graph``
(walking an ONNX graph, scatter reductions), ``sessions`` (onnxruntime / OpenVINO sessions and
the comparison with PyTorch), ``int8`` (quantization), ``report`` (``ExportReport``),
``executorch_export`` (``export_executorch``, its XNNPACK rewrites and report). The names below
are the package's interface.
"""
from .checks import check_exportable, check_exportable_method
from .executorch_export import ExecuTorchReport, export_executorch
from .int8 import (CALIBRATION_IMAGES, CALIBRATION_METHODS, FLOAT_REDUCTIONS, linear_nodes, quantize_onnx,
                   reduction_inputs, split_scoring_qkv)
from .onnx_export import DEFAULT_OPSET, MIN_OPSET, export_onnx
from .onnx_graph import scatter_reductions
from .program import export_program
from .report import ExportReport
from .sessions import RUNTIMES, openvino_session, ort_session, verify_onnx

__all__ = ["export_program", "export_onnx", "check_exportable", "check_exportable_method", "verify_onnx",
           "ort_session", "scatter_reductions", "quantize_onnx", "linear_nodes", "reduction_inputs", "split_scoring_qkv",
           "openvino_session", "export_executorch", "ExportReport", "ExecuTorchReport", "DEFAULT_OPSET",
           "MIN_OPSET", "RUNTIMES", "CALIBRATION_IMAGES", "CALIBRATION_METHODS", "FLOAT_REDUCTIONS"]
