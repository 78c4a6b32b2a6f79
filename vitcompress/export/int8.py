"""int8: onnxruntime static quantization of the linear layers that do not choose tokens, and the
graph queries that find them (:func:`linear_nodes`, :func:`reduction_inputs`)."""
import logging
import warnings
from typing import Any, Dict, List, Tuple, Union

import torch

from .checks import require
from .onnx_graph import load_graph

#: Calibration images for int8 when none are given (random-normal inputs of the model's shape).
CALIBRATION_IMAGES = 64
#: Leading token reductions whose inputs int8 computes in float (:func:`reduction_inputs`): on the
#: reference model, 2 lifts top-1 agreement with fp32 to >= 99% for every static method (pitome
#: 97.3% -> 99.4%) at the price of the patch embedding and block 0 in float.
FLOAT_REDUCTIONS = 2
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
    model = load_graph(model)
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
    model = load_graph(model)
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


def calibration_images(calibration: Union[None, int, torch.Tensor],
                       input_shape: Tuple[int, ...]) -> Tuple[torch.Tensor, str]:
    """The images int8 calibrates on and how a report names them: ``calibration`` images as given,
    or that many (``None``: ``CALIBRATION_IMAGES``) random-normal inputs of ``input_shape`` (seeded)."""
    if calibration is None or isinstance(calibration, int):
        count = CALIBRATION_IMAGES if calibration is None else calibration
        images = torch.randn((count,) + tuple(input_shape[1:]), generator=torch.Generator().manual_seed(0))
        return images, f"{count} random-normal inputs (give real images for real activation ranges)"
    return calibration, f"{len(calibration)} given images"


def _calibration_reader(name: str, images: torch.Tensor, batch_size: int):
    """onnxruntime's calibration reader over ``images`` in chunks of ``batch_size``."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.chunks = iter(images[i:i + batch_size].float().contiguous().numpy()
                               for i in range(0, len(images), batch_size))

        def get_next(self):
            chunk = next(self.chunks, None)
            return None if chunk is None else {name: chunk}

    return Reader()


def check_float_reductions(count) -> None:
    """Refuse a ``float_reductions`` that is not a count (>= 0)."""
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
    require("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    check_float_reductions(float_reductions)
    proto = load_graph(source)
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
