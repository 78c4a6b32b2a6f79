"""fastv, pyramiddrop and dart against recorded selections of the official FastV, PyramidDrop and DART code.

``tests/data/official_lm_prune.pt`` holds, per case, which sample and the official kept positions
(FastV d1659729: ``keep_indexs`` of its in-place forward, run on the eager attention of layer K;
PyramidDrop 6444f304: ``pdrop_rank_drop`` at each stage boundary; DART 9fee9fa1:
``get_retained_image_token`` on layer K's keys and normed output); nothing of the official code.
vitcompress runs the same tiny random LLaVA with SDPA attention and computes its one attention row
itself. Re-record (needs the two repositories)::

    PYTHONPATH=$PWD python experiments/tools/record_official_lm.py --fetch /tmp/official_lm
"""
import copy
import os

import pytest
import torch

import vitcompress
from vitcompress.testing import LLAVA_IMAGE_TOKEN, llava_inputs, tiny_llava_lm

REC = torch.load(os.path.join(os.path.dirname(__file__), "data", "official_lm_prune.pt"), weights_only=False)
_MODELS = {}


def _model(kind, kv_heads):
    if (kind, kv_heads) not in _MODELS:
        model = tiny_llava_lm(kind, kv_heads=kv_heads)
        weights = float(sum(p.detach().double().sum() for p in model.parameters()))
        assert weights == REC["fingerprints"][kind, kv_heads], "the tiny model changed: re-record"
        _MODELS[kind, kv_heads] = model
    return _MODELS[kind, kv_heads]


def _sample(model, kind, b):
    """Sample ``b`` of ``llava_inputs`` alone, padding removed (as the recorder did)."""
    batch = llava_inputs(model, kind)
    real = batch["attention_mask"][b].bool()
    one = {"input_ids": batch["input_ids"][b:b + 1, real], "attention_mask": batch["attention_mask"][b:b + 1, real],
           "pixel_values": batch["pixel_values"][b:b + 1]}
    if kind != "llava":
        one["image_sizes"] = batch["image_sizes"][b:b + 1]
    return one


def _with_question(sample):
    """Five text tokens after the image (as the recorder adds for DART's text pivots)."""
    extra = torch.tensor([[11, 12, 13, 14, 15]])
    return dict(sample, input_ids=torch.cat([sample["input_ids"], extra], 1),
                attention_mask=torch.cat([sample["attention_mask"], torch.ones_like(extra)], 1))


def _prefill(kind, kv_heads, b, checksum, method, question=False, **options):
    model = copy.deepcopy(_model(kind, kv_heads))
    sample = _sample(model, kind, b)
    if question:
        sample = _with_question(sample)
    assert float(sum(v.double().sum() for v in sample.values())) == checksum
    vitcompress.compress(model, method, **options)
    with torch.no_grad():
        model(**sample)
    return sample, vitcompress.stats(model)


def test_recording_is_from_the_pinned_official_commits():
    assert REC["commits"] == {"FastV": "d1659729b5bf1be225e99ee15783deeea80f63b1",
                              "PyramidDrop": "6444f304aee4b7edcb022839fb9e8cd07859704a",
                              "DART": "9fee9fa199d591cf91891ad468ab52c754de9bf5"}


@pytest.mark.parametrize("case", REC["fastv"], ids=lambda c: f"{c['kind']}-K{c['layer']}-R{c['ratio']}-{c['sample']}")
def test_fastv_keeps_the_official_tokens(case):
    sample, stats = _prefill(case["kind"], 2, case["sample"], case["input_checksum"], "fastv", layer=case["layer"],
                             keep=1 - case["ratio"])
    (stage,) = stats["stages"]
    assert stage["layer"] == case["layer"]
    text = (sample["input_ids"][0] != LLAVA_IMAGE_TOKEN).nonzero()[:, 0]
    ours = torch.cat([text, stage["kept"][0]]).sort().values
    assert torch.equal(ours, case["keep_indexs"])


@pytest.mark.parametrize("case", REC["pyramiddrop"], ids=lambda c: f"{c['kind']}-{c['ratio']}-{c['sample']}")
def test_pyramiddrop_keeps_the_official_tokens_at_every_stage(case):
    _, stats = _prefill(case["kind"], 4, case["sample"], case["input_checksum"], "pyramiddrop", keep=case["ratio"])
    assert [s["layer"] for s in stats["stages"]] == case["layers"]
    for stage, official in zip(stats["stages"], case["kept"]):
        assert torch.equal(stage["kept"][0], official.sort().values)


@pytest.mark.parametrize("case", REC["dart"], ids=lambda c: f"{c['kind']}-K{c['layer']}-{c['max_kept']}-{c['sample']}")
def test_dart_keeps_the_official_tokens(case):
    _, stats = _prefill(case["kind"], 2, case["sample"], case["input_checksum"], "dart", question=True,
                        keep=1 - case["ratio"], layer=case["layer"], max_kept=case["max_kept"],
                        pivot_image=case["pivot_image"], pivot_text=case["pivot_text"])
    (stage,) = stats["stages"]
    assert stage["layer"] == case["layer"]
    assert torch.equal(stage["kept"][0], case["kept"])
