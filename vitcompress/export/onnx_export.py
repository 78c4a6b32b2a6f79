"""``export_onnx``: the ``torch.export`` program converted to an ONNX file of the asked opset,
checked (``onnx.checker``, no mean scatter), made int8 when asked, and compared with PyTorch in
onnxruntime or OpenVINO."""
import os
import tempfile
import time
import warnings
from collections import Counter
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..interfaces import runtime_of
from .checks import check_exportable, check_output_path, checked_input_shape, require
from .int8 import FLOAT_REDUCTIONS, calibration_images, check_float_reductions, linear_nodes, quantize_onnx
from .onnx_graph import graph_nodes, load_graph, model_nodes, scatter_reductions
from .passes import drop_copies, gather_rows
from .program import export_program, has_dynamic_batch
from .report import ExportReport
from .sessions import RUNTIMES, compare_with_pytorch, openvino_session, ort_session

#: ONNX opset written by default: the native opset of torch's ONNX function library. Opset 17 is
#: written by converting that graph with ``onnx.version_converter``.
DEFAULT_OPSET = 18
NATIVE_OPSET = 18
MIN_OPSET = 17


def _sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` as ONNX ``TopK`` over the whole axis. ``TopK`` breaks ties by the
    lower index (ONNX spec), so ascending or descending it is a stable sort -- in onnxruntime;
    OpenVINO orders ties otherwise. Small integer keys along the last axis (atc's 0/1 alive flags,
    all ties) are therefore made unique first, ``key * N + position`` (``N - 1 - position``
    descending), so that every runtime returns the stable order."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    if dim == -1:
        length = op.Shape(self, start=-1)
    else:
        length = op.Shape(self, start=dim, end=dim + 1)
    small_integers = (ir.DataType.BOOL, ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16,
                      ir.DataType.INT32)
    if getattr(self, "dtype", None) in small_integers and dim in (-1, len(self.shape or ()) - 1):
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        count = op.Squeeze(length)
        positions = op.Range(zero, count, one)
        if descending:
            positions = op.Sub(op.Sub(count, one), positions)
        unique = op.Add(op.Mul(op.Cast(self, to=ir.DataType.INT64), length), positions)
        _, indices = op.TopK(unique, length, axis=-1, largest=1 if descending else 0, sorted=1)
        return op.GatherElements(self, indices, axis=-1), indices
    values, indices = op.TopK(self, length, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def _translations() -> Dict[Any, Any]:
    return {torch.ops.aten.sort.stable: _sort_stable}


def _convert_opset(proto, opset: int):
    """``onnx.version_converter`` down to ``opset``, minus the ``noop_with_empty_axes`` attribute it
    leaves on reductions that only gained it in opset 18 (when it is inert: 0, or explicit axes)."""
    import onnx

    proto = onnx.version_converter.convert_version(proto, opset)
    if opset < 18:
        for node in graph_nodes(proto.graph):
            if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":
                attrs = {a.name: a for a in node.attribute}
                noop = attrs.get("noop_with_empty_axes")
                if noop is None:
                    continue
                if noop.i and not ("axes" in attrs and attrs["axes"].ints):
                    raise ValueError(f"{node.op_type} {node.name!r} has noop_with_empty_axes=1 and no axes, "
                                     f"which opset {opset} cannot express")
                node.attribute.remove(noop)
    return proto


def _check_arguments(path: str, shape: Tuple[int, ...], opset: int, dynamic_batch: bool,
                     inputs: Optional[torch.Tensor], runtime: str, quantize: Optional[str],
                     calibration: Union[None, int, torch.Tensor], float_reductions: int) -> None:
    """Refuse, before the (slow) capture, what :func:`export_onnx` cannot do (``ValueError`` naming
    the fix)."""
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset={opset!r}: vitcompress exports ONNX opset {MIN_OPSET} or newer")
    check_output_path(path)
    if inputs is not None and len(inputs) == 0:
        raise ValueError("inputs= holds no images to check (with the CLI: --num-images must be >= 1)")
    if inputs is not None and not dynamic_batch and len(inputs) % shape[0]:
        raise ValueError(f"{len(inputs)} images to check do not fill whole batches of {shape[0]}, the static batch "
                         "size: give a multiple of it (CLI: --num-images), or a dynamic batch")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}: the only quantization is 'int8' (or None for fp32)")
    if quantize and runtime != "onnxruntime":
        raise ValueError(f"quantize='int8' writes onnxruntime's QDQ format, checked in onnxruntime; "
                         f"drop runtime={runtime!r} (or quantize) ")
    check_float_reductions(float_reductions)
    if calibration is not None:
        if not quantize:
            raise ValueError("calibration= images only serve quantize='int8'")
        if isinstance(calibration, bool) or (isinstance(calibration, int) and calibration < 1):
            raise ValueError(f"calibration={calibration!r}: give images [N, C, H, W] or a number of random-normal "
                             "inputs >= 1")
        if isinstance(calibration, int):
            if not dynamic_batch and calibration % shape[0]:
                raise ValueError(f"{calibration} calibration images do not fill whole batches of {shape[0]}, the "
                                 "static batch size: give a multiple of it, or a dynamic batch")
            return
        if calibration.dim() != 4 or tuple(calibration.shape[1:]) != shape[1:] or len(calibration) == 0:
            raise ValueError(f"calibration= has shape {tuple(calibration.shape)}: give images [N, "
                             f"{', '.join(map(str, shape[1:]))}] with N >= 1, like input_shape")
        if not dynamic_batch and len(calibration) % shape[0]:
            raise ValueError(f"{len(calibration)} calibration images do not fill whole batches of {shape[0]}, the "
                             "static batch size: give a multiple of it, or a dynamic batch")


def program_for_onnx(program):
    """``program`` (a ``torch.export.ExportedProgram``) as :func:`export_onnx` converts it: token
    rows gathered as whole rows (:func:`~vitcompress.export.passes.gather_rows`: a ``Gather`` of the
    flattened rows, not a ``GatherElements`` reading an index expanded over the channels), and no
    copies of expanded or repeated tensors. The merge's sum stays ``scatter_add`` (ONNX
    ``ScatterElements(add)``): as an ``index_put`` it would be a ``ScatterND`` with a reduction, which
    TensorRT does not take, and onnxruntime runs both as fast."""
    program = program.run_decompositions({torch.ops.aten.gather.default: gather_rows})
    drop_copies(program)
    return program


def _write(program, path: str, opset: int, optimize: bool) -> Tuple[Any, Counter]:
    """``program`` converted to ONNX opset ``opset`` at ``path``, then checked: ``onnx.checker``, the
    opset written, no scatter with a mean reduction. Returns the ``ModelProto`` and its scatter
    reductions (:func:`scatter_reductions`)."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch's ONNX functions are written for opset 18; older opsets are converted below, once
        # the optimiser has folded the reductions' axes into constants (the converter needs them).
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=max(opset, NATIVE_OPSET),
                                         verbose=False, input_names=["images"], output_names=["logits"],
                                         custom_translation_table=_translations(), optimize=optimize)
    onnx_program.save(path)
    if opset < NATIVE_OPSET:
        try:
            onnx.save(_convert_opset(onnx.load(path), opset), path)
        except Exception as err:
            os.remove(path)
            raise ValueError(f"cannot convert the graph to opset {opset} ({err}); use opset={NATIVE_OPSET}"
                             + ("" if optimize else " or optimize=True")) from None

    onnx.checker.check_model(path)
    proto = onnx.load(path, load_external_data=False)
    written = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise RuntimeError(f"{path}: asked for opset {opset}, the exporter wrote opset {written}")
    reductions = scatter_reductions(proto)
    means = {k: v for k, v in reductions.items() if k[1] == "mean"}
    if means:
        raise RuntimeError(f"{path}: the graph has scatter nodes with a mean reduction {means}; "
                           "ONNX runtimes and TensorRT cannot run them")
    return proto, reductions


def _write_int8(program, path: str, opset: int, optimize: bool, calibration: Union[None, int, torch.Tensor],
                shape: Tuple[int, ...], float_reductions: int) -> Tuple[Any, Counter, Dict[str, Any]]:
    """The fp32 file written and checked (:func:`_write`) in a scratch folder, then quantized into
    ``path`` (:func:`quantize_onnx`). Returns the int8 ``ModelProto``, the fp32 graph's scatter
    reductions and the report's int8 fields."""
    with tempfile.TemporaryDirectory(prefix="vitcompress_int8_") as scratch:
        fp32 = os.path.join(scratch, "fp32.onnx")
        proto, reductions = _write(program, fp32, opset, optimize)
        images, described = calibration_images(calibration, shape)
        quantized = quantize_onnx(fp32, path, images, batch_size=shape[0], float_reductions=float_reductions)
        split = {name.rsplit("/", 1)[0] for name in quantized if "/" in name}  # a qkv counts as its 3 parts
        linear_layers = len(linear_nodes(proto)) + 2 * len(split)
    return load_graph(path), reductions, dict(quantized_nodes=quantized, calibration=described,
                                              linear_layers=linear_layers)


def export_onnx(model: nn.Module, path: str, input_shape: Sequence[int] = (1, 3, 224, 224), *,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, inputs: Optional[torch.Tensor] = None,
                check_batches: Optional[Sequence[int]] = None, atol: float = 1e-4, min_match: float = 0.99,
                optimize: bool = True,
                program: Optional["torch.export.ExportedProgram"] = None,
                providers: Optional[Sequence[str]] = None, runtime: str = "onnxruntime",
                quantize: Optional[str] = None, calibration: Union[None, int, torch.Tensor] = None,
                float_reductions: int = FLOAT_REDUCTIONS, verbose: bool = True) -> ExportReport:
    """Export a (compressed) image model to ONNX at ``path`` and check it in onnxruntime.

    ``input_shape`` is ``(batch, channels, height, width)``; with ``dynamic_batch`` (default) the
    file accepts any batch size, the spatial size (and so the token schedule) is fixed. Writes
    opset ``opset`` (>= 17; default 18). Then: ``onnx.checker``; a check that no scatter uses a
    mean reduction; onnxruntime against PyTorch on random inputs at two batch sizes
    (``check_batches``, default 1 and the given batch, or 2) and on ``inputs`` (real images
    ``[N, C, H, W]``, checked in chunks of the given batch) when given. Prints the max abs
    difference of each check with ``verbose`` and returns an :class:`ExportReport`; warns when
    fewer than ``min_match`` of a check's images are within ``atol`` (see the report for why a
    few real images may differ).

    ``program``: an ``ExportedProgram`` of this model from :func:`export_program`, to skip the
    capture (its batch dimension, dynamic or not, is the file's); it is converted as
    :func:`program_for_onnx` rewrites it. ``optimize``: run onnxscript's graph optimiser (constant
    folding, dead code) before saving. Works for any module taking one image tensor (timm today;
    open_clip image towers through the same path once their adapter exists). Raises
    ``ValueError`` for a model compressed with a content-dependent (dynamic) method.

    ``runtime``: ``"onnxruntime"`` or ``"openvino"`` (:func:`openvino_session`), the runtime the
    checks run in. ``quantize="int8"``: write the int8 file (:func:`quantize_onnx`) calibrated on
    ``calibration`` (images ``[N, C, H, W]``, or a number of random-normal inputs of ``input_shape``;
    default ``CALIBRATION_IMAGES`` of them) and judge it by top-1 agreement with the fp32 model (see
    :class:`ExportReport`; ``min_match`` is then the least agreement) instead of ``atol``;
    ``float_reductions``: the inputs of that many leading token reductions stay in float
    (:func:`quantize_onnx`).
    """
    start = time.perf_counter()
    for module in ("onnx", "onnxruntime", "onnxscript"):
        require(module)
    check_exportable(model)
    shape = checked_input_shape(input_shape)
    if program is not None:
        dynamic_batch = has_dynamic_batch(program)
    _check_arguments(path, shape, opset, dynamic_batch, inputs, runtime, quantize, calibration, float_reductions)
    if program is None:
        program = export_program(model, shape, dynamic_batch=dynamic_batch)
    program = program_for_onnx(program)
    if quantize:
        proto, reductions, int8 = _write_int8(program, path, opset, optimize, calibration, shape, float_reductions)
    else:
        proto, reductions = _write(program, path, opset, optimize)
        int8 = {}
    nodes = model_nodes(proto)
    method = runtime_of(model)
    report = ExportReport(
        path=path, opset=opset, input_shape=shape, dynamic_batch=dynamic_batch,
        method=None if method is None else method.method.name, nodes=len(nodes),
        op_counts=dict(Counter(n.op_type for n in nodes).most_common()),
        scatter_reductions={f"{op}({red})": n for (op, red), n in reductions.items()}, atol=atol,
        min_match=min_match, runtime=runtime, quantize=quantize, float_reductions=float_reductions, **int8)
    session = ort_session(path, providers) if runtime == "onnxruntime" else openvino_session(path)
    if check_batches is None:
        check_batches = sorted({1, max(2, shape[0])}) if dynamic_batch else [shape[0]]
    report.checks.update(compare_with_pytorch(session, model, shape, check_batches, inputs))
    report.seconds = time.perf_counter() - start
    if verbose:
        print(report)
    if not report.ok:
        warnings.warn(f"{path}: {report.shortfall()} of a check:\n{report}", RuntimeWarning)
    return report
