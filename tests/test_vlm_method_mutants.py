"""Checks written for the mutants of the VLM methods (fastv, pyramiddrop, dart, visionzip, cdpruner) that
the mutation check's fourth run found alive (docs/contributing.md): each asserts the definition -- the
paper's or official code's default, a direct computation -- on a case where the mutant differs."""
import copy

import pytest
import torch

import vitcompress
from vitcompress.testing import llava_inputs, tiny_llava_lm

pytest.importorskip("transformers")

#: the papers' / official scripts' keep= defaults: FastV R = 50%, PyramidDrop lambda = 0.5,
#: DART reduction_ratio 0.778
PAPER_KEEP = {"fastv": 0.5, "pyramiddrop": 0.5, "dart": 0.222}


@pytest.fixture(scope="module")
def llava():
    return tiny_llava_lm("llava")


@pytest.mark.parametrize("method", sorted(PAPER_KEEP))
def test_language_model_methods_default_to_the_papers_keep_and_say_what_keep_means(llava, method):
    """``describe`` gives the paper's keep= and what it means; an out-of-range keep= names that meaning,
    and compressing without a budget keeps what the paper's keep= keeps."""
    info = vitcompress.describe(method)
    assert info["default_budget"] == {"keep": PAPER_KEEP[method]} and info["kind"] == "prune"
    assert isinstance(info["keep_means"], str) and info["keep_means"]
    with pytest.raises(ValueError) as err:
        vitcompress.compress(copy.deepcopy(llava), method, keep=1.5)
    assert info["keep_means"] in str(err.value)
    inputs = llava_inputs(llava, "llava")
    kept = []
    for budget in ({}, {"keep": PAPER_KEEP[method]}):
        model = vitcompress.compress(copy.deepcopy(llava), method, **budget)
        with torch.no_grad():
            model(**inputs)
        kept.append(vitcompress.stats(model)["visual_tokens_after"])
    assert kept[0] == kept[1]


def _visual_after(model, inputs):
    with torch.no_grad():
        model(**inputs)
    return vitcompress.stats(model)


def test_pyramiddrop_stage_boundaries_are_increasing_layers_from_1_to_depth_minus_1(llava):
    """The boundaries the descriptor accepts on an 8-layer language model: increasing, in 1..7 (a drop
    before layer 0 or at the depth has no layer to run in); each accepted list is where the drops happen."""
    for bad in ([0, 4], [2, 4, 8], [4, 4]):
        with pytest.raises(ValueError, match=r"increasing layers in 1\.\.7"):
            vitcompress.compress(copy.deepcopy(llava), "pyramiddrop", layers=bad)
    inputs = llava_inputs(llava, "llava")
    for good in ([1, 4], [1, 7], [3]):
        stats = _visual_after(vitcompress.compress(copy.deepcopy(llava), "pyramiddrop", layers=good), inputs)
        assert [s["layer"] for s in stats["stages"]] == good


def test_dart_defaults_are_the_official_and_the_option_bounds_are_inclusive(llava):
    """Defaults of the official LLaVA scripts (K = 2, 4 + 4 pivots, no max_kept); the smallest accepted
    values (K = 1, one image pivot, no text pivot, max_kept = 0) run and keep ``pivot_image + P * per_pivot``
    tokens per sample (64 visual tokens each here)."""
    defaults = {name: o["default"] for name, o in vitcompress.describe("dart")["options"].items()}
    assert defaults == {"layer": 2, "pivot_image": 4, "pivot_text": 4, "max_kept": None}
    for bad in ({"layer": 0}, {"pivot_image": 0}, {"pivot_text": -1}, {"max_kept": -1}):
        with pytest.raises(ValueError, match=f"dart {next(iter(bad))}="):
            vitcompress.compress(copy.deepcopy(llava), "dart", **bad)
    inputs = llava_inputs(llava, "llava")
    smallest = {"layer": 1, "pivot_image": 1, "pivot_text": 0, "keep": 0.5}  # per_pivot = 64 * 0.5 // 1 = 32
    stats = _visual_after(vitcompress.compress(copy.deepcopy(llava), "dart", **smallest), inputs)
    assert [s["layer"] for s in stats["stages"]] == [1]
    assert stats["stages"][0]["visual_tokens"] == [1 + 32, 1 + 32]
    stats = _visual_after(vitcompress.compress(copy.deepcopy(llava), "dart", max_kept=0), inputs)
    assert stats["stages"][0]["visual_tokens"] == [4, 4]  # the image pivots alone
