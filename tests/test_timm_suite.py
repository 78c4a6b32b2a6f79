"""experiments/compatibility/timm_suite.py: timm's own model tests on compressed models. The default run
takes timm's test ViT, every static method and five of timm's test functions; ``-m slow`` runs the whole
suite. Skipped when timm's source distribution cannot be had (PyPI unreachable, no tests in it)."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "experiments" / "compatibility"


def load(name):
    spec = importlib.util.spec_from_file_location(name, FOLDER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


suite = load("timm_suite")
plugin = load("timm_suite_plugin")


@pytest.fixture(scope="module")
def cache():
    """The script's own cache, timm's tests fetched into it (or the test skipped, saying why)."""
    path = suite.default_cache()
    path.mkdir(parents=True, exist_ok=True)
    try:
        suite.fetch_tests(importlib.metadata.version("timm"), path)
    except suite.SuiteUnavailable as err:
        pytest.skip(str(err))
    return path


def run_suite(cache, out, *args):
    return subprocess.run([sys.executable, str(FOLDER / "timm_suite.py"), "--cache", str(cache), "--out", str(out),
                           *args], capture_output=True, text=True)


def rows(report: str) -> dict:
    """First cell -> the other cells, of every markdown table row."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in report.splitlines()
             if line.startswith("|") and not line.startswith("|---")]
    return {row[0]: row[1:] for row in cells}


def test_a_reduced_suite_passes_or_refuses_every_test(cache, tmp_path):
    tests = ["test_model_forward", "test_model_backward", "test_model_forward_fx", "test_model_forward_torchscript",
             "test_model_forward_intermediates"]
    out = tmp_path / "table.md"
    done = run_suite(cache, out, "--models", "test_vit", "--tests", ",".join(tests), "--jobs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len([line for line in done.stdout.splitlines() if line.startswith("timm_suite: [")]) == 4  # progress
    table = rows(out.read_text())
    assert table["timm test"] == ["plain", "tome r=2", "pitome keep=0.9", "zero_tprune flops=0.8"]
    for test in tests:
        assert table[f"`{test}`"][0] == "1 passed"
    for method in table["timm test"][1:]:
        column = table["timm test"].index(method)
        assert table["`test_model_forward`"][column] == "1 passed"  # its set_grad_checkpointing() refused, caught
        assert table["`test_model_backward`"][column] == "1 passed"
        for refused in ("`test_model_forward_fx`", "`test_model_forward_torchscript`",
                        "`test_model_forward_intermediates`"):
            assert table[refused][column] == "1 refused"
        assert table[method] == ["2", "3", "0"]  # of the tests passing on plain timm: passed, refused, failed
    assert table["torch.fx tracing"] == table["torch.jit.script"] == table["NCHW intermediates"] == ["1", "1", "1"]


@pytest.mark.slow
def test_the_whole_suite_passes_or_refuses_every_test(cache, tmp_path):
    done = run_suite(cache, tmp_path / "table.md")
    assert done.returncode == 0, done.stdout + done.stderr + (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("message,refusal", [
    ("torch.jit.script cannot compile a model compressed by vitcompress (its blocks ...", "torch.jit.script"),
    ("torch.fx symbolic tracing cannot trace a model compressed by vitcompress (the ...", "torch.fx tracing"),
    ("gradient checkpointing re-runs layers in backward without the token state of ...", "gradient checkpointing"),
    ("forward_intermediates on a compressed model needs output_fmt='NLC' (timm's ...", "NCHW intermediates"),
    ("vitcompress does not compress this model: block 0 of this VisionTransformer ...", "model not supported"),
    ("a compressed model cannot take attn_mask/is_causal (token reduction changes ...", None),
    ("bmm(): functions with out=... arguments don't support automatic differentiation", None),
])
def test_refusals_are_recognised_by_their_message(message, refusal):
    assert plugin.refusal_of(RuntimeError(message)) == refusal
    try:  # a refusal re-raised from another error is still the refusal
        raise ValueError("while tracing") from RuntimeError(message)
    except ValueError as err:
        assert plugin.refusal_of(err) == refusal


def test_only_a_failure_of_a_test_passing_plain_is_unexpected():
    def record(outcome):
        return {"test": "test_x", "model": "m", "outcome": outcome}
    plain = {"a": record("passed"), "b": record("failed"), "c": record("passed"), "d": record("passed")}
    runs = {"tome": {"a": record("failed"), "b": record("failed"), "c": record("refused"), "d": record("passed")}}
    assert suite.unexpected(plain, runs) == {"tome": {"a": record("failed")}}


def test_the_runs_import_this_checkout_s_vitcompress_and_nothing_else_of_it(tmp_path):
    linked, plugin_folder = suite.import_path(tmp_path).split(os.pathsep)
    assert [p.name for p in Path(linked).iterdir()] == ["vitcompress"]
    assert (Path(linked) / "vitcompress").resolve() == (ROOT / "vitcompress").resolve()
    assert Path(plugin_folder) == FOLDER and not (FOLDER / "__init__.py").exists()
