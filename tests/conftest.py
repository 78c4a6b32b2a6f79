import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from typing import Any, Dict, NamedTuple

import pytest
import timm
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def deit_small():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224").eval()


def load_script(path: str):
    """The experiment script ``experiments/<path>`` as a module (its ``main`` not run), for tests
    of the script itself; loaded by path, so nothing is added to ``sys.path``."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, EXPERIMENTS / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: the two halves of a kernel test file, each run in its own interpreted process: the default run
#: takes the first, ``-m slow`` the second, and a run without ``-m`` both
INTERPRETED_SELECTIONS = ["not slow", pytest.param("slow", marks=pytest.mark.slow)]
_interpreted_runs = {}  # selection -> the finished process


def run_interpreted(request, path: str, selection: str) -> None:
    """Run the tests of the file ``path`` selected by the marker expression ``selection`` in a
    fresh process that has ``TRITON_INTERPRET=1`` from the start: Triton decides at import whether
    its own library is interpreted, and timm imports it before any test file can set the variable.
    The files of every such runner collected in this session go into one process (one start-up,
    not one per file), whose result each runner reports."""
    runs = _interpreted_runs
    if selection not in runs:
        files = sorted({str(item.path) for item in request.session.items
                        if getattr(item, "originalname", "").endswith("_in_an_interpreted_process")
                        and getattr(item, "callspec", None) is not None
                        and item.callspec.params.get("selection") == selection} | {str(path)})
        env = dict(os.environ, TRITON_INTERPRET="1")
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-m", selection]
        runs[selection] = subprocess.run(args, env=env, cwd=str(request.config.rootpath), capture_output=True,
                                         text=True)
    done = runs[selection]
    if done.returncode == 5:  # nothing selected
        return
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    print(done.stdout.strip().splitlines()[-1])


def interpreted_process_runner(path: str, in_subprocess: bool):
    """For the kernel test file ``path``: an autouse fixture that skips its tests in this process
    when ``in_subprocess`` (Triton was imported here without ``TRITON_INTERPRET``), and the test
    that runs them in an interpreted process instead (:func:`run_interpreted`), once per selection.
    The file binds both, the test as ``<file name>_in_an_interpreted_process``."""
    runner = Path(path).stem + "_in_an_interpreted_process"

    @pytest.fixture(autouse=True)
    def skipped_here(request):
        if in_subprocess and request.node.originalname != runner:
            pytest.skip(f"runs in {runner} (TRITON_INTERPRET=1 from the start)")

    @pytest.mark.skipif(not in_subprocess, reason="the kernels run in this process")
    @pytest.mark.parametrize("selection", INTERPRETED_SELECTIONS)
    def test_in_an_interpreted_process(request, selection):
        run_interpreted(request, path, selection)

    return skipped_here, test_in_an_interpreted_process


# --------------------------------------------------------------------------- a VLM's language model with tokens masked


def dropped_per_layer(stats, visual, depth: int):
    """From a language-model method's ``stats`` (its ``stages``' kept positions) and the prompt's
    ``visual[B, T]`` tokens: per layer, ``[B, T]`` bool, the visual tokens no longer present there."""
    out, present = {}, visual.clone()
    stages = {s["layer"]: s for s in stats["stages"]}
    for layer in range(depth):
        if layer in stages:
            present = torch.zeros_like(visual)
            for b, kept in enumerate(stages[layer]["kept"]):
                present[b, kept] = True
        out[layer] = visual & ~present
    return out


def masking_hooks(layers, dropped):
    """The independent reference of dropping tokens inside a language model: pre-hooks on its decoder
    ``layers`` making each layer's queries ignore that layer's ``dropped`` tokens (columns < the prompt
    length), nothing gathered. Returns the handles."""
    handles = []
    for layer, block in enumerate(layers):
        def hook(module, args, kwargs, drop=dropped[layer]):
            if not drop.any():
                return None
            queries = args[0].shape[1]
            mask = kwargs.get("attention_mask")
            keys = mask.shape[-1] if mask is not None else kwargs["cache"].get_seq_length()
            if mask is None:
                mask = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)[None, None]
            cols = torch.zeros(drop.shape[0], keys, dtype=torch.bool)
            cols[:, :drop.shape[1]] = drop
            kwargs["attention_mask"] = mask & ~cols[:, None, None, :]
            return args, kwargs
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def assert_equals_masked_model(model, inputs, stats, visual, depth: int, logits, out, generate):
    """A compressed prefill's ``logits`` and ``out = generate(model, inputs)`` (its sequences and
    per-step logits) equal the uncompressed ``model`` run with :func:`masking_hooks` for the tokens
    ``stats`` says were dropped; the rows keep different numbers of tokens (padded slots)."""
    from vitcompress.runtimes.language_model import kept_slots

    dropped = dropped_per_layer(stats, visual, depth)
    handles = masking_hooks(model.model.language_model.layers, dropped)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref = generate(model, inputs)
    for h in handles:
        h.remove()
    index, slot_valid = kept_slots(~dropped[depth - 1])
    assert not bool(slot_valid.all())  # the rows keep different numbers of tokens: padded slots
    for b in range(index.shape[0]):
        torch.testing.assert_close(logits[b][slot_valid[b]], ref_logits[b][index[b][slot_valid[b]]],
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


# --------------------------------------------------------------------------- a flops= budget as counted


class CountedBudget(NamedTuple):
    """A model compressed at a ``flops=`` budget, counted: fvcore's FLOPs uncompressed (``base``) and
    compressed (``counted``), the FLOPs the runtime planned, its schedule and ``stats``."""

    base: int
    counted: int
    planned: int
    schedule: Any
    stats: Dict[str, Any]


def count_at_budget(model, method: str, x, flops: float = 0.7) -> CountedBudget:
    """Compress ``model`` with ``method`` at ``flops``, count it on ``x`` as ``count_flops`` does, and
    restore it (also when counting fails)."""
    import vitcompress
    from vitcompress.profile.flops import count_flops

    base = count_flops(model, x)
    vitcompress.compress(model, method, flops=flops)
    try:
        counted = count_flops(model, x)
        runtime = model._vitcompress
        planned = runtime.adapter.cost().flops(runtime.schedule, runtime.method, runtime.options)
        schedule, stats = runtime.schedule, vitcompress.stats(model)
    finally:
        vitcompress.restore(model)
    return CountedBudget(base, counted, planned, schedule, stats)
