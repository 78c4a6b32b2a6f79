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
* Merging is gather + ``scatter_add`` + divide (``vitcompress.tokens``), i.e. ``GatherElements``
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

Requires the ``export`` extra: ``pip install "vitcompress[export]"`` (onnx, onnxruntime, onnxscript).
"""
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .interfaces import runtime_of
from .runtime import ViTRuntime

__all__ = ["export_program", "export_onnx", "check_exportable", "verify_onnx", "ort_session", "scatter_reductions",
           "ExportReport", "DEFAULT_OPSET"]

#: ONNX opset written by default: the native opset of torch's ONNX function library. Opset 17 is
#: written by converting that graph with ``onnx.version_converter``.
DEFAULT_OPSET = 18
NATIVE_OPSET = 18
MIN_OPSET = 17


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
    from .methods import get, names  # (vitcompress.methods, the attribute, is the function)
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


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how the file compares with PyTorch in onnxruntime.

    ``checks`` maps a name (``"random, batch 1"``, ``"real images, batch 8"``) to the result of
    :func:`verify_onnx`. A check passes when at least ``min_match`` of its images are within
    ``atol`` (with fewer than 100 images: all of them). Token reduction makes discrete choices
    (rankings, best matches); where two scores are tied or nearly tied, the last bit of float
    rounding -- which differs between PyTorch and onnxruntime kernels -- can pick the other token
    and change that image's output, so on many real images a few may differ.
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

    @property
    def max_abs_diff(self) -> float:
        return max((c["max_abs_diff"] for c in self.checks.values()), default=float("nan"))

    def within(self, name: str) -> int:
        """How many images of check ``name`` are within ``atol``."""
        return int((self.checks[name]["per_image"] <= self.atol).sum())

    def passed(self, name: str) -> bool:
        return self.within(name) >= self.min_match * self.checks[name]["images"] - 1e-9

    @property
    def ok(self) -> bool:
        return all(self.passed(name) for name in self.checks)

    def lines(self) -> List[str]:
        scatters = ", ".join(f"{k} x{v}" for k, v in self.scatter_reductions.items()) or "none"
        out = [f"wrote {self.path}: opset {self.opset}, {self.nodes} nodes, input {list(self.input_shape)}"
               f"{' (dynamic batch)' if self.dynamic_batch else ''}, method {self.method or 'none (uncompressed)'}",
               f"onnx.checker: ok; scatter nodes: {scatters} (no mean reduction)"]
        for name, c in self.checks.items():
            extra = f", top-1 agreement {100 * c['top1_agreement']:.2f}%" if "top1_agreement" in c else ""
            out.append(f"onnxruntime vs PyTorch, {name}: max abs diff {c['max_abs_diff']:.3g}, "
                       f"{self.within(name)}/{c['images']} images within {self.atol:g}{extra}")
        if any(self.within(n) < c["images"] for n, c in self.checks.items()):
            out.append("  (images outside the tolerance: tied or nearly tied token scores that onnxruntime's "
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
                providers: Optional[Sequence[str]] = None, verbose: bool = True) -> ExportReport:
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
    if program is None:
        program = export_program(model, shape, dynamic_batch=dynamic_batch)
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
    nodes = _nodes(proto)
    runtime = runtime_of(model)
    report = ExportReport(
        path=path, opset=opset, input_shape=shape, dynamic_batch=dynamic_batch,
        method=None if runtime is None else runtime.method.name, nodes=len(nodes),
        op_counts=dict(Counter(n.op_type for n in nodes).most_common()),
        scatter_reductions={f"{op}({red})": n for (op, red), n in reductions.items()}, atol=atol,
        min_match=min_match)

    session = ort_session(path, providers)
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
        warnings.warn(f"{path}: onnxruntime differs from PyTorch beyond {atol:g} on more than "
                      f"{100 * (1 - min_match):g}% of the images of a check:\n{report}", RuntimeWarning)
    return report
