"""vitcompress's ppt and atc against recorded outputs of the official PPT and ATC code, in every run.

``tests/data/official_ppt_atc.pt`` holds random inputs and what the official functions / patched
reference models returned for them (PPT 706bcdd4, ATC 227c94b5; ATC's clustering through
scikit-learn 1.9.1); nothing of the official code itself. Re-record::

    PYTHONPATH=$PWD:/tmp/atc_site python experiments/tools/record_official_ppt_atc.py --official-dir /tmp/official_pa
"""
import copy
import os

import pytest
import torch

import vitcompress
from vitcompress.evaluation import reference_model
from vitcompress.methods.atc import agglomerative_clustering, cosine_distances
from vitcompress.methods.ppt import importance_scores

DATA = os.path.join(os.path.dirname(__file__), "data", "official_ppt_atc.pt")
REC = torch.load(DATA, weights_only=False)


def partition(labels: torch.Tensor):
    """A clustering as a set of frozensets of token indices (label names do not matter)."""
    groups = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, set()).add(i)
    return {frozenset(g) for g in groups.values()}


def test_recording_is_from_the_pinned_official_commits():
    assert REC["commits"] == {"PPT": "706bcdd475b5652ee84117a88add7a3a49c6045b",
                              "ATC": "227c94b584df323b94dd79e8ddbb88b1587eeb8e"}


@pytest.mark.parametrize("case", REC["ppt_scores"], ids=lambda c: "x".join(map(str, c["attn"].shape)))
def test_ppt_importance_is_the_official_score_assignment_step(case):
    torch.testing.assert_close(importance_scores(case["attn"], case["v"], num_prefix=1), case["scores"],
                               rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def ref():
    model, x, _ = reference_model.load(REC["images"])
    assert float(x.double().sum()) == pytest.approx(REC["image_checksum"], rel=1e-12)
    return model, x


def _run(model, x):
    with torch.no_grad():
        out = model(x)
    return out, vitcompress.stats(model)["tokens_per_layer"]


@pytest.mark.parametrize("case", REC["ppt_models"], ids=lambda c: f"threshold{c['threshold']:.3g}")
def test_ppt_model_matches_official(ref, case):
    """The official PPT on the reference ViT (blocks 1, 3, 4, r=8, proportional attention): same
    tokens per block and the same logits, with batches where every image pools, every image
    prunes, and mixed ones (the recording says which images pooled)."""
    model, x = ref
    depth = len(model.blocks)
    r = [case["r"] if layer in case["layers"] else 0 for layer in range(depth)]
    compressed = vitcompress.compress(copy.deepcopy(model), "ppt", r=r, layers=case["layers"],
                                      threshold=case["threshold"])
    out, tokens = _run(compressed, x)
    assert tokens == case["tokens"][:-1]
    torch.testing.assert_close(out, case["logits"], rtol=1e-4, atol=1e-4)


def test_ppt_recording_covers_both_choices_and_mixed_batches():
    pooled = {round(float(c["pooled"].float().mean()), 3) for c in REC["ppt_models"]}
    assert 0.0 in pooled and 1.0 in pooled and any(0 < p < 1 for p in pooled)


@pytest.mark.parametrize("case", REC["atc_labels"], ids=lambda c: f"T{c['T']}-k{c['clusters']}-{c['linkage']}")
def test_atc_clusters_are_the_official_scikit_learn_clusters(case):
    """Same partition of the reducible tokens as the official ``agglomerative_clustering`` (scikit-learn)."""
    metric = case["metric"][:, 1:]  # the official code leaves the class token out
    T = metric.shape[1]
    label, alive = agglomerative_clustering(cosine_distances(metric), T - case["clusters"], case["linkage"])
    assert alive.sum(dim=1).tolist() == [case["clusters"]] * len(metric)
    for b in range(len(metric)):
        assert partition(label[b]) == partition(case["labels"][b, 1:])


@pytest.mark.parametrize("case", REC["atc_models"], ids=lambda c: c["linkage"])
def test_atc_model_matches_official(ref, case):
    """The official off-the-shelf ATC patch (every block, ``model.r``) on the reference ViT: the
    same schedule (the official patch removes ``r - 1`` tokens per block with a class token) gives
    the same logits."""
    model, x = ref
    removed = [a - b for a, b in zip(case["tokens"][:-1], case["tokens"][1:])]
    assert removed == [case["r"] - 1] * len(model.blocks)
    compressed = vitcompress.compress(copy.deepcopy(model), "atc", r=removed, linkage=case["linkage"])
    out, tokens = _run(compressed, x)
    assert tokens == case["tokens"][:-1]
    torch.testing.assert_close(out, case["logits"], rtol=1e-4, atol=1e-4)


def test_ppt_default_threshold_is_the_official_deit_s_commands(ref):
    """The first recording ran the official DeiT-S command's threshold (7e-5): ppt's default gives it."""
    case = REC["ppt_models"][0]
    assert case["threshold"] == pytest.approx(7e-5, rel=1e-12)
    model, x = ref
    r = [case["r"] if layer in case["layers"] else 0 for layer in range(len(model.blocks))]
    out, tokens = _run(vitcompress.compress(copy.deepcopy(model), "ppt", r=r, layers=case["layers"]), x)
    assert tokens == case["tokens"][:-1]
    torch.testing.assert_close(out, case["logits"], rtol=1e-4, atol=1e-4)
