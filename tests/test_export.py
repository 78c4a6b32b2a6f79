"""ONNX and torch.export of compressed models (issue 9).

Each (model, method) is captured once (torch.export, dynamic batch) and converted once; the tests
share that. Capture and conversion cost about 5 s of CPU per compressed block, so the default run
checks every method on a 2-block ViT, and the acceptance checks on the 12-block
deit_tiny_patch16_224 (and the CLI on the reference model) are ``slow``:
``python -m pytest -m slow tests/test_export.py``.
"""
import copy
import os

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import timm  # noqa: E402

import vitcompress  # noqa: E402
from vitcompress.export import export_onnx, export_program, scatter_reductions  # noqa: E402
from vitcompress.methods import REGISTRY, get as get_method  # noqa: E402
from vitcompress.interfaces import ViTMethod as Method  # noqa: E402
from vitcompress.engine.tokens import Plan  # noqa: E402

from vitcompress.testing import tiny_vit  # noqa: E402

ATOL = 1e-4
STATIC_METHODS = [m for m in vitcompress.list_methods("vit") if not get_method(m).dynamic]
MODELS = {  # name -> (constructor, image shape)
    "tiny": (lambda: tiny_vit(depth=2), (3, 32, 32)),
    "deit_tiny_patch16_224": (lambda: timm.create_model("deit_tiny_patch16_224").eval(), (3, 224, 224)),
}
CASES = [pytest.param("tiny", m, id=f"tiny-{m}") for m in STATIC_METHODS] + [
    pytest.param("deit_tiny_patch16_224", m, id=f"deit_tiny-{m}", marks=pytest.mark.slow) for m in STATIC_METHODS]


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _all_nodes(model):
    def walk(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                for g in attr.graphs:
                    yield from walk(g)
    yield from walk(model.graph)
    for fn in model.functions:
        yield from fn.node


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model name, method) -> (compressed model, ExportedProgram, ExportReport, onnx path), built once."""
    cache = {}

    def get(name, method):
        if (name, method) not in cache:
            make, image = MODELS[name]
            torch.manual_seed(0)
            model = vitcompress.compress(make(), method)  # the method's default budget
            program = export_program(model, (2,) + image)
            path = str(tmp_path_factory.mktemp("onnx") / f"{name}-{method}.onnx")
            report = export_onnx(model, path, (2,) + image, program=program, verbose=False)
            cache[name, method] = model, program, report, path
        return cache[name, method]

    return get


@pytest.mark.parametrize("name, method", CASES)
def test_onnxruntime_matches_pytorch_at_two_batch_sizes(exported, name, method):
    model, _, report, path = exported(name, method)
    image = MODELS[name][1]
    session = _session(path)
    assert sum(vitcompress.stats(model)["schedule"]) > 0, "the exported model is compressed"
    torch.manual_seed(1)
    for batch in (1, 4):  # neither is the traced batch (2)
        x = torch.randn((batch,) + image)
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert out.shape == ref.shape and out.shape[0] == batch
        diff = (out - ref).abs().max().item()
        if diff > ATOL:  # a near-tie (pitome, deit_tiny, batch 1): the choice float64 arithmetic makes
            with torch.no_grad():
                ref = copy.deepcopy(model).double()(x.double()).float()
            diff = (out - ref).abs().max().item()
        assert diff <= ATOL, f"{name} {method}, batch {batch}: onnxruntime differs from PyTorch by {diff:.3g}"
    # export_onnx's own check ran at batches 1 and 2
    assert report.ok and report.max_abs_diff <= ATOL
    assert sorted(report.checks) == ["random, batch 1", "random, batch 2"]


@pytest.mark.parametrize("name, method", CASES)
def test_graph_has_no_mean_scatter_and_a_dynamic_batch(exported, name, method):
    _, _, report, path = exported(name, method)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    scatters = [n for n in _all_nodes(model) if n.op_type.startswith("Scatter")]
    reductions = [a.s.decode() for n in scatters for a in n.attribute if a.name == "reduction"]
    assert "mean" not in reductions
    if get_method(method).kind == "merge":  # the size-weighted merge is a scatter-add
        assert reductions.count("add") > 0
        assert scatter_reductions(path)[("ScatterElements", "add")] == reductions.count("add")
    assert not any(n.op_type == "ScatterReduce" for n in _all_nodes(model))
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17 and report.opset == opset
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value"), "batch dimension is dynamic"
    assert tuple(d.dim_value for d in dims[1:]) == MODELS[name][1]


@pytest.mark.parametrize("name, method", CASES)
def test_torch_export_program(exported, name, method):
    model, program, _, _ = exported(name, method)
    image = MODELS[name][1]
    assert isinstance(program, torch.export.ExportedProgram)
    module = program.module()
    torch.manual_seed(2)
    for batch in (1, 3):
        x = torch.randn((batch,) + image)
        with torch.no_grad():
            torch.testing.assert_close(module(x), model(x), atol=1e-5, rtol=1e-5)
    # the capture left no fake tensors behind: the model still runs and reports its own stats
    with torch.no_grad():
        model(torch.randn((1,) + image))
    stats = vitcompress.stats(model)
    assert stats["tokens_per_layer"] == stats["planned_tokens_per_layer"]


class _Sort(torch.nn.Module):
    """Stable sorts with many ties, both directions (scores rounded to halves)."""

    def forward(self, x):
        s = (x.flatten(1) * 2).round()
        down = torch.sort(s, dim=-1, descending=True, stable=True).indices
        up = torch.sort(s, dim=-1, descending=False, stable=True).indices
        return torch.cat([down, up], dim=1).float()


def test_stable_sort_exports_as_topk_with_the_same_tie_order(tmp_path):
    path = str(tmp_path / "sort.onnx")
    report = export_onnx(_Sort(), path, (3, 1, 4, 16), check_batches=(1, 5), verbose=False)
    assert report.ok and report.max_abs_diff == 0.0  # identical indices, ties included
    assert report.op_counts.get("TopK") == 2


class _Dynamic(Method):
    """A content-dependent method, registered only inside the test."""

    name = "test_dynamic_budget"
    kind = "prune"
    dynamic = True

    def plan(self, signals, remove, options):
        T = signals.metric.shape[1]
        return Plan(keep=torch.arange(T - remove).expand(signals.metric.shape[0], -1))


def test_dynamic_method_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, _Dynamic.name, _Dynamic())
    model = vitcompress.compress(tiny_vit(), _Dynamic.name, keep=0.9)
    path = tmp_path / "dynamic.onnx"
    with pytest.raises(ValueError, match="test_dynamic_budget.*content"):
        export_onnx(model, str(path), (2, 3, 32, 32), verbose=False)
    with pytest.raises(ValueError, match="test_dynamic_budget"):
        export_program(model, (2, 3, 32, 32))
    assert not path.exists()
    assert all(not get_method(m).dynamic for m in ("tome", "pitome"))


def test_the_cli_refuses_a_dynamic_method_with_the_same_check(monkeypatch, capsys):
    """One exportable check: ``vitcompress export --method`` refuses what export_onnx refuses, in its words."""
    from vitcompress import cli
    from vitcompress.export import check_exportable_method

    monkeypatch.setitem(REGISTRY, _Dynamic.name, _Dynamic())
    with pytest.raises(ValueError) as refused:
        check_exportable_method(get_method(_Dynamic.name))
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["export", "--method", _Dynamic.name])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"vitcompress export: error: {' '.join(str(refused.value).split())}\n"


def test_bad_arguments(tmp_path):
    model = vitcompress.compress(tiny_vit(), "tome", r=4)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, str(tmp_path / "m.onnx"), (1, 3, 32, 32), opset=13, verbose=False)
    with pytest.raises(ValueError, match="input_shape"):
        export_onnx(model, str(tmp_path / "m.onnx"), (3, 32, 32), verbose=False)
    # refused before the export, naming the fix
    with pytest.raises(ValueError, match="is a directory"):
        export_onnx(model, str(tmp_path), (1, 3, 32, 32), verbose=False)
    with pytest.raises(ValueError, match="no images to check"):
        export_onnx(model, str(tmp_path / "m.onnx"), (1, 3, 32, 32), inputs=torch.zeros(0, 3, 32, 32), verbose=False)
    with pytest.raises(ValueError, match="whole batches of 8"):
        export_onnx(model, str(tmp_path / "m.onnx"), (8, 3, 32, 32), dynamic_batch=False,
                    inputs=torch.zeros(20, 3, 32, 32), verbose=False)
    assert not (tmp_path / "m.onnx").exists()


def test_detection_and_llava_methods_are_refused():
    pytest.importorskip("transformers")
    from vitcompress.testing import tiny_detr
    detr = vitcompress.compress(tiny_detr(), "focus_detr")
    static = ", ".join(m for m in vitcompress.list_methods("vit") if not vitcompress.describe(m)["dynamic"])
    with pytest.raises(ValueError, match=f"export covers ViT-like image models .* compressed with {static};"):
        export_program(detr, (1, 3, 64, 64))


def test_a_static_program_exports_a_static_batch(tmp_path):
    model = vitcompress.compress(tiny_vit(depth=1), "tome", r=8)
    program = export_program(model, (2, 3, 32, 32), dynamic_batch=False)
    report = export_onnx(model, str(tmp_path / "static.onnx"), (2, 3, 32, 32), program=program, verbose=False)
    assert report.dynamic_batch is False and list(report.checks) == ["random, batch 2"] and report.ok


def test_onnxruntime_threads_sleep_when_idle(tmp_path):
    """Spinning idle threads would slow down a PyTorch model timed in the same loop."""
    from vitcompress.export import ort_session
    model = vitcompress.compress(tiny_vit(depth=1), "tome", r=8)
    report = export_onnx(model, str(tmp_path / "m.onnx"), (1, 3, 32, 32), verbose=False)
    options = ort_session(report.path).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.slow
def test_cli_exports_the_reference_model_and_checks_it_on_real_images(tmp_path, capsys):
    from vitcompress import cli
    from vitcompress.evaluation import reference_model as reference

    if not os.path.isfile(os.path.join(reference.data_dir(), reference.MODEL_FILE)):
        pytest.skip("reference model data not present")
    out = tmp_path / "reference-pitome.onnx"
    rc = cli.main(["export", "--method", "pitome", "--flops", "0.7", "--num-images", "256", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.exists()
    assert "real images, batch 8" in text and "max abs diff" in text and "OK" in text


def test_opset_17(tmp_path):
    model = vitcompress.compress(tiny_vit(depth=1), "tome", r=8)
    path = str(tmp_path / "opset17.onnx")
    report = export_onnx(model, path, (2, 3, 32, 32), opset=17, verbose=False)
    written = onnx.load(path)
    assert max(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert report.opset == 17 and report.ok and report.max_abs_diff <= ATOL
