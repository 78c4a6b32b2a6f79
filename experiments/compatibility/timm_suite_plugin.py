"""pytest plugin for timm's ``tests/test_models.py`` (loaded by ``timm_suite.py`` with ``-p``): keeps the
tests of the chosen models, compresses every model ``timm.create_model`` makes right after creation,
and writes each test's outcome, a failure recognised as a documented refusal by its one-line message.

Options: ``--vc-models`` (comma-separated timm model names: a test runs when its ``model_name`` is one of
them, a pretrained tag ignored), ``--vc-tests`` (comma-separated timm test functions, all when empty),
``--vc-method`` / ``--vc-options`` (a method and its options as JSON; no method: plain timm),
``--vc-results`` (a JSON file: one record per test).
"""
import json
import re

import pytest

# What vitcompress refuses, each with the one line it refuses with (matched at the message's start).
REFUSALS = {
    "torch.jit.script": r"torch\.jit\.script cannot compile a model compressed by vitcompress",
    "torch.fx tracing": r"torch\.fx symbolic tracing cannot trace a model compressed by vitcompress",
    "gradient checkpointing": r"gradient checkpointing re-runs (blocks|layers) in backward without the token state",
    "NCHW intermediates": r"forward_intermediates on a compressed model needs output_fmt='NLC'",
    "model not supported": r"vitcompress does not compress this model",
}

# timm's tests that load pretrained weights (and compare their outputs): not run, there is no model hub here
# and a compressed model's outputs are not the reference outputs anyway.
PRETRAINED_TESTS = {"test_model_inference", "test_model_load_pretrained", "test_model_features_pretrained"}


def pytest_addoption(parser):
    group = parser.getgroup("vitcompress")
    group.addoption("--vc-models", default="", help="comma-separated timm model names to run the tests of")
    group.addoption("--vc-tests", default="", help="comma-separated timm test functions (all when empty)")
    group.addoption("--vc-method", default="", help="compress every created model with this method")
    group.addoption("--vc-options", default="{}", help="the method's options, as JSON")
    group.addoption("--vc-results", default="", help="write each test's outcome to this JSON file")


def pytest_configure(config):
    method = config.getoption("--vc-method")
    if method:
        _compress_at_creation(method, json.loads(config.getoption("--vc-options")))
    config.pluginmanager.register(_Outcomes(config.getoption("--vc-results")), "vitcompress-outcomes")


def _compress_at_creation(method: str, options: dict) -> None:
    """``timm.create_model`` compresses what it creates (the model inside a ``features_only`` getter); a
    model (or a budget) ``compress`` refuses raises with its reason. Set before timm's test module
    imports ``create_model`` from timm."""
    import timm
    import timm.models
    from timm.models._features import FeatureGetterNet

    import vitcompress

    create_model = timm.create_model

    def create_compressed_model(*args, **kwargs):
        model = create_model(*args, **kwargs)
        target = model.model if isinstance(model, FeatureGetterNet) else model
        try:
            vitcompress.compress(target, method, **options)
        except (TypeError, ValueError) as err:  # compress's refusals
            raise RuntimeError(f"vitcompress does not compress this model: {err}") from err
        return model

    timm.create_model = timm.models.create_model = create_compressed_model


def pytest_collection_modifyitems(config, items):
    models = set(filter(None, config.getoption("--vc-models").split(",")))
    tests = set(filter(None, config.getoption("--vc-tests").split(",")))
    kept, dropped = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        model = params.params.get("model_name") if params is not None else None
        name = item.originalname
        chosen = (isinstance(model, str) and model.split(".")[0] in models and name not in PRETRAINED_TESTS
                  and (not tests or name in tests))
        (kept if chosen else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def first_line(error: BaseException) -> str:
    return next(iter(str(error).strip().splitlines()), "")


def refusal_of(error: BaseException):
    """The documented refusal ``error`` (or an exception it was raised from) is, else None."""
    while error is not None:
        for name, pattern in REFUSALS.items():
            if re.match(pattern, first_line(error)):
                return name
        error = error.__cause__
    return None


class _Outcomes:
    """Each test's outcome (passed / refused / failed / skipped), written at the end of the session."""

    def __init__(self, path: str):
        self.path = path
        self.records = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        if report.when != "call" and report.passed:
            return
        record = {"test": item.originalname, "model": item.callspec.params["model_name"], "outcome": report.outcome}
        if report.failed:
            error = call.excinfo.value
            refusal = refusal_of(error)
            record["outcome"] = "failed" if refusal is None else "refused"
            record["refusal"] = refusal
            record["message"] = f"{type(error).__name__}: {first_line(error)}"
        elif report.skipped:
            record["message"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        if item.nodeid not in self.records or self.records[item.nodeid]["outcome"] == "passed":
            self.records[item.nodeid] = record

    def pytest_sessionfinish(self, session):
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.records, f, indent=1)
