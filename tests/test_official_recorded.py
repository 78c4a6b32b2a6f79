"""vitcompress against recorded outputs of the official ToMe and PiToMe code, in every test run.

``tests/data/official_tome_pitome.pt`` holds random inputs and what the official functions / patched
models returned for them (ToMe af95e4b1, PiToMe 550b5dee); nothing of the official code itself.
Re-record (fetches the official repositories)::

    PYTHONPATH=$PWD python experiments/tools/record_official.py --fetch /tmp/official

The live comparison on all 3000 reference images stays in tests/test_compare_official.py (opt-in).
"""
import copy
import math
import os

import pytest
import torch

import vitcompress
from vitcompress.engine.schedule import r_per_layer
from vitcompress.evaluation import reference_model
from vitcompress.kernels import reference
from vitcompress.methods.pitome import pitome_merge
from vitcompress.methods.tome import tome_matching

DATA = os.path.join(os.path.dirname(__file__), "data", "official_tome_pitome.pt")
REC = torch.load(DATA, weights_only=False)


def _apply(plan, x, size):
    new_x, new_size, _ = reference.apply_plan(x, size, plan.keep, plan.merge_src, plan.merge_dst, num_prefix=1)
    return new_x, new_size


def test_recording_is_from_the_pinned_official_commits():
    assert REC["commits"] == {"ToMe": "af95e4b1befa172dadccd8c81e223b10090f9579",
                              "PiToMe": "550b5deed94aadfeac28bfbe381d87e672044a40"}


@pytest.mark.parametrize("case", REC["parse_r"], ids=lambda c: f"{c['depth']}-{c['r']}")
def test_r_schedule_is_tomes_parse_r(case):
    assert list(r_per_layer(case["r"], case["depth"])) == case["schedule"]


def test_recorded_ramps_separate_int_from_round():
    """The recorded ramps would catch ``round`` in place of ToMe's ``int`` (some entry differs)."""
    def rounded(depth, r, inflect):
        lo = round(r * (1.0 - inflect))
        step = (2 * r - 2 * lo) / (depth - 1)
        return [round(lo + step * i) for i in range(depth)]
    differ = [c for c in REC["parse_r"] if isinstance(c["r"], tuple) and rounded(c["depth"], *c["r"]) != c["schedule"]]
    assert len(differ) >= 3


@pytest.mark.parametrize("case", REC["tome"], ids=lambda c: f"T{c['T']}-r{c['r']}")
def test_tome_merge_matches_official_bipartite_soft_matching(case):
    """Official ``bipartite_soft_matching(class_token=True)`` + ``merge_wavg`` = our ToMe plan
    (class token as the one prefix token) executed size-weighted."""
    plan = tome_matching(case["metric"][:, 1:], case["r"], num_prefix=1, class_token=True)
    new_x, new_size = _apply(plan, case["x"], case["size"])
    assert torch.equal(new_size, case["out_size"])
    torch.testing.assert_close(new_x, case["out_x"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", REC["pitome"], ids=lambda c: f"T{c['T']}-{c['ratio']}-a{c['alpha']}-bsm{c['bsm']}")
def test_pitome_merge_matches_official_pitome_vision(case):
    """Official ``pitome_vision(ratio, margin, alpha, use_bsm_pitome)`` + ``merge_wavg`` = our
    ``pitome_merge`` with the official count ``floor(T - T * ratio)``, non-default alphas included."""
    t = case["T"] - 1
    r = math.floor(t - t * case["ratio"])
    plan = pitome_merge(case["metric"][:, 1:], r, case["margin"], case["alpha"], bipartite_order=case["bsm"])
    new_x, new_size = _apply(plan, case["x"], case["size"])
    assert new_x.shape == case["out_x"].shape
    assert torch.equal(new_size, case["out_size"])
    torch.testing.assert_close(new_x, case["out_x"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ref():
    model, x, _ = reference_model.load(REC["images"])
    assert float(x.double().sum()) == pytest.approx(REC["image_checksum"], rel=1e-12)
    return model, x


class _Counter:
    """Tokens entering each block and after the last one (as compare_official's TokenCounter)."""

    def __init__(self, model):
        self.counts, self.handles = [], []
        for blk in model.blocks:
            self.handles.append(blk.register_forward_pre_hook(lambda m, a: self.counts.append(a[0].shape[1])))
        self.handles.append(model.blocks[-1].register_forward_hook(lambda m, a, o: self.counts.append(o.shape[1])))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("case", REC["models"], ids=lambda c: f"{c['method']}-{c['budget']}")
def test_reference_model_matches_official_patch(ref, case):
    """The reference ViT compressed by vitcompress vs patched by the official code: the same tokens
    entering every block, the same predictions, logits equal to float rounding."""
    model, x = ref
    if case["method"] == "tome":
        ours = vitcompress.compress(copy.deepcopy(model), "tome", r=case["budget"], prop_attn=True)
    else:
        ours = vitcompress.compress(copy.deepcopy(model), "pitome", keep=case["budget"], prop_attn=False)
    counter = _Counter(ours)
    with torch.no_grad():
        out = ours(x)
    counter.close()
    assert counter.counts == case["tokens"]
    assert torch.equal(out.argmax(-1), case["logits"].argmax(-1))
    rel = float((out - case["logits"]).norm() / case["logits"].norm())
    assert rel < 1e-5
