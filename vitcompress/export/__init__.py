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
"""
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..interfaces import runtime_of
from ..runtimes.vit import ViTRuntime

__all__ = ["export_program", "export_onnx", "check_exportable", "verify_onnx", "ort_session", "scatter_reductions",
           "quantize_onnx", "linear_nodes", "reduction_inputs", "openvino_session", "export_executorch", "ExportReport",
           "ExecuTorchReport", "DEFAULT_OPSET", "RUNTIMES"]

#: ONNX opset written by default: the native opset of torch's ONNX function library. Opset 17 is
#: written by converting that graph with ``onnx.version_converter``.
DEFAULT_OPSET = 18
NATIVE_OPSET = 18
MIN_OPSET = 17
#: Runtimes ``export_onnx`` checks the file in.
RUNTIMES = ("onnxruntime", "openvino")
#: Calibration images for int8 when none are given (random-normal inputs of the model's shape).
CALIBRATION_IMAGES = 64
#: Leading token reductions whose inputs int8 computes in float (:func:`reduction_inputs`): on the
#: reference model, 2 lifts top-1 agreement with fp32 to >= 99% for every static method (pitome
#: 97.3% -> 99.4%) at the price of the patch embedding and block 0 in float.
FLOAT_REDUCTIONS = 2
#: An int8 check is judged by its top-1 agreement only with at least this many images; smaller
#: ones (random inputs at two batch sizes) show that the file runs with the dynamic batch.
MIN_AGREEMENT_IMAGES = 100


# --------------------------------------------------------------------------- checks


def check_exportable(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` is compressed with a method whose token counts depend on
    the content: its graph would bake in the token counts of the example input and silently give
    wrong results on other images."""
    runtime = runtime_of(model)
    if runtime is None:
        return
    method = runtime.method
    if method.target != "vit":
        raise ValueError(f"cannot export a model compressed with {method.name!r}: export covers ViT-like image "
                         f"models (timm, CLIP image towers) compressed with {', '.join(_static_methods())}; "
                         "export a detector or a LLaVA uncompressed")
    if getattr(method, "dynamic", False):
        raise ValueError(
            f"cannot export a model compressed with {method.name!r}: that method sets the number of "
            "tokens each block keeps from the content of the image, so there is no static token "
            "schedule; an exported graph would fix the counts of the example input and compute "
            "wrong results for other images. Export it uncompressed, or compress it with a method "
            "with a static schedule (" + ", ".join(_static_methods()) + ").")


def _static_methods() -> List[str]:
    from ..methods import (  # (vitcompress.methods, the attribute, is the function)
        get,
        names,
    )
    return [n for n in names("vit") if not getattr(get(n), "dynamic", False)]


def _has_dynamic_batch(program) -> bool:
    """Whether the image input of an ``ExportedProgram`` has a symbolic batch dimension."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    return isinstance(node.meta["val"].shape[0], torch.SymInt)


def _check_output_path(path: str) -> None:
    """Fail before the (slow) export when ``path`` cannot be written."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ValueError(f"{path} is a directory: give the .onnx file to write, e.g. {os.path.join(path, 'model.onnx')}")
    existed = os.path.exists(target)
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "ab"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write {path}: {err.strerror or err}") from None
    if not existed:
        os.remove(target)


def _input_shape(input_shape: Sequence[int]) -> Tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape={tuple(input_shape)!r}: give (batch, channels, height, width), "
                         "e.g. (1, 3, 224, 224)")
    return shape


class _Inference:
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


# --------------------------------------------------------------------------- torch.export


def export_program(model: nn.Module, example: Any = (2, 3, 224, 224), *, dynamic_batch: bool = True,
                   max_batch: Optional[int] = None) -> "torch.export.ExportedProgram":
    """``torch.export`` of a (compressed) image model; returns the ``ExportedProgram``.

    ``example`` is an input tensor ``[B, C, H, W]`` or its shape (random values). With
    ``dynamic_batch`` the batch dimension is symbolic (``1 <= B <= max_batch``, unbounded by
    default); the spatial size and therefore the token schedule are fixed. A batch of 1 in the
    example is traced as 2, since torch.export specialises dimensions of size 1.
    """
    check_exportable(model)
    x = example if isinstance(example, torch.Tensor) else torch.randn(_input_shape(example))
    if dynamic_batch and x.shape[0] == 1:
        x = torch.cat([x, x])
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
        dynamic_shapes = ({0: batch},)
    with _Inference(model), torch.no_grad():  # no_grad: the blocks' own no_grad regions add no subgraphs
        return torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes, strict=False)


# --------------------------------------------------------------------------- ONNX


def _sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` as ONNX ``TopK`` over the whole axis. ``TopK`` breaks ties by the
    lower index (ONNX spec), so ascending or descending it is a stable sort."""
    from onnxscript import opset18 as op

    if dim == -1:
        length = op.Shape(self, start=-1)
    else:
        length = op.Shape(self, start=dim, end=dim + 1)
    values, indices = op.TopK(self, length, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def _translations() -> Dict[Any, Any]:
    return {torch.ops.aten.sort.stable: _sort_stable}


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"ONNX export needs {module}: pip install 'vitcompress[export]' "
                          "(onnx, onnxruntime, onnxscript)") from err


def _all_nodes(graph) -> Iterable:
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _nodes(model) -> List:
    nodes = list(_all_nodes(model.graph))
    for fn in model.functions:  # local functions (onnxscript may emit some)
        for node in fn.node:
            nodes.append(node)
    return nodes


def _convert_opset(proto, opset: int):
    """``onnx.version_converter`` down to ``opset``, minus the ``noop_with_empty_axes`` attribute it
    leaves on reductions that only gained it in opset 18 (when it is inert: 0, or explicit axes)."""
    import onnx

    proto = onnx.version_converter.convert_version(proto, opset)
    if opset < 18:
        for node in _all_nodes(proto.graph):
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


def scatter_reductions(model) -> Counter:
    """``Counter`` of ``(op_type, reduction)`` over the scatter nodes of an ONNX model (a
    ``ModelProto`` or a path), subgraphs and local functions included. ``"none"`` is a plain
    scatter; token merging gives ``("ScatterElements", "add")``."""
    onnx = _require("onnx")
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    found: Counter = Counter()
    for node in _nodes(model):
        if node.op_type in ("ScatterElements", "ScatterND", "Scatter"):
            reduction = "none"
            for attr in node.attribute:
                if attr.name == "reduction":
                    reduction = attr.s.decode()
            found[(node.op_type, reduction)] += 1
    return found


def ort_session(path: str, providers: Optional[Sequence[str]] = None):
    """An onnxruntime ``InferenceSession`` for ``path`` (CPU by default) using as many intra-op
    threads as torch does, so that comparisons with PyTorch are like for like."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    # Idle threads that spin would steal the cores from whatever runs next (a PyTorch model timed
    # in the same loop): they sleep instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


def verify_onnx(session, model: nn.Module, inputs: torch.Tensor, batch_size: Optional[int] = None) -> Dict[str, Any]:
    """Run ``inputs`` through the onnxruntime ``session`` (or the path of a model file) and through
    ``model``, in chunks of ``batch_size``. Returns ``images``, ``max_abs_diff``,
    ``median_abs_diff``, ``per_image`` (each image's max abs difference) and, for logits
    ``[B, classes]``, ``top1_agreement``."""
    if inputs.shape[0] == 0:
        raise ValueError("verify_onnx: no inputs to check")
    if not hasattr(session, "run"):
        session = ort_session(session)
    name = session.get_inputs()[0].name
    batch_size = batch_size or inputs.shape[0]
    per_image, agree = [], 0
    with _Inference(model), torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start:start + batch_size].float().contiguous()
            ref = model(x).float()
            out = torch.from_numpy(session.run(None, {name: x.numpy()})[0]).float()
            if out.shape != ref.shape:
                raise RuntimeError(f"onnxruntime returned {tuple(out.shape)} for batch {tuple(x.shape)}; "
                                   f"PyTorch {tuple(ref.shape)}")
            per_image.append((out - ref).abs().reshape(out.shape[0], -1).amax(dim=1))
            if ref.dim() == 2:
                agree += (out.argmax(-1) == ref.argmax(-1)).sum().item()
    diffs = torch.cat(per_image)
    result = {"images": int(inputs.shape[0]), "max_abs_diff": diffs.max().item(),
              "median_abs_diff": diffs.median().item(), "per_image": diffs}
    if ref.dim() == 2:
        result["top1_agreement"] = agree / inputs.shape[0]
    return result


class _OpenVINOSession:
    """A compiled OpenVINO model behind the part of onnxruntime's session interface that
    :func:`verify_onnx` uses (``get_inputs``, ``run``), so that one check serves both runtimes."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_name = compiled.input(0).get_any_name()

    def get_inputs(self):
        return [_Named(self.input_name)]

    def run(self, output_names, feed):
        (x,) = feed.values()
        result = self.request.infer({0: x})
        return [result[self.compiled.output(0)].copy()]


@dataclass
class _Named:
    name: str


def openvino_session(path: str, device: str = "CPU", threads: Optional[int] = None):
    """``path`` (ONNX) read and compiled by OpenVINO on ``device``, with fp32 inference precision
    (OpenVINO would run bf16 on CPUs that have it) and as many threads as torch uses; returns an
    object with onnxruntime's ``run`` / ``get_inputs``."""
    try:
        import openvino as ov
    except ImportError as err:
        raise ImportError("--runtime openvino needs the openvino package: pip install 'vitcompress[edge]'") from err
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(threads or torch.get_num_threads())}
    return _OpenVINOSession(core.compile_model(core.read_model(str(path)), device, config))


#: ONNX ops that choose tokens (rank, match); a linear layer that feeds one of them without another
#: linear layer in between (the qkv projection whose keys score the tokens) stays in float under int8.
SELECTION_OPS = ("TopK", "ArgMax", "ArgMin")


def linear_nodes(model, scoring: bool = True) -> List[str]:
    """Names of the MatMul / Gemm / Conv nodes whose weight (second input) is a constant of the
    graph: the linear layers. MatMuls between two activations (attention, token similarity) are
    not listed. ``scoring=False`` also leaves out the linear layers that feed token selection
    (``SELECTION_OPS``) with no other linear layer in between -- the qkv projections of the
    reducing blocks, whose keys or attention score the tokens: int8 keys change which tokens are
    merged or pruned."""
    onnx = _require("onnx")
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    linear = [n for n in model.graph.node
              if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1 and n.input[1] in constants]
    if scoring:
        return [n.name for n in linear]
    consumers: Dict[str, List[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names = {n.name for n in linear}

    def scores(node) -> bool:
        seen, stack = set(), list(node.output)
        while stack:
            for user in consumers.get(stack.pop(), []):
                if user.op_type in SELECTION_OPS:
                    return True
                if user.name not in names and id(user) not in seen:
                    seen.add(id(user))
                    stack.extend(user.output)
        return False

    return [n.name for n in linear if not scores(n)]


def reduction_inputs(model, count: int) -> List[str]:
    """Names of the linear layers (:func:`linear_nodes`) that feed the first ``count`` token
    reductions of the graph: a reduction is the token selection of one block (its ``SELECTION_OPS``
    share one set of linear layers upstream), and reductions are ordered by how many linear layers
    run before them. For a ViT reducing from block 0 and ``count=2``: the patch embedding, block 0
    and block 1's qkv. Early choices are the fragile ones -- the first blocks choose among many
    near-identical tokens, and a token chosen differently changes everything after it -- so int8
    keeps their inputs in float (:func:`quantize_onnx`)."""
    onnx = _require("onnx")
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    if count < 0:
        raise ValueError(f"count={count}: give the number of leading token reductions (>= 0)")
    linear = set(linear_nodes(model))
    producer = {out: node for node in model.graph.node for out in node.output}
    upstream: List[frozenset] = []
    for node in model.graph.node:
        if node.op_type not in SELECTION_OPS:
            continue
        seen, stack, found = set(), list(node.input), set()
        while stack:
            parent = producer.get(stack.pop())
            if parent is None or id(parent) in seen:
                continue
            seen.add(id(parent))
            if parent.name in linear:
                found.add(parent.name)
            stack.extend(parent.input)
        if frozenset(found) not in upstream:
            upstream.append(frozenset(found))
    chosen = set().union(*sorted(upstream, key=len)[:count])
    return [n for n in linear_nodes(model) if n in chosen]


def _calibration_reader(name: str, images: torch.Tensor, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.chunks = iter(images[i:i + batch_size].float().contiguous().numpy()
                               for i in range(0, len(images), batch_size))

        def get_next(self):
            chunk = next(self.chunks, None)
            return None if chunk is None else {name: chunk}

    return Reader()


def _check_float_reductions(count) -> None:
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"float_reductions={count!r}: give the number (>= 0) of leading token reductions "
                         f"whose inputs stay in float under int8 (default {FLOAT_REDUCTIONS})")


def quantize_onnx(source: str, path: str, calibration: torch.Tensor, batch_size: int = 8,
                  float_reductions: int = FLOAT_REDUCTIONS) -> List[str]:
    """Write the int8 version of the fp32 ONNX file ``source`` to ``path``: onnxruntime static
    quantization, QDQ format, per-channel symmetric int8 weights and int8 input activations whose
    ranges are the min / max over ``calibration`` (images ``[N, C, H, W]``, run in chunks of
    ``batch_size``). Only the linear layers that do not score tokens are quantized
    (:func:`linear_nodes` with ``scoring=False``), less those feeding the first
    ``float_reductions`` token reductions (:func:`reduction_inputs`); everything that chooses
    tokens, and the projections computing its scores, stay in float. Returns the names of the
    quantized nodes."""
    _require("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    onnx = _require("onnx")
    _check_float_reductions(float_reductions)
    proto = onnx.load(str(source), load_external_data=False)
    kept = set(reduction_inputs(proto, float_reductions))
    nodes = [n for n in linear_nodes(proto, scoring=False) if n not in kept]
    if not nodes:
        raise ValueError(f"{source}: no MatMul / Gemm / Conv with a constant weight left to quantize"
                         + (f" (float_reductions={float_reductions} keeps {len(kept)} in float: give fewer)"
                            if kept else ""))
    reader = _calibration_reader(proto.graph.input[0].name, calibration, batch_size)
    quiet = _DropPreprocessingAdvice()  # onnxruntime logs it on the root logger at every call
    logging.getLogger().addFilter(quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quantize_static(str(source), str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                            calibrate_method=CalibrationMethod.MinMax,
                            # float outputs (int8 in, float out): a per-tensor int8 rounding of the
                            # qkv output would blur the keys that score the tokens
                            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Conv"]})
        finally:
            logging.getLogger().removeFilter(quiet)
    return nodes


class _DropPreprocessingAdvice(logging.Filter):
    def filter(self, record):
        return "pre-processing" not in record.getMessage()


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how the file compares with PyTorch in onnxruntime.

    ``checks`` maps a name (``"random, batch 1"``, ``"real images, batch 8"``) to the result of
    :func:`verify_onnx`. A check passes when at least ``min_match`` of its images are within
    ``atol`` (with fewer than 100 images: all of them). Token reduction makes discrete choices
    (rankings, best matches); where two scores are tied or nearly tied, the last bit of float
    rounding -- which differs between PyTorch and onnxruntime kernels -- can pick the other token
    and change that image's output, so on many real images a few may differ.

    An int8 file (``quantize="int8"``) is judged instead by top-1 agreement: a check of at least
    ``MIN_AGREEMENT_IMAGES`` images passes when at least ``min_match`` of them have the same top-1
    class as the fp32 PyTorch model; smaller checks only show that the file runs.
    """

    path: str
    opset: int
    input_shape: Tuple[int, ...]
    dynamic_batch: bool
    method: Optional[str]
    nodes: int
    op_counts: Dict[str, int]
    scatter_reductions: Dict[str, int]
    checks: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    atol: float = 1e-4
    min_match: float = 0.99
    seconds: float = 0.0
    runtime: str = "onnxruntime"
    quantize: Optional[str] = None
    quantized_nodes: List[str] = field(default_factory=list)
    linear_layers: int = 0
    float_reductions: int = FLOAT_REDUCTIONS
    calibration: str = ""

    @property
    def max_abs_diff(self) -> float:
        return max((c["max_abs_diff"] for c in self.checks.values()), default=float("nan"))

    def within(self, name: str) -> int:
        """How many images of check ``name`` are within ``atol``."""
        return int((self.checks[name]["per_image"] <= self.atol).sum())

    def judged(self, name: str) -> bool:
        """Whether check ``name`` decides ``ok`` (for int8: enough images to measure agreement)."""
        check = self.checks[name]
        return not self.quantize or ("top1_agreement" in check and check["images"] >= MIN_AGREEMENT_IMAGES)

    def passed(self, name: str) -> bool:
        if not self.judged(name):
            return True
        if self.quantize:
            return self.checks[name]["top1_agreement"] >= self.min_match - 1e-9
        return self.within(name) >= self.min_match * self.checks[name]["images"] - 1e-9

    @property
    def ok(self) -> bool:
        return all(self.passed(name) for name in self.checks)

    def lines(self) -> List[str]:
        scatters = ", ".join(f"{k} x{v}" for k, v in self.scatter_reductions.items()) or "none"
        out = [f"wrote {self.path}: opset {self.opset}, {self.nodes} nodes, input {list(self.input_shape)}"
               f"{' (dynamic batch)' if self.dynamic_batch else ''}, method {self.method or 'none (uncompressed)'}",
               f"onnx.checker: ok; scatter nodes: {scatters} (no mean reduction)"]
        if self.quantize:
            out.append(f"{self.quantize}: {len(self.quantized_nodes)} of {self.linear_layers} linear layers quantized "
                       f"(QDQ, per-channel weights); in float: token selection, the projections scoring it and the "
                       f"inputs of the first {self.float_reductions} reductions; calibration: {self.calibration}")
            for name, c in self.checks.items():
                agree = (f"top-1 agreement {100 * c['top1_agreement']:.2f}%" if "top1_agreement" in c
                         else "no top-1 (output is not [B, classes])")
                note = "" if self.judged(name) else f" (< {MIN_AGREEMENT_IMAGES} images: not judged)"
                out.append(f"{self.quantize} {self.runtime} vs fp32 PyTorch, {name}: {agree}{note}, "
                           f"max abs diff {c['max_abs_diff']:.3g}, median {c['median_abs_diff']:.3g}")
            if not any(self.judged(n) for n in self.checks):
                out.append(f"  (agreement is judged on >= {MIN_AGREEMENT_IMAGES} real images: give inputs= / "
                           "use the reference model)")
            judged = [self.checks[n]["top1_agreement"] for n in self.checks if self.judged(n)]
            verdict = f"top-1 agreement {100 * min(judged):.2f}% (>= {100 * self.min_match:g}% needed)" if judged \
                else "agreement not judged"
            out.append(f"{'OK' if self.ok else 'MISMATCH'}: {verdict}; {self.seconds:.0f} s")
            return out
        for name, c in self.checks.items():
            extra = f", top-1 agreement {100 * c['top1_agreement']:.2f}%" if "top1_agreement" in c else ""
            out.append(f"{self.runtime} vs PyTorch, {name}: max abs diff {c['max_abs_diff']:.3g}, "
                       f"{self.within(name)}/{c['images']} images within {self.atol:g}{extra}")
        if any(self.within(n) < c["images"] for n, c in self.checks.items()):
            out.append(f"  (images outside the tolerance: tied or nearly tied token scores that {self.runtime}'s "
                       "float rounding resolves the other way)")
        out.append(f"{'OK' if self.ok else 'MISMATCH'}: max abs diff {self.max_abs_diff:.3g}; "
                   f"{self.seconds:.0f} s")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def export_onnx(model: nn.Module, path: str, input_shape: Sequence[int] = (1, 3, 224, 224), *,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, inputs: Optional[torch.Tensor] = None,
                check_batches: Optional[Sequence[int]] = None, atol: float = 1e-4, min_match: float = 0.99,
                optimize: bool = True,
                program: Optional["torch.export.ExportedProgram"] = None,
                providers: Optional[Sequence[str]] = None, runtime: str = "onnxruntime",
                quantize: Optional[str] = None, calibration: Optional[torch.Tensor] = None,
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
    capture (its batch dimension, dynamic or not, is the file's). ``optimize``: run onnxscript's
    graph optimiser (constant folding, dead code) before saving. Works for any module taking one image tensor (timm today; open_clip image towers
    through the same path once their adapter exists). Raises ``ValueError`` for a model compressed
    with a content-dependent (dynamic) method.

    ``runtime``: ``"onnxruntime"`` or ``"openvino"`` (:func:`openvino_session`), the runtime the
    checks run in. ``quantize="int8"``: write the int8 file (:func:`quantize_onnx`) calibrated on
    ``calibration`` (images ``[N, C, H, W]``; default ``CALIBRATION_IMAGES`` random-normal inputs
    of ``input_shape``) and judge it by top-1 agreement with the fp32 model (see
    :class:`ExportReport`; ``min_match`` is then the least agreement) instead of ``atol``;
    ``float_reductions``: the inputs of that many leading token reductions stay in float
    (:func:`quantize_onnx`).
    """
    start = time.perf_counter()
    onnx = _require("onnx")
    _require("onnxruntime")
    _require("onnxscript")
    check_exportable(model)
    shape = _input_shape(input_shape)
    if program is not None:
        dynamic_batch = _has_dynamic_batch(program)
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset={opset!r}: vitcompress exports ONNX opset {MIN_OPSET} or newer")
    _check_output_path(path)
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
    _check_float_reductions(float_reductions)
    if calibration is not None:
        if not quantize:
            raise ValueError("calibration= images only serve quantize='int8'")
        if calibration.dim() != 4 or tuple(calibration.shape[1:]) != shape[1:] or len(calibration) == 0:
            raise ValueError(f"calibration= has shape {tuple(calibration.shape)}: give images [N, "
                             f"{', '.join(map(str, shape[1:]))}] with N >= 1, like input_shape")
        if not dynamic_batch and len(calibration) % shape[0]:
            raise ValueError(f"{len(calibration)} calibration images do not fill whole batches of {shape[0]}, the "
                             "static batch size: give a multiple of it, or a dynamic batch")
    if program is None:
        program = export_program(model, shape, dynamic_batch=dynamic_batch)
    final_path, scratch = path, None
    if quantize:  # the fp32 file is an intermediate: quantized into ``path`` below
        scratch = tempfile.TemporaryDirectory(prefix="vitcompress_int8_")
        path = os.path.join(scratch.name, "fp32.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch's ONNX functions are written for opset 18; older opsets are converted below, once
        # the optimiser has folded the reductions' axes into constants (the converter needs them).
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=max(opset, NATIVE_OPSET),
                                         verbose=False, input_names=["images"], output_names=["logits"],
                                         custom_translation_table=_translations(), optimize=optimize)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
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
    quantized, described, linear_layers = [], "", 0
    if quantize:
        if calibration is None:
            calibration = torch.randn((CALIBRATION_IMAGES,) + shape[1:], generator=torch.Generator().manual_seed(0))
            described = f"{CALIBRATION_IMAGES} random-normal inputs (give real images for real ranges)"
        else:
            described = f"{len(calibration)} given images"
        try:
            linear_layers = len(linear_nodes(proto))
            quantized = quantize_onnx(path, final_path, calibration, batch_size=shape[0],
                                      float_reductions=float_reductions)
        finally:
            scratch.cleanup()
        path = final_path
        proto = onnx.load(path, load_external_data=False)
    nodes = _nodes(proto)
    method = runtime_of(model)
    report = ExportReport(
        path=path, opset=opset, input_shape=shape, dynamic_batch=dynamic_batch,
        method=None if method is None else method.method.name, nodes=len(nodes),
        op_counts=dict(Counter(n.op_type for n in nodes).most_common()),
        scatter_reductions={f"{op}({red})": n for (op, red), n in reductions.items()}, atol=atol,
        min_match=min_match, runtime=runtime, quantize=quantize, quantized_nodes=quantized, calibration=described,
        linear_layers=linear_layers, float_reductions=float_reductions)

    session = ort_session(path, providers) if runtime == "onnxruntime" else openvino_session(path)
    if check_batches is None:
        check_batches = sorted({1, max(2, shape[0])}) if dynamic_batch else [shape[0]]
    generator = torch.Generator().manual_seed(0)
    for b in check_batches:
        x = torch.randn((b,) + shape[1:], generator=generator)
        report.checks[f"random, batch {b}"] = verify_onnx(session, model, x)
    if inputs is not None:
        report.checks[f"real images, batch {shape[0]}"] = verify_onnx(session, model, inputs, shape[0])
    report.seconds = time.perf_counter() - start
    if verbose:
        print(report)
    if not report.ok:
        what = (f"the int8 file agrees with PyTorch's top-1 on fewer than {100 * min_match:g}% of the images"
                if quantize else f"{runtime} differs from PyTorch beyond {atol:g} on more than "
                f"{100 * (1 - min_match):g}% of the images")
        warnings.warn(f"{path}: {what} of a check:\n{report}", RuntimeWarning)
    return report


# --------------------------------------------------------------------------- ExecuTorch


def _sort_by_ranks(x: torch.Tensor, stable: Optional[bool] = None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` from core ATen ops, for ExecuTorch (whose runtime has no sort kernel):
    element i goes to position ``#{j: x_j before x_i} + #{j < i: x_j == x_i}``, which is exactly
    the stable order. O(n^2) compares per row: cheap for a few hundred tokens."""
    rows = x.movedim(dim, -1)
    n = rows.shape[-1]
    mine, other = rows.unsqueeze(-1), rows.unsqueeze(-2)  # [..., i, 1], [..., 1, j]
    order = torch.arange(n, device=x.device)
    earlier = order.view(1, n) < order.view(n, 1)  # j < i
    ahead = (other > mine) if descending else (other < mine)
    rank = (ahead | ((other == mine) & earlier)).sum(-1)
    indices = torch.zeros_like(rank).scatter(-1, rank, order.expand_as(rank))
    return rows.gather(-1, indices).movedim(-1, dim), indices.movedim(-1, dim)


def _op_name(target) -> str:
    """``aten.gather.default`` for an ATen or ExecuTorch edge op overload."""
    name = getattr(target, "__name__", None) or str(target)
    return name if name.startswith("aten.") else f"aten.{name}"


def _attention_for_xnnpack(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                           scale: Optional[float] = None, enable_gqa: bool = False):
    """``aten.scaled_dot_product_attention`` as matmul, multiply by a tensor, softmax, matmul: ops
    the XNNPACK partitioner delegates. torch's own decomposition uses a "safe" softmax (``eq``,
    ``any``, ``where`` for fully masked rows) and a scalar multiply that XNNPACK does not take, so
    every block's attention ran in ExecuTorch's single-threaded portable kernels. An image model
    never masks a whole row."""
    if dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("export_executorch: attention with dropout, a causal mask or grouped heads")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * torch.tensor(scale, dtype=query.dtype)
    if attn_mask is not None:
        scores = (scores.masked_fill(attn_mask.logical_not(), float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    return torch.matmul(scores.softmax(-1), value)


def _layer_norm_for_xnnpack(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5, cudnn_enable=True):
    """``aten.layer_norm`` over the last dimension from mean, subtract, multiply, rsqrt: XNNPACK
    has no layer norm, and ExecuTorch's portable one cut each block's delegated graph in pieces."""
    if len(normalized_shape) != 1:
        raise NotImplementedError("export_executorch: layer norm over more than the last dimension")
    centered = x - x.mean(-1, keepdim=True)
    out = centered * torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


@dataclass
class ExecuTorchReport:
    """What :func:`export_executorch` wrote and how ExecuTorch's runtime compares with PyTorch:
    ``checks`` maps ``"random, batch N"`` to ``max_abs_diff``; ``portable_ops`` counts the ops left
    to ExecuTorch's portable (single-threaded) kernels, views and copies included."""

    path: str
    input_shape: Tuple[int, ...]
    method: Optional[str]
    delegated: int
    portable_ops: Dict[str, int] = field(default_factory=dict)
    checks: Dict[str, float] = field(default_factory=dict)
    atol: float = 1e-4
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max(self.checks.values(), default=float("nan"))

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol

    def __str__(self) -> str:
        out = [f"wrote {self.path}: input {list(self.input_shape)}, method {self.method or 'none (uncompressed)'}, "
               f"{self.delegated} subgraphs delegated to XNNPACK",
               "outside XNNPACK: " + (", ".join(f"{op} x{n}" for op, n in self.portable_ops.items()) or "nothing")]
        out += [f"executorch vs PyTorch, {name}: max abs diff {diff:.3g}" for name, diff in self.checks.items()]
        out.append(f"{'OK' if self.ok else 'MISMATCH'}: max abs diff {self.max_abs_diff:.3g} (atol {self.atol:g}); "
                   f"{self.seconds:.0f} s")
        return "\n".join(out)


def export_executorch(model: nn.Module, path: str, input_shape: Sequence[int] = (1, 3, 224, 224), *,
                      max_batch: int = 16, check_batches: Optional[Sequence[int]] = None, atol: float = 1e-4,
                      verbose: bool = True) -> ExecuTorchReport:
    """Lower a (compressed) image model to an ExecuTorch ``.pte`` at ``path`` and check it.

    The ``torch.export`` program (:func:`export_program`, batch dynamic up to ``max_batch``: the
    runtime plans its memory for the largest batch) is lowered with the XNNPACK partitioner; the
    sorts that rank tokens are rewritten into core ATen compares (:func:`_sort_by_ranks`, a stable
    sort), since the runtime has no sort kernel; attention and layer norm into ops XNNPACK
    delegates (:func:`_attention_for_xnnpack`, :func:`_layer_norm_for_xnnpack`). Then ExecuTorch's Python runtime runs the file on random
    inputs at ``check_batches`` (default 1 and ``input_shape``'s batch, or 2) against PyTorch.
    Needs ``pip install executorch`` (see the ``edge`` extra).
    """
    start = time.perf_counter()
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
    except ImportError as err:
        raise ImportError("export_executorch needs executorch: pip install executorch (see the README)") from err
    check_exportable(model)
    shape = _input_shape(input_shape)
    if not isinstance(max_batch, int) or max_batch < max(2, shape[0]):
        raise ValueError(f"max_batch={max_batch!r}: give an int >= {max(2, shape[0])} (the example batch)")
    if not str(path).endswith(".pte"):
        raise ValueError(f"{path}: ExecuTorch programs are .pte files; give e.g. model.pte")
    _check_output_path(path)
    program = export_program(model, shape, max_batch=max_batch)
    program = program.run_decompositions({
        torch.ops.aten.sort.stable: _sort_by_ranks,
        torch.ops.aten.sort.default: lambda x, dim=-1, descending=False: _sort_by_ranks(x, True, dim, descending),
        torch.ops.aten.scaled_dot_product_attention.default: _attention_for_xnnpack,
        torch.ops.aten.layer_norm.default: _layer_norm_for_xnnpack})
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    with open(path, "wb") as f:
        f.write(lowered.buffer)
    calls = [node for node in lowered.exported_program().graph.nodes if node.op == "call_function"]
    delegated = sum(1 for node in calls if "executorch_call_delegate" in str(node.target))
    portable = Counter(_op_name(node.target) for node in calls if isinstance(node.target, torch._ops.OpOverload)
                       or "EdgeOpOverload" in type(node.target).__name__)
    method = runtime_of(model)
    report = ExecuTorchReport(path=str(path), input_shape=shape, method=None if method is None else method.method.name,
                              delegated=delegated, portable_ops=dict(portable.most_common()), atol=atol)
    forward = Runtime.get().load_program(str(path)).load_method("forward")
    generator = torch.Generator().manual_seed(0)
    with _Inference(model), torch.no_grad():
        for b in check_batches or sorted({1, max(2, shape[0])}):
            x = torch.randn((b,) + shape[1:], generator=generator)
            out = forward.execute([x])[0]
            ref = model(x)
            if out.shape != ref.shape:
                raise RuntimeError(f"ExecuTorch returned {tuple(out.shape)} for batch {b}; PyTorch {tuple(ref.shape)}")
            report.checks[f"random, batch {b}"] = (out - ref).abs().max().item()
    report.seconds = time.perf_counter() - start
    if verbose:
        print(report)
    if not report.ok:
        warnings.warn(f"{path}: ExecuTorch differs from PyTorch by {report.max_abs_diff:.3g} > {atol:g}",
                      RuntimeWarning)
    return report
