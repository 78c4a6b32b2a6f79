"""Edge deployment (issue 18): int8 ONNX, OpenVINO and ExecuTorch of compressed models.

The default run checks the int8 graph structure and OpenVINO on a small random ViT; the acceptance
checks -- int8 top-1 agreement on the 3,000 reference images for every static method, and
ExecuTorch (minutes of CPU per lowering) -- are ``slow``: ``python -m pytest -m slow tests/test_edge.py``.
"""
import os
import re
from collections import defaultdict

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import vitcompress  # noqa: E402
from vitcompress.export import (export_onnx, linear_nodes, openvino_session, ort_session,  # noqa: E402
                                quantize_onnx, reduction_inputs, split_scoring_qkv, verify_onnx)
from vitcompress.methods import get as get_method  # noqa: E402

from vitcompress.testing import tiny_vit  # noqa: E402

ATOL = 1e-4
STATIC_METHODS = [m for m in vitcompress.list_methods("vit") if not get_method(m).dynamic]
SELECTION_OPS = ("TopK", "ArgMax", "GatherElements", "Gather", "ScatterElements", "ScatterND")


def _distinct_biases(model):
    """Random biases: timm starts them at zero, and the ONNX optimiser folds equal constants into
    one, which would hide which block a layer belongs to."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.02)
    return model


def _producers(proto):
    return {out: node for node in proto.graph.node for out in node.output}


def _bias_of(node, consumers):
    return next(name for user in consumers[node.output[0]] for name in user.input if name.endswith(".bias"))


def _block_of(node, consumers, hops=3):
    """The block index of a linear layer: from the name of the bias added to its output (through
    the Quantize / DequantizeLinear pair int8 may put in between)."""
    for user in consumers.get(node.output[0], []):
        for name in user.input:
            found = re.match(r"blocks\.(\d+)\.", name)
            if found:
                return int(found.group(1))
        if hops > 1 and user.op_type in ("QuantizeLinear", "DequantizeLinear"):
            block = _block_of(user, consumers, hops - 1)
            if block is not None:
                return block
    return None


@pytest.mark.parametrize("method", [m if m == "tome" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in STATIC_METHODS])
def test_openvino_matches_pytorch_at_two_batch_sizes(tmp_path, method):
    pytest.importorskip("openvino")
    assert {"atc", "evit", "mctf", "pitome", "ppt", "tofu", "tome", "zero_tprune"} <= set(STATIC_METHODS)
    model = vitcompress.compress(tiny_vit(depth=2), method)
    assert sum(vitcompress.stats(model)["schedule"]) > 0, "the exported model is compressed"
    path = str(tmp_path / f"{method}.onnx")
    report = export_onnx(model, path, (2, 3, 32, 32), runtime="openvino", check_batches=(1, 3), verbose=False)
    assert report.runtime == "openvino" and sorted(report.checks) == ["random, batch 1", "random, batch 3"]
    assert report.ok and report.max_abs_diff <= ATOL, f"{method}: {report}"
    # an independent run of the compiled model, on other inputs, against PyTorch
    session = openvino_session(path)
    torch.manual_seed(5)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= ATOL, f"{method}, batch {batch}"


def _layer_name(node, consumers):
    """The module of a linear layer, from its bias: Conv holds it, MatMul's follows in an Add (a
    part of a split qkv adds its part of the bias, ``<module>/k.bias``)."""
    if node.op_type == "Conv":
        return node.input[2].rsplit(".", 1)[0]
    return _bias_of(node, consumers).rsplit(".", 1)[0]


@pytest.mark.parametrize("float_reductions, in_float", [
    # every block int8: only the keys of the two reducing blocks' qkv (they score the tokens)
    (0, ["blocks.0.attn.qkv/k", "blocks.1.attn.qkv/k"]),
    # the default: also the inputs of the first two reductions, whole -- the patch embedding, block 0
    # and block 1's qkv
    (2, ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.attn.qkv",
         "patch_embed.proj"]),
])
def test_int8_quantizes_the_blocks_linear_layers_and_leaves_token_selection_in_float(tmp_path, float_reductions,
                                                                                       in_float):
    model = vitcompress.compress(_distinct_biases(tiny_vit(depth=2)), "tome")
    path = str(tmp_path / "tome-int8.onnx")
    calibration = torch.randn(16, 3, 32, 32)
    report = export_onnx(model, path, (2, 3, 32, 32), quantize="int8", calibration=calibration,
                         float_reductions=float_reductions, verbose=False)
    assert report.quantize == "int8" and report.calibration == "16 given images"
    assert report.ok  # random inputs at two batch sizes: the file runs; agreement is not judged below 100 images
    assert not any(report.judged(name) for name in report.checks)
    # each split qkv counts as its three parts
    layers = 10 + 2 * sum(name.endswith("qkv/k") for name in in_float)
    assert f"{len(report.quantized_nodes)} of {layers} linear layers quantized" in str(report)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    producers = _producers(proto)
    consumers = defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            consumers[name].append(node)
    constants = {i.name: i for i in proto.graph.initializer}

    # patch embedding, qkv, proj, fc1, fc2 of both blocks and the head; both blocks reduce
    assert vitcompress.stats(model)["planned_tokens_per_layer"] == [65, 58]
    assert report.linear_layers == layers
    linear = [n for n in proto.graph.node if n.name in set(report.quantized_nodes)]
    assert len(linear) == len(report.quantized_nodes) == layers - len(in_float)
    # in the int8 file, a layer whose weight is still a float constant (not a DequantizeLinear output)
    float_nodes = [n for n in proto.graph.node if n.name in set(linear_nodes(proto))]
    assert sorted(_layer_name(n, consumers) for n in float_nodes) == in_float
    for node in float_nodes:
        assert all(producers.get(name) is None or producers[name].op_type != "DequantizeLinear" for name in node.input)
    per_block = defaultdict(int)
    for node in linear:
        sources = [producers.get(name) for name in node.input[:2]]
        assert all(s is not None and s.op_type == "DequantizeLinear" for s in sources), node.name
        activation, weight = sources
        assert producers[activation.input[0]].op_type == "QuantizeLinear"
        q_weight = constants[weight.input[0]]
        assert q_weight.data_type == onnx.TensorProto.INT8
        scales = onnx.numpy_helper.to_array(constants[weight.input[1]])
        assert scales.size > 1, f"{node.name}: per-channel weight scales"
        block = _block_of(node, consumers)
        if node.op_type == "MatMul" and block is not None:
            per_block[block] += 1
    # int8 MatMuls per block: q, v, proj, fc1, fc2; with the default, block 1's proj, fc1, fc2
    assert dict(per_block) == ({0: 5, 1: 5} if float_reductions == 0 else {1: 3})

    # token selection and the activation x activation MatMuls (attention, similarity) stay in float
    for node in proto.graph.node:
        if node.op_type in SELECTION_OPS or (node.op_type == "MatMul" and node.name not in report.quantized_nodes):
            for name in node.input:
                source = producers.get(name)
                assert source is None or source.op_type != "DequantizeLinear", f"{node.op_type} {node.name}"
    # int8 weights are stored quantized: one QuantizeLinear per layer input; DequantizeLinear for
    # the input and the weight of each, and the int32 biases of Conv and Gemm
    # (the queries and values of a split qkv share one quantized input)
    quantized = len(linear)
    inputs = len({n.input[0] for n in linear})
    biased = sum(n.op_type in ("Conv", "Gemm") for n in linear)
    assert report.op_counts["QuantizeLinear"] == inputs
    assert report.op_counts["DequantizeLinear"] == inputs + quantized + biased
    assert report.op_counts["TopK"] == 4
    assert report.scatter_reductions == {"ScatterElements(add)": 4}


@pytest.mark.parametrize("method, in_float", [("tome", "k"), ("zero_tprune", "qk")])
def test_int8_splits_each_scoring_qkv_and_keeps_float_only_what_selection_reads(tmp_path, method, in_float):
    """A reducing block's fused qkv becomes three MatMuls, each with its own bias, reshape to heads
    and transpose (no Concat and no 5-D transpose: the same outputs); the keys stay float (ToMe
    scores with keys), and the queries where the selection reads attention (Zero-TPrune's
    PageRank); the rest is int8, and the float parts read the float input."""
    model = vitcompress.compress(_distinct_biases(tiny_vit(depth=2)), method, r=8)
    fp32 = str(tmp_path / "fp32.onnx")
    export_onnx(model, fp32, (2, 3, 32, 32), verbose=False)
    original = onnx.load(fp32)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in original.graph.initializer}
    scoring = {n.name: weights[n.input[1]] for n in original.graph.node
               if n.name in set(linear_nodes(original)) - set(linear_nodes(original, scoring=False))}
    assert len(scoring) == 2  # both blocks' qkv

    split = onnx.load(fp32)
    parts = split_scoring_qkv(split)
    assert parts == sorted(f"{name}/{p}" for name in scoring for p in "qkv" if p not in in_float)
    consumers = defaultdict(list)
    for node in split.graph.node:
        for name in node.input:
            consumers[name].append(node)
    for name in scoring:
        for part in "qkv":
            chain, out = [], f"{name}/{part}:out"
            while len(consumers[out]) == 1 and len(chain) < 3:
                chain.append(consumers[out][0])
                out = chain[-1].output[0]
            assert [n.op_type for n in chain] == ["Add", "Reshape", "Transpose"], (name, part)
            assert [list(a.ints) for a in chain[2].attribute if a.name == "perm"] == [[0, 2, 1, 3]]
    # both blocks' qkv are split: no Concat joins parts, no 5-D transpose cuts heads out of a fused qkv
    assert not [n for n in split.graph.node if n.op_type == "Concat" and n.name.endswith("/concat")]
    assert not [n for n in split.graph.node if n.op_type == "Transpose" and any(
        a.name == "perm" and len(a.ints) == 5 for a in n.attribute)]
    onnx.save(split, str(tmp_path / "split.onnx"))
    x = torch.randn(3, 3, 32, 32).numpy()
    before = ort_session(fp32).run(None, {"images": x})[0]
    after = ort_session(str(tmp_path / "split.onnx")).run(None, {"images": x})[0]
    assert abs(after - before).max() <= 1e-5
    split_weights = {i.name: onnx.numpy_helper.to_array(i) for i in split.graph.initializer}
    for name, weight in scoring.items():
        width = weight.shape[0]
        for i, part in enumerate("qkv"):  # each part holds its columns of the fused weight
            node = next(n for n in split.graph.node if n.name == f"{name}/{part}")
            assert (split_weights[node.input[1]] == weight[:, i * width:(i + 1) * width]).all()

    path = str(tmp_path / "int8.onnx")
    quantized = quantize_onnx(fp32, path, torch.randn(8, 3, 32, 32), float_reductions=0)
    proto = onnx.load(path)
    producers = _producers(proto)
    for name in scoring:
        for part in "qkv":
            node = next(n for n in proto.graph.node if n.name == f"{name}/{part}")
            sources = [producers.get(i) for i in node.input]
            if part in in_float:
                assert f"{name}/{part}" not in quantized
                assert sources[0].op_type == "LayerNormalization" and sources[1] is None, (part, sources)
            else:
                assert f"{name}/{part}" in quantized
                assert [s.op_type for s in sources] == ["DequantizeLinear", "DequantizeLinear"], part


def test_split_scoring_qkv_gives_a_bias_shared_by_two_blocks_one_part_each(tmp_path):
    """timm starts qkv biases at zero and the exporter keeps one initializer for equal constants:
    both blocks' qkv read one bias, whose parts are written once (onnxruntime would warn of
    duplicates and treat them as inputs)."""
    model = vitcompress.compress(tiny_vit(depth=2), "tome", r=8)
    fp32 = str(tmp_path / "fp32.onnx")
    export_onnx(model, fp32, (2, 3, 32, 32), verbose=False)
    split = onnx.load(fp32)
    biases = {n.input[1] for n in split.graph.node if n.op_type == "Add" and n.input[1].endswith("qkv.bias")}
    assert len(biases) == 1, "the exporter shares the equal biases"
    split_scoring_qkv(split)
    names = [i.name for i in split.graph.initializer]
    assert len(names) == len(set(names))
    assert sum(name.endswith(("/q.bias", "/k.bias", "/v.bias")) for name in names) == 3
    onnx.checker.check_model(split)
    onnx.save(split, str(tmp_path / "split.onnx"))
    x = torch.randn(3, 3, 32, 32).numpy()
    before = ort_session(fp32).run(None, {"images": x})[0]
    assert abs(ort_session(str(tmp_path / "split.onnx")).run(None, {"images": x})[0] - before).max() <= 1e-5


def test_split_scoring_qkv_cuts_the_heads_of_a_qkv_without_bias(tmp_path):
    """``qkv_bias=False``: each part reshapes to heads and transposes, with no Add, and the file
    computes the same."""
    model = vitcompress.compress(tiny_vit(depth=2, qkv_bias=False), "tome", r=8)
    fp32 = str(tmp_path / "fp32.onnx")
    export_onnx(model, fp32, (2, 3, 32, 32), verbose=False)
    split = onnx.load(fp32)
    assert len(split_scoring_qkv(split)) == 4
    producers = _producers(split)
    cuts = [n for n in split.graph.node if n.name.endswith("/reshape")]
    assert len(cuts) == 6 and all(producers[n.input[0]].op_type == "MatMul" for n in cuts)
    assert not [n for n in split.graph.node if n.op_type == "Concat" and n.name.endswith("/concat")]
    onnx.save(split, str(tmp_path / "split.onnx"))
    x = torch.randn(3, 3, 32, 32).numpy()
    before = ort_session(fp32).run(None, {"images": x})[0]
    assert abs(ort_session(str(tmp_path / "split.onnx")).run(None, {"images": x})[0] - before).max() <= 1e-5


def test_split_scoring_qkv_joins_the_parts_with_a_concat_when_attention_reads_the_fused_output(tmp_path):
    """A qkv whose output is not only cut into heads (here also summed into the scores) keeps one
    output: its parts are joined by a Concat, and the file computes the same."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    tokens, width = 7, 6
    weight = numpy_helper.from_array(rng.standard_normal((width, 3 * width)).astype(np.float32), "qkv.weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "qkv.weight"], ["qkv"], name="qkv"),
         helper.make_node("ReduceMean", ["qkv"], ["score"], axes=[-1], keepdims=0),
         helper.make_node("TopK", ["score", "k"], ["top", "top_index"], axis=-1),
         helper.make_node("Identity", ["qkv"], ["fused"])],
        "scoring", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, tokens, width])],
        [helper.make_tensor_value_info("top_index", TensorProto.INT64, [2, 3]),
         helper.make_tensor_value_info("fused", TensorProto.FLOAT, [2, tokens, 3 * width])],
        [weight, numpy_helper.from_array(np.array([3], dtype=np.int64), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, tokens, width)).astype(np.float32)
    onnx.save(model, str(tmp_path / "fused.onnx"))
    before = ort_session(str(tmp_path / "fused.onnx")).run(None, {"x": x})
    assert split_scoring_qkv(model) == ["qkv/q", "qkv/v"]
    assert [n.op_type for n in model.graph.node].count("Concat") == 1
    onnx.save(model, str(tmp_path / "split.onnx"))
    after = ort_session(str(tmp_path / "split.onnx")).run(None, {"x": x})
    assert (before[0] == after[0]).all() and abs(before[1] - after[1]).max() <= 1e-5


def test_onnx_gathers_token_rows_as_rows_without_an_expanded_index(tmp_path):
    """The exported graph keeps and merges token rows with ``Gather``s of flattened rows
    (``program_for_onnx``): no ``GatherElements`` over ``[B, K, C]`` and no index expanded to it
    but the merge's own (its ``ScatterElements``) -- onnxruntime spent longer expanding that int64
    index than gathering -- and the file computes the same."""
    model = vitcompress.compress(tiny_vit(depth=2), "tome", r=8)
    path = str(tmp_path / "tome.onnx")
    assert export_onnx(model, path, (2, 3, 32, 32), verbose=False).ok
    proto = onnx.shape_inference.infer_shapes(onnx.load(path))
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in proto.graph.value_info}
    int64 = {v.name for v in proto.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.INT64}
    consumers = defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            consumers[name].append(node.op_type)
    assert not [n.name for n in proto.graph.node if n.op_type == "GatherElements" and rank.get(n.output[0]) == 3]
    expanded = [(n.name, consumers[n.output[0]]) for n in proto.graph.node if n.op_type == "Expand"
                and n.output[0] in int64 and rank.get(n.output[0]) == 3]
    assert expanded and all(users == ["ScatterElements"] for _, users in expanded), expanded
    rows = [n for n in proto.graph.node if n.op_type == "Gather" and rank.get(n.output[0]) == 2]
    assert len(rows) >= 8  # kept and merged rows of x and of the token sizes, in both reducing blocks


def _ort_op_types(path):
    """Node name -> op type of the graph onnxruntime's CPU provider runs for the file at ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = path + ".optimized.onnx"
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return {n.name: n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


@pytest.mark.parametrize("method", ["tome", "zero_tprune"])
def test_int8_linear_layers_run_as_integer_matmuls_in_onnxruntime(tmp_path, method):
    """Every quantized MatMul, the split queries and values included, runs as onnxruntime's
    MatMulIntegerToFloat; the keys stay a float MatMul. With int8 activations the queries and
    values, which share their input, stayed float MatMuls over dequantized weights."""
    model = vitcompress.compress(tiny_vit(depth=2), method, r=8)
    fp32, path = str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx")
    export_onnx(model, fp32, (2, 3, 32, 32), verbose=False)
    quantized = quantize_onnx(fp32, path, torch.randn(8, 3, 32, 32), float_reductions=0)
    split = [n for n in quantized if n.endswith(("/q", "/v"))]
    assert len(split) == (4 if method == "tome" else 2)  # both blocks' queries and values, or values only
    ops = _ort_op_types(path)
    fp32_ops = {n.name: n.op_type for n in onnx.load(fp32).graph.node}
    matmuls = [n for n in quantized if fp32_ops.get(n, "MatMul") in ("MatMul", "Gemm")]
    assert len(matmuls) == len(quantized) - 1  # all but the patch embedding's Conv
    integer = {n: "QGemm" if fp32_ops.get(n) == "Gemm" else "MatMulIntegerToFloat" for n in matmuls}
    assert {n: ops.get(n) for n in matmuls} == integer
    keys = [n for n in ops if n.endswith("/k")]
    assert len(keys) == 2 and {ops[n] for n in keys} == {"MatMul"}


@pytest.mark.parametrize("r, expected", [
    # block 0 reduces: its selection sees the patch embedding and its own qkv; block 1's all of block 0
    ([8, 8, 8], {1: ["blocks.0.attn.qkv", "patch_embed.proj"],
                 2: ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
                     "blocks.1.attn.qkv", "patch_embed.proj"]}),
    # block 0 keeps every token: the first reduction (block 1's) already sees all of block 0
    ([0, 8, 8], {1: ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
                     "blocks.1.attn.qkv", "patch_embed.proj"]}),
])
def test_reduction_inputs_are_the_linear_layers_upstream_of_the_first_reductions(tmp_path, r, expected):
    model = vitcompress.compress(_distinct_biases(tiny_vit(depth=3)), "tome", r=r)
    fp32 = str(tmp_path / "fp32.onnx")
    export_onnx(model, fp32, (2, 3, 32, 32), verbose=False)
    proto = onnx.load(fp32)
    consumers = defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            consumers[name].append(node)
    by_name = {n.name: n for n in proto.graph.node}
    reductions = sum(1 for step in r if step)
    assert reduction_inputs(proto, 0) == []
    for count in range(1, reductions + 2):
        names = reduction_inputs(proto, count)
        assert names == [n for n in linear_nodes(proto) if n in set(names)]  # graph order
        layers = sorted(_layer_name(by_name[n], consumers) for n in names)
        if count in expected:
            assert layers == expected[count], count
        # a block's layers upstream of the last reduction: every block before it and its own qkv
        last = [i for i, step in enumerate(r) if step][min(count, reductions) - 1]
        assert layers == sorted(["patch_embed.proj"] + [f"blocks.{b}.{layer}" for b in range(last)
                                for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
                                + [f"blocks.{last}.attn.qkv"]), count
    with pytest.raises(ValueError, match="float_reductions=-1"):
        quantize_onnx(fp32, str(tmp_path / "int8.onnx"), torch.randn(8, 3, 32, 32), float_reductions=-1)
    with pytest.raises(ValueError, match="float_reductions=True"):
        export_onnx(model, str(tmp_path / "x.onnx"), (2, 3, 32, 32), quantize="int8", float_reductions=True,
                    verbose=False)


def test_quantize_onnx_lists_only_layers_with_a_constant_weight(tmp_path):
    model = vitcompress.compress(tiny_vit(depth=1), "tome", r=8)
    fp32 = str(tmp_path / "fp32.onnx")
    export_onnx(model, fp32, (2, 3, 32, 32), verbose=False)
    proto = onnx.load(fp32)
    names = linear_nodes(proto)
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    assert len(names) == 4 + 2 and len(matmuls) > 4  # attention and similarity MatMuls are left out
    int8 = str(tmp_path / "int8.onnx")
    scoring = sorted(set(names) - set(linear_nodes(proto, scoring=False)))
    assert len(scoring) == 1  # the qkv projection of the one (reducing) block
    # and of that qkv, split, the queries and values (tome scores with the keys)
    assert quantize_onnx(fp32, int8, torch.randn(8, 3, 32, 32), float_reductions=0) == [
        n for n in names if n not in scoring] + [f"{scoring[0]}/q", f"{scoring[0]}/v"]
    # an independent check of the file: int8 error is small next to the logits, at two batch sizes
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        result = verify_onnx(ort_session(int8), model, x)
        with torch.no_grad():
            scale = model(x).abs().max().item()
        assert 0 < result["max_abs_diff"] < 0.1 * scale


def test_bad_edge_arguments(tmp_path):
    model = vitcompress.compress(tiny_vit(depth=1), "tome", r=8)
    path = str(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="only quantization is 'int8'"):
        export_onnx(model, path, (1, 3, 32, 32), quantize="int4", verbose=False)
    with pytest.raises(ValueError, match="runtime='tensorrt'"):
        export_onnx(model, path, (1, 3, 32, 32), runtime="tensorrt", verbose=False)
    with pytest.raises(ValueError, match="drop runtime='openvino'"):
        export_onnx(model, path, (1, 3, 32, 32), quantize="int8", runtime="openvino", verbose=False)
    with pytest.raises(ValueError, match="only serve quantize='int8'"):
        export_onnx(model, path, (1, 3, 32, 32), calibration=torch.zeros(4, 3, 32, 32), verbose=False)
    with pytest.raises(ValueError, match=r"calibration= has shape \(4, 3, 16, 16\)"):
        export_onnx(model, path, (1, 3, 32, 32), quantize="int8", calibration=torch.zeros(4, 3, 16, 16),
                    verbose=False)
    with pytest.raises(ValueError, match="calibration=0: give images"):
        export_onnx(model, path, (1, 3, 32, 32), quantize="int8", calibration=0, verbose=False)
    with pytest.raises(ValueError, match="5 calibration images do not fill whole batches of 2"):
        export_onnx(model, path, (2, 3, 32, 32), quantize="int8", calibration=5, dynamic_batch=False, verbose=False)
    missing = tmp_path / "typo" / "m.onnx"  # as the CLI: a missing folder is refused, not created
    with pytest.raises(ValueError, match=r"folder .*typo does not exist; create it first \(mkdir -p"):
        export_onnx(model, str(missing), (1, 3, 32, 32), verbose=False)
    assert not os.path.exists(path) and not missing.parent.exists()


def test_int8_calibration_by_count_is_described_once_as_random():
    from vitcompress.export.int8 import calibration_images

    images, described = calibration_images(5, (2, 3, 8, 8))
    assert images.shape == (5, 3, 8, 8) and described.startswith("5 random-normal inputs")
    again, _ = calibration_images(5, (2, 3, 8, 8))
    assert torch.equal(images, again)  # seeded: the same file from the same command
    given, described = calibration_images(images[:3], (2, 3, 8, 8))
    assert given is not None and described == "3 given images"


def test_fp32_report_says_how_many_images_were_within_the_tolerance():
    from vitcompress.export.report import ExportReport

    per_image = torch.full((512,), 1e-6)
    per_image[7] = 0.437  # one image whose near-tied token choice flipped
    report = ExportReport(path="m.onnx", opset=18, input_shape=(16, 3, 32, 32), dynamic_batch=True, method="tome",
                          nodes=1, op_counts={}, scatter_reductions={}, runtime="openvino",
                          checks={"real images, batch 16": {"max_abs_diff": 0.437, "median_abs_diff": 1e-6,
                                                            "per_image": per_image, "images": 512}})
    assert report.ok
    assert "OK: 511 of 512 images within 0.0001 (>= 99% of each check needed); max abs diff 0.437" in str(report)
    per_image[:10] = 0.5
    assert not report.ok and "MISMATCH: 502 of 512 images" in str(report)


def test_cli_refuses_bad_edge_combinations(capsys):
    from vitcompress import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["export", "--quantize", "int8", "--runtime", "openvino"])
    assert exit_info.value.code == 2 and "drop --runtime openvino" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["export", "--calibration-images", "32"])
    assert "--calibration-images applies to --quantize int8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["export", "--quantize", "int8", "--static-batch", "--batch-size", "128"])
    assert "--calibration-images 64 does not fill whole batches of 128" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["export", "--float-reductions", "1"])
    assert "--float-reductions applies to --quantize int8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["export", "--quantize", "int8", "--float-reductions", "-1"])
    assert "--float-reductions 2" in capsys.readouterr().err
    args = cli.parse_args(["export", "--quantize", "int8", "--calibration-images", "32", "--float-reductions", "0"])
    assert args.quantize == "int8" and args.calibration_images == 32 and args.min_agreement == 0.99
    assert args.float_reductions == 0


# --------------------------------------------------------------------------- slow: acceptance


def _reference():
    from vitcompress.evaluation import reference_model as reference

    if not os.path.isfile(os.path.join(reference.data_dir(), reference.MODEL_FILE)):
        pytest.skip("reference model data not present")
    return reference


#: measured (vitcompress 0.3, onnxruntime 1.32): int8 top-1 agreement with the fp32 PyTorch model on
#: the 3,000 reference images at 65% FLOPs -- uncompressed 99.77%, tome 99.90%, pitome 99.43%,
#: zero_tprune 99.53%; with float_reductions=0 (every non-scoring linear layer int8) tome 99.40%,
#: pitome 97.33%, zero_tprune 98.83%.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["none"] + list(STATIC_METHODS))
def test_int8_top1_agreement_on_the_3000_reference_images(tmp_path, method):
    """Each static method at 65% FLOPs, int8, against its own fp32 PyTorch model; "none" (the
    uncompressed int8 file) is the comparison point."""
    reference = _reference()
    model, images, _ = reference.load()
    assert len(images) == 3000
    if method != "none":
        vitcompress.compress(model, method, flops=0.65)
    report = export_onnx(model, str(tmp_path / f"{method}.onnx"), (8,) + tuple(images.shape[1:]),
                         quantize="int8", calibration=images[:64], inputs=images, verbose=False)
    check = report.checks["real images, batch 8"]
    print(f"int8 {method}: top-1 agreement with fp32 PyTorch {100 * check['top1_agreement']:.2f}% on "
          f"{check['images']} images, max abs diff {check['max_abs_diff']:.3g}")
    assert report.judged("real images, batch 8") and check["images"] == 3000
    assert check["top1_agreement"] >= 0.99 and report.ok


@pytest.mark.slow
@pytest.mark.parametrize("method", STATIC_METHODS)
def test_executorch_matches_pytorch_at_two_batch_sizes(tmp_path, method):
    pytest.importorskip("executorch")
    from vitcompress.export import export_executorch

    model = vitcompress.compress(tiny_vit(depth=2), method)
    path = str(tmp_path / f"{method}.pte")
    report = export_executorch(model, path, (2, 3, 32, 32), max_batch=8, check_batches=(1, 5), verbose=False)
    assert os.path.getsize(path) > 0 and report.delegated > 0
    # attention and layer norm run in XNNPACK, not in the portable kernels (the rewrites above);
    # torch's safe softmax would leave any / where / logical_not (zero_tprune uses them itself)
    left = {op.split(".")[1] for op in report.portable_ops}
    assert not left & {"native_layer_norm", "_safe_softmax", "_softmax"}, left
    # tofu's MLERP picks the merged rows with any / where; ppt chooses pooling or pruning per image with
    # where; atc's clustering relabels and masks its clusters with where / logical_not
    if method not in ("zero_tprune", "tofu", "ppt", "atc"):
        assert not left & {"any", "where", "logical_not"}, left
    assert "outside XNNPACK: " in str(report)
    assert sorted(report.checks) == ["random, batch 1", "random, batch 5"]
    assert report.ok and report.max_abs_diff <= ATOL, str(report)


def test_executorch_bad_arguments(tmp_path):
    pytest.importorskip("executorch")
    from vitcompress.export import export_executorch

    model = vitcompress.compress(tiny_vit(depth=1), "tome", r=8)
    with pytest.raises(ValueError, match=r"\.pte files"):
        export_executorch(model, str(tmp_path / "m.onnx"), (2, 3, 32, 32), verbose=False)
    with pytest.raises(ValueError, match="max_batch=2: give an int >= 4"):
        export_executorch(model, str(tmp_path / "m.pte"), (4, 3, 32, 32), max_batch=2, verbose=False)
    assert not (tmp_path / "m.pte").exists()


def test_executorch_stable_sort_rewrite_matches_torch_sort():
    """The core-ATen sort used for ExecuTorch keeps ties in index order, like torch.sort(stable=True)."""
    from vitcompress.export.executorch_export import _sort_by_ranks

    torch.manual_seed(0)
    x = (torch.randn(3, 5, 40) * 2).round()  # many ties
    for dim in (-1, 1):
        for descending in (False, True):
            values, indices = _sort_by_ranks(x, True, dim, descending)
            expected = torch.sort(x, dim=dim, descending=descending, stable=True)
            assert torch.equal(indices, expected.indices) and torch.equal(values, expected.values)


@pytest.mark.parametrize("mask", [None, "float", "bool"])
@pytest.mark.parametrize("tokens", [1, 50, 197])
def test_executorch_attention_rewrite_matches_torch(mask, tokens):
    """The attention XNNPACK delegates equals torch's scaled_dot_product_attention (no mask, the
    additive bias of proportional attention / relative positions, a boolean mask with no fully
    masked row), with and without an explicit scale."""
    from vitcompress.export.executorch_export import _attention_for_xnnpack

    torch.manual_seed(tokens)
    q, k, v = (torch.randn(2, 3, tokens, 24) for _ in range(3))
    attn_mask = {None: None, "float": torch.randn(2, 1, tokens, tokens),
                 "bool": torch.rand(2, 3, tokens, tokens) > 0.3}[mask]
    if mask == "bool":
        attn_mask[..., 0] = True
    for scale in (None, 0.3):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        assert torch.allclose(_attention_for_xnnpack(q, k, v, attn_mask, scale=scale), expected, atol=1e-5)
    with pytest.raises(NotImplementedError, match="causal"):
        _attention_for_xnnpack(q, k, v, is_causal=True)


def test_executorch_layer_norm_rewrite_matches_torch():
    from vitcompress.export.executorch_export import _layer_norm_for_xnnpack

    torch.manual_seed(0)
    x = torch.randn(2, 197, 37) * 3 + 1
    weight, bias = torch.randn(37), torch.randn(37)
    for w, b in ((weight, bias), (weight, None), (None, None)):
        expected = torch.nn.functional.layer_norm(x, (37,), w, b, eps=1e-6)
        assert torch.allclose(_layer_norm_for_xnnpack(x, (37,), w, b, 1e-6), expected, atol=1e-5)
    with pytest.raises(NotImplementedError, match="last dimension"):
        _layer_norm_for_xnnpack(x, (197, 37))


class _StableArgsort(torch.nn.Module):
    def __init__(self, descending):
        super().__init__()
        self.descending = descending

    def forward(self, alive):
        return torch.argsort((~alive).to(torch.int8), dim=1, stable=True, descending=self.descending)


@pytest.mark.parametrize("descending", [False, True])
def test_stable_sort_of_tied_integer_keys_is_torchs_in_onnxruntime_and_openvino(tmp_path, descending):
    """atc sorts its 0/1 alive flags (all ties) with a stable argsort: the ONNX graph makes the keys
    unique first, so OpenVINO -- whose TopK orders ties otherwise -- returns torch's order too."""
    from vitcompress.export.onnx_export import _translations

    alive = torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) > 0.3
    module = _StableArgsort(descending)
    program = torch.export.export(module, (alive,), strict=False)
    path = str(tmp_path / "sort.onnx")
    torch.onnx.export(program, dynamo=True, custom_translation_table=_translations(), verbose=False).save(path)
    expected = module(alive).numpy()
    assert (ort_session(path).run(None, {"alive": alive.numpy()})[0] == expected).all()
    pytest.importorskip("openvino")
    assert (np.asarray(openvino_session(path).run(None, {"alive": alive.numpy()})[0]) == expected).all()
