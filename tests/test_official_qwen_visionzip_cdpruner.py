"""visionzip and cdpruner on the Qwen-VL family against the official selection rules, recorded.

Neither official repository has Qwen-VL code; ``tests/data/official_qwen_visionzip_cdpruner.pt`` holds what the
official LLaVA functions (VisionZip 3151f6df ``CLIPVisionTower_VisionZip.forward``, CDPruner 9541616c
``encode_images``) returned on the tiny Qwen-VL towers' signals, computed by the recording script from the model
with transformers' code (the attention each merged token receives in place of the [CLS] row, the keys, the
merger's input and output, the question's embeddings). Re-record::

    PYTHONPATH=$PWD python experiments/tools/record_official_qwen_visionzip_cdpruner.py \
        --official-dir /tmp/official_vzcd
"""
import os

import pytest
import torch

import vitcompress
from vitcompress.methods import cdpruner
from vitcompress.testing import QWEN_KINDS, QWEN_MERGE, qwen_char_tokenizer, qwen_vl_inputs, tiny_qwen_vl

DATA = os.path.join(os.path.dirname(__file__), "data", "official_qwen_visionzip_cdpruner.pt")
REC = torch.load(DATA, weights_only=False)
LAYERS = (-1, -2)


def test_recording_is_from_the_pinned_official_commits():
    assert REC["commits"] == {"VisionZip": "3151f6df4fca36a4cd1c985e5956e725b1f9ad02",
                              "CDPruner": "9541616c40fcd5625de1cdb8ea6c33c129eb7864"}


@pytest.fixture(scope="module")
def models():
    out = {}
    for kind in QWEN_KINDS:
        model = tiny_qwen_vl(kind)
        inputs = qwen_vl_inputs(model, kind, video=False)
        assert float(inputs["pixel_values"].double().sum()) == pytest.approx(REC["pixel_checksum"], rel=1e-12)
        out[kind] = model, inputs
    return out


def prefill(model, inputs, method, **options):
    """The image tokens the compressed model hands its language model, and its stats."""
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.extend(kw["mm_encoder_outputs"]["image"].pooler_output), with_kwargs=True)
    vitcompress.compress(model, method, **options)
    try:
        with torch.no_grad():
            model(**inputs, question=REC["question"])
        stats = vitcompress.stats(model)
    finally:
        vitcompress.restore(model)
        handle.remove()
    return seen, stats


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_visionzip_keeps_the_official_tokens(models, kind, layer):
    model, inputs = models[kind]
    merger = model.model.visual.merger
    for split in range(2):
        official = [REC["official"][kind, layer, i]["visionzip"][split] for i in range(2)]
        tokens, stats = prefill(model, inputs, "visionzip", dominant=official[0]["dominant"],
                                contextual=official[0]["contextual"], layer=layer)
        for image, mine, theirs in zip(stats["image"], tokens, official):
            assert image["kept"] == theirs["kept"].tolist()
            assert image["tokens_after"] == theirs["dominant"] + theirs["contextual"]
            if theirs["tokens"] is not None:  # the official tokens before the merger, through it
                with torch.no_grad():
                    expected = merger(theirs["tokens"].reshape(-1, theirs["tokens"].shape[-1] // QWEN_MERGE ** 2))
                torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_cdpruner_keeps_the_official_tokens(models, kind):
    model, inputs = models[kind]
    scorer = cdpruner.embedding_scorer(model.get_input_embeddings(), qwen_char_tokenizer)
    for case in range(2):
        official = [REC["official"][kind, -1, i]["cdpruner"][case] for i in range(2)]
        _, stats = prefill(model, inputs, "cdpruner", tokens=official[0]["tokens"], scorer=scorer)
        assert [image["kept"] for image in stats["image"]] == [o["kept"].tolist() for o in official]
