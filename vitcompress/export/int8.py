"""int8: onnxruntime static quantization of the linear layers that do not choose tokens, and the
graph queries that find them (:func:`linear_nodes`, :func:`reduction_inputs`)."""
import logging
import os
import tempfile
import warnings
from typing import Any, Dict, List, Tuple, Union

import numpy
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
    consumers = _consumers(model)
    names = {n.name for n in linear}
    return [n.name for n in linear if not _reaches(n.output, consumers, SELECTION_OPS, names)]


def _consumers(model) -> Dict[str, List[Any]]:
    consumers: Dict[str, List[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _reaches(outputs, consumers, op_types, linear) -> bool:
    """Whether a node of ``op_types`` reads ``outputs`` with no linear layer (``linear``: names) in between."""
    seen, stack = set(), list(outputs)
    while stack:
        for user in consumers.get(stack.pop(), []):
            if user.op_type in op_types:
                return True
            if user.name not in linear and id(user) not in seen:
                seen.add(id(user))
                stack.extend(user.output)
    return False


def _reads_attention(node, consumers, linear) -> bool:
    """Whether the token selection fed by the linear layer ``node`` reads attention (a Softmax of
    queries and keys; Zero-TPrune's PageRank) and not only its keys (ToMe, PiToMe)."""
    seen, stack = set(), list(node.output)
    while stack:
        for user in consumers.get(stack.pop(), []):
            if user.op_type == "Softmax" and _reaches(user.output, consumers, SELECTION_OPS, linear):
                return True
            if user.name not in linear and id(user) not in seen:
                seen.add(id(user))
                stack.extend(user.output)
    return False


def split_scoring_qkv(model, skip=()) -> List[str]:
    """Split, in ``model`` (a ``ModelProto``, edited in place), each fused qkv projection that scores
    tokens -- a MatMul whose constant weight ``[C, 3C]`` feeds token selection -- into one MatMul per
    part (``<name>/q``, ``/k``, ``/v``) whose outputs a Concat joins back. Returns the parts the
    selection does not read, which int8 may quantize: the queries and values when it scores with
    keys only (ToMe, PiToMe), the values when it reads attention (Zero-TPrune). The keys stay float.
    Layers named in ``skip`` are left whole. The parts share their input: once quantized,
    :func:`_restore_float_inputs` gives the float ones the unrounded input back. Where the qkv is
    read the way attention splits it into heads (:func:`_head_split`), each part takes its own bias
    (if any), reshape and transpose instead: no Concat copies the parts together for the heads to
    be cut out again."""
    from onnx import helper, numpy_helper

    scoring = set(linear_nodes(model)) - set(linear_nodes(model, scoring=False)) - set(skip)
    weights = {i.name: i for i in model.graph.initializer}
    consumers, linear = _consumers(model), set(linear_nodes(model))
    nodes, parts, fused, replaced, unread = list(model.graph.node), [], set(), set(), set()
    for position, node in reversed(list(enumerate(nodes))):
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if node.name not in scoring or weight is None or len(weight.dims) != 2 or weight.dims[1] != 3 * weight.dims[0]:
            continue
        in_int8 = "v" if _reads_attention(node, consumers, linear) else "qv"
        values, width = numpy_helper.to_array(weight), weight.dims[0]
        split, first = [], weight.name not in fused  # two layers may share one weight
        fused.add(weight.name)
        for i, part in enumerate("qkv"):
            name = f"{node.name}/{part}"
            if first:
                model.graph.initializer.append(numpy_helper.from_array(values[:, i * width:(i + 1) * width],
                                                                       f"{weight.name}/{part}"))
            split.append(helper.make_node("MatMul", [node.input[0], f"{weight.name}/{part}"], [f"{name}:out"],
                                          name=name))
            if part in in_int8:
                parts.append(name)
        heads = _head_split(node, consumers, model, 3 * width)
        if heads is None:
            split.append(helper.make_node("Concat", [n.output[0] for n in split], list(node.output),
                                          name=f"{node.name}/concat", axis=-1))
        else:
            chain, bias, shape, outputs = heads
            replaced.update(id(n) for n in chain)
            unread.update(name for n in chain for name in n.input)
            model.graph.initializer.append(numpy_helper.from_array(
                numpy.array([shape[0], shape[1], shape[3], shape[4]], dtype=numpy.int64), f"{node.name}/heads"))
            for i, (part, out) in enumerate(zip("qkv", outputs)):
                name, projected = f"{node.name}/{part}", split[i].output[0]
                if bias is not None:
                    stem = bias.name[:-len(".bias")] if bias.name.endswith(".bias") else bias.name
                    if f"{stem}/{part}.bias" not in {t.name for t in model.graph.initializer}:  # a shared bias
                        model.graph.initializer.append(numpy_helper.from_array(
                            numpy_helper.to_array(bias)[i * width:(i + 1) * width], f"{stem}/{part}.bias"))
                    split.append(helper.make_node("Add", [projected, f"{stem}/{part}.bias"], [f"{name}:biased"],
                                                  name=f"{name}/bias"))
                    projected = f"{name}:biased"
                split += [helper.make_node("Reshape", [projected, f"{node.name}/heads"], [f"{name}:heads"],
                                           name=f"{name}/reshape"),
                          helper.make_node("Transpose", [f"{name}:heads"], [out], name=f"{name}/transpose",
                                           perm=[0, 2, 1, 3])]
        nodes[position:position + 1] = split
    nodes = [n for n in nodes if id(n) not in replaced]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    read = {name for node in nodes for name in node.input}
    for initializer in [i for i in model.graph.initializer if i.name in fused | unread and i.name not in read]:
        model.graph.initializer.remove(initializer)
    return sorted(parts)


def _head_split(node, consumers, model, width: int):
    """How attention cuts the output of the fused qkv ``node`` (``width`` = 3C columns) into heads,
    if it is ``Add(bias [3C])`` (or no bias) -> ``Reshape [B, N, 3, H, D]`` -> ``Transpose [2, 0, 3,
    1, 4]`` -> three ``Slice``s of axis 0 (q, k, v) -> ``Squeeze`` of axis 0, each read by nothing
    else: ``(the nodes of the chain, the bias or None, the reshape's shape, the q, k, v outputs)``;
    else ``None``."""
    from onnx import numpy_helper

    constants = {i.name: i for i in model.graph.initializer}
    constant_nodes = {o: n.attribute[0].t for n in model.graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" for o in n.output}
    outputs = {o.name for o in model.graph.output}

    def only_user(name, op_type):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type and name not in outputs else None

    def constant(name):  # the small constants of shapes and slices, as lists
        tensor = constants[name] if name in constants else constant_nodes.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor).tolist()

    add = only_user(node.output[0], "Add")
    bias = next((constants[i] for i in add.input if i in constants), None) if add else None
    if add is not None and (bias is None or list(bias.dims) != [width]):
        return None
    reshape = only_user(add.output[0] if add else node.output[0], "Reshape")
    shape = constant(reshape.input[1]) if reshape else None
    if shape is None or len(shape) != 5 or shape[2] != 3:
        return None
    transpose = only_user(reshape.output[0], "Transpose")
    if transpose is None or [list(a.ints) for a in transpose.attribute if a.name == "perm"] != [[2, 0, 3, 1, 4]]:
        return None
    cuts, squeezed = consumers.get(transpose.output[0], []), {}
    for cut in cuts:
        starts, ends, axes, steps = ([constant(i) for i in cut.input[1:5]] + [None] * 4)[:4]
        squeeze = only_user(cut.output[0], "Squeeze") if cut.op_type == "Slice" else None
        if squeeze is None or len(squeeze.input) != 2 or constant(squeeze.input[1]) != [0]:
            return None
        if axes not in ([0], [-5]) or steps not in (None, [1]) or not starts or ends != [starts[0] + 1]:
            return None
        squeezed[starts[0]] = squeeze
    if sorted(squeezed) != [0, 1, 2] or len(cuts) != 3 or transpose.output[0] in outputs:
        return None
    chain = [add] * (add is not None) + [reshape, transpose] + cuts + list(squeezed.values())
    return chain, bias, shape, [squeezed[i].output[0] for i in range(3)]


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


#: onnxruntime's calibration methods by the names :func:`quantize_onnx` takes.
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def quantize_onnx(source: str, path: str, calibration: torch.Tensor, batch_size: int = 8,
                  float_reductions: int = FLOAT_REDUCTIONS, calibration_method: str = "minmax") -> List[str]:
    """Write the int8 version of the fp32 ONNX file ``source`` to ``path``: onnxruntime static
    quantization, QDQ format, per-channel symmetric int8 weights and uint8 input activations whose
    ranges ``calibration_method`` takes from ``calibration`` (images ``[N, C, H, W]``, run in chunks
    of ``batch_size``): ``"minmax"`` (the min / max), ``"percentile"`` or ``"entropy"``. Only the linear
    layers that do not score tokens are quantized (:func:`linear_nodes` with ``scoring=False``), less
    those feeding the first ``float_reductions`` token reductions (:func:`reduction_inputs`); a fused
    qkv projection that scores tokens is split (:func:`split_scoring_qkv`) so that only the part
    the selection reads stays float -- the keys, and the queries where it reads attention.
    Everything that chooses tokens stays in float. Returns the names of the quantized nodes."""
    require("onnxruntime")
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    check_float_reductions(float_reductions)
    if calibration_method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration_method={calibration_method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
    proto = load_graph(source)
    kept = set(reduction_inputs(proto, float_reductions))
    nodes = [n for n in linear_nodes(proto, scoring=False) if n not in kept]
    nodes += split_scoring_qkv(proto, skip=kept)
    if not nodes:
        raise ValueError(f"{source}: no MatMul / Gemm / Conv with a constant weight left to quantize"
                         + (f" (float_reductions={float_reductions} keeps {len(kept)} in float: give fewer)"
                            if kept else ""))
    reader = _calibration_reader(proto.graph.input[0].name, calibration, batch_size)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration_method]
    quiet = _DropPreprocessingAdvice()  # onnxruntime logs it on the root logger at every call
    logging.getLogger().addFilter(quiet)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="vitcompress_int8_") as folder:
        warnings.simplefilter("ignore")
        split = os.path.join(folder, "split.onnx")
        onnx.save(proto, split)
        try:
            quantize_static(split, str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                            calibrate_method=method,
                            # uint8 activations: onnxruntime's CPU provider runs a quantized MatMul
                            # as MatMulIntegerToFloat only with uint8 inputs. It converts an int8
                            # activation read by one layer, not one that the split queries and
                            # values share: those stayed float MatMuls over dequantized weights.
                            # float outputs (int8 in, float out): a per-tensor int8 rounding of the
                            # qkv output would blur the keys that score the tokens
                            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Conv"]})
        finally:
            logging.getLogger().removeFilter(quiet)
    split_parts = {n.name for n in proto.graph.node if "/" in n.name and n.name.rsplit("/", 1)[1] in ("q", "k", "v")}
    _restore_float_inputs(path, split_parts - set(nodes))
    return nodes


def _restore_float_inputs(path: str, float_nodes) -> None:
    """Give the nodes ``float_nodes`` of the int8 file at ``path`` their float input back:
    onnxruntime feeds every reader of a quantized tensor its int8-rounded copy (DequantizeLinear of
    QuantizeLinear), the keys of a split qkv included."""
    import onnx

    if not float_nodes:
        return
    proto = onnx.load(str(path))
    producer = {out: node for node in proto.graph.node for out in node.output}
    for node in proto.graph.node:
        dequantize = producer.get(node.input[0]) if node.name in float_nodes else None
        if dequantize is not None and dequantize.op_type == "DequantizeLinear":
            quantize = producer[dequantize.input[0]]
            node.input[0] = quantize.input[0]
    onnx.save(proto, str(path))


class _DropPreprocessingAdvice(logging.Filter):
    def filter(self, record):
        return "pre-processing" not in record.getMessage()
