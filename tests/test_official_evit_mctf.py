"""vitcompress's evit and mctf against recorded outputs of the official code, in every test run.

``tests/data/official_evit_mctf.pt`` holds inputs and what the official code returned for them
(youweiliang/evit 5ca95a7c, mlvlab/MCTF 2004da0c); nothing of the official code itself. Re-record
(fetches the official repositories)::

    PYTHONPATH=$PWD python experiments/tools/record_official_evit_mctf.py --fetch /tmp/official
"""
import copy
import os

import pytest
import torch

import vitcompress
from vitcompress.evaluation import reference_model
from vitcompress.kernels import reference
from vitcompress.methods import get as get_method
from vitcompress.methods.mctf import mctf_plan

DATA = os.path.join(os.path.dirname(__file__), "data", "official_evit_mctf.pt")
REC = torch.load(DATA, weights_only=False)


def test_recording_is_from_the_pinned_official_commits():
    assert REC["commits"] == {"evit": "5ca95a7cf4a8637193284895c5bc0dd9dc365982",
                              "MCTF": "2004da0cad3231fa74cbd60b6042b0bd133aacde"}


@pytest.fixture(scope="module")
def reference_vit():
    model, x, _ = reference_model.load(REC["images"])
    assert float(x.double().sum()) == REC["image_checksum"]
    return model, x


@pytest.mark.parametrize("case", REC["evit"], ids=lambda c: f"keep{c['keep_rate']}-{''.join(map(str, c['layers']))}")
def test_evit_model_matches_official_evit(reference_vit, case):
    """The official EViT (fuse_token=True) with the reference ViT's weights and our evit on that ViT:
    the same tokens after every block and the same logits."""
    model, x = reference_vit
    model = vitcompress.compress(copy.deepcopy(model), "evit", keep=case["keep_rate"], layers=list(case["layers"]))
    with torch.no_grad():
        logits = model(x)
    tokens = vitcompress.stats(model)["tokens_per_layer"][1:] + [vitcompress.stats(model)["size"].shape[1]]
    assert [t - 1 for t in tokens] == case["left_tokens"]
    assert torch.allclose(logits, case["logits"], atol=1e-4, rtol=1e-4), (logits - case["logits"]).abs().max()
    assert (logits.argmax(1) == case["logits"].argmax(1)).all()


@pytest.mark.parametrize("case", REC["mctf"],
                         ids=lambda c: f"T{c['T']}-r{c['r']}-p{c['protected']}-b{c['bidirection']}")
def test_mctf_fusion_matches_official_mctf(case):
    """Official ``mctf()`` (criteria, bidirectional matching, ``merge_wavg`` with attention-weighted
    pooling) = our plan executed by the weighted apply path: tokens, sizes and sources, in order."""
    x, attn, size, p = case["x"], case["attn"], case["size"], case["protected"]
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1)
    T = x.shape[1] - p
    r = x.shape[1] - case["out_x"].shape[1]  # what the official code removed, after its clamp
    assert r == min(case["r"], get_method("mctf").max_remove(T, 1, 12, {"layers": None}))
    tau_sim, tau_info, tau_size = case["taus"]
    plan = mctf_plan(x[:, p:], attn, size[:, p:, 0], r, p, tau_sim=tau_sim, tau_info=tau_info, tau_size=tau_size,
                     bidirection=bool(case["bidirection"]))
    new_x, new_size, _ = reference.apply_weighted_plan(x, size, plan.keep, plan.merge_src, plan.merge_dst,
                                                       plan.merge_weight, p)
    assert torch.equal(new_size, case["out_size"])
    assert torch.allclose(new_x, case["out_x"], atol=1e-5, rtol=1e-5), (new_x - case["out_x"]).abs().max()
    eye = torch.eye(x.shape[1]).expand(x.shape[0], -1, -1)
    source, _, _ = reference.apply_plan(eye, None, plan.keep, plan.merge_src, plan.merge_dst, p)
    assert torch.equal(source, case["out_source"])
