"""Reading an ONNX graph: the file or ``ModelProto``, every node (subgraphs and local functions
included), the scatter reductions."""
from collections import Counter
from typing import Iterable, List

from .checks import require


def load_graph(model):
    """``model`` when it is an ONNX ``ModelProto``, else the model at that path (without external data)."""
    onnx = require("onnx")
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return model


def graph_nodes(graph) -> Iterable:
    """The nodes of an ONNX ``GraphProto``, those of its subgraphs (If / Loop bodies) included."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graph_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graph_nodes(g)


def model_nodes(model) -> List:
    """Every node of a ``ModelProto``: its graph's (:func:`graph_nodes`) and its local functions'."""
    nodes = list(graph_nodes(model.graph))
    for fn in model.functions:  # local functions (onnxscript may emit some)
        for node in fn.node:
            nodes.append(node)
    return nodes


def scatter_reductions(model) -> Counter:
    """``Counter`` of ``(op_type, reduction)`` over the scatter nodes of an ONNX model (a
    ``ModelProto`` or a path), subgraphs and local functions included. ``"none"`` is a plain
    scatter; token merging gives ``("ScatterElements", "add")``."""
    found: Counter = Counter()
    for node in model_nodes(load_graph(model)):
        if node.op_type in ("ScatterElements", "ScatterND", "Scatter"):
            reduction = "none"
            for attr in node.attribute:
                if attr.name == "reduction":
                    reduction = attr.s.decode()
            found[(node.op_type, reduction)] += 1
    return found
