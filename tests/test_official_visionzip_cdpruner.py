"""vitcompress's visionzip and cdpruner against recorded selections of the official code, in every run.

``tests/data/official_visionzip_cdpruner.pt`` holds what the official functions returned (VisionZip 3151f6df,
CDPruner 9541616c, both on transformers 4.37.2) for tiny random-weight LLaVA towers built here from
``vitcompress.testing``; nothing of the official code itself. Re-record::

    PYTHONPATH=$PWD python experiments/tools/record_official_visionzip_cdpruner.py --official-dir /tmp/official_vzcd
"""
import os

import pytest
import torch

import vitcompress
from vitcompress.testing import (char_tokenizer, llava_inputs, llava_next_576_inputs, llava_prompts, tiny_llava,
                                 tiny_llava_576, tiny_llava_clip, tiny_llava_next_576)

DATA = os.path.join(os.path.dirname(__file__), "data", "official_visionzip_cdpruner.pt")
REC = torch.load(DATA, weights_only=False)
IMAGES = 2


def test_recording_is_from_the_pinned_official_commits():
    assert REC["commits"] == {"VisionZip": "3151f6df4fca36a4cd1c985e5956e725b1f9ad02",
                              "CDPruner": "9541616c40fcd5625de1cdb8ea6c33c129eb7864"}


@pytest.fixture(scope="module")
def llava():
    """The recording's LLaVA-1.5 (576 patches, a 24-layer tower) and the first two of its four images,
    one per prompt (two keep the default run short)."""
    model = tiny_llava_576()
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(11))
    assert float(images.double().sum()) == pytest.approx(REC["image_checksum"], rel=1e-12)
    return model, llava_prompts(model, images[:IMAGES])


def prefill(model, inputs, **kwargs):
    """The visual tokens the compressed model hands its language model, per image, and its stats."""
    seen = {}

    def grab(module, args, kw):
        seen["features"] = kw["mm_encoder_outputs"]["image"].pooler_output

    handle = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, **kwargs)
    finally:
        handle.remove()
    return seen["features"], vitcompress.stats(model)


def default_first(cases):
    """The first case in the default run, the others marked slow."""
    return [c if i == 0 else pytest.param(c, marks=pytest.mark.slow) for i, c in enumerate(cases)]


@pytest.mark.parametrize("case", default_first(REC["visionzip"]["llava"]),
                         ids=lambda c: f"{c['dominant']}+{c['contextual']}")
def test_visionzip_keeps_the_official_tokens(llava, case):
    """The paper's three budgets on 576 patches: the same dominant patches as the official code, and
    the same tokens (CLS, dominant, contextual; the official ones through the model's projector)."""
    model, inputs = llava
    vitcompress.compress(model, "visionzip", dominant=case["dominant"], contextual=case["contextual"])
    try:
        features, stats = prefill(model, inputs)
    finally:
        vitcompress.restore(model)
    assert [u["tokens_after"] for u in stats["image"]] == [case["dominant"] + case["contextual"]] * IMAGES
    assert [u["kept"] for u in stats["image"]] == case["kept"][:IMAGES].tolist()
    if case["tokens"] is not None:  # recorded for 54 + 10
        with torch.no_grad():
            official = model.model.multi_modal_projector(case["tokens"][:IMAGES])
        torch.testing.assert_close(torch.stack(features), official, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", default_first(REC["cdpruner"]["llava"]), ids=lambda c: f"tokens{c['tokens']}")
def test_cdpruner_keeps_the_official_tokens(llava, case):
    """The official conditional DPP with the CLIP text tower of the tower's checkpoint: each image,
    with its own question, keeps exactly the official patches. (Of the recording's four images, the
    fourth swaps one token of 192 at the 192 budget: a near tie late in the greedy, the official run's
    towers being transformers 4.37's, whose float rounding differs; the first two are checked here.)"""
    model, inputs = llava
    vitcompress.compress(model, "cdpruner", tokens=case["tokens"], clip=tiny_llava_clip(model),
                         tokenizer=char_tokenizer)
    try:
        features, stats = prefill(model, inputs, question=REC["questions"][:IMAGES])
    finally:
        vitcompress.restore(model)
    official = [m[0].nonzero().flatten().tolist() for m in case["masks"]][:IMAGES]
    mine = [u["kept"] for u in stats["image"]]
    assert [len(k) for k in mine] == [case["tokens"]] * IMAGES
    assert mine == official
    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    for tokens, every, kept in zip(features, full, mine):
        torch.testing.assert_close(tokens, every[kept], rtol=0, atol=0)


def test_cdpruner_on_next_crops_keeps_the_official_tokens():
    """LLaVA-NeXT: each crop keeps the official ``tokens`` patches, chosen on its full grid; the
    model's unpadding then drops some, and every newline stays."""
    model = tiny_llava("next")
    inputs = llava_inputs(model, "next")
    case = REC["cdpruner"]["next"]
    vitcompress.compress(model, "cdpruner", tokens=case["tokens"], clip=tiny_llava_clip(model),
                         tokenizer=char_tokenizer)
    try:
        _, stats = prefill(model, inputs, question=REC["questions"][:2])
    finally:
        vitcompress.restore(model)
    for unit, masks in zip(stats["image"], case["masks"]):
        assert unit["kept"] == [m.nonzero().flatten().tolist() for m in masks]
    assert [len(m) for m in case["masks"]] == [5, 5]  # base + 4 crops each; sizes differ, so do the unpadded grids
    assert stats["image"][0]["tokens_before"] != stats["image"][1]["tokens_before"]


@pytest.mark.slow
def test_visionzip_on_next_crops_packs_as_the_official_code():
    """LLaVA-NeXT (crops of 576 patches; images of a 1 x 2 and a 2 x 2 crop grid, different sizes):
    per crop the official dominant patches, and the language model gets the official packing (base
    crop, grid dominant tokens in raster order, every grid crop's [CLS], every contextual token)."""
    model = tiny_llava_next_576()
    inputs = llava_next_576_inputs(model)
    vitcompress.compress(model, "visionzip")  # 54 + 10, the recording's
    try:
        features, stats = prefill(model, inputs)
    finally:
        vitcompress.restore(model)
    for unit, tokens, case in zip(stats["image"], features, REC["visionzip"]["next"]):
        assert [crop["kept"] for crop in unit["crops"]] == case["kept"].tolist()
        assert unit["tokens_after"] == case["tokens"].shape[0] == len(case["kept"]) * 64
        torch.testing.assert_close(tokens, case["tokens"], rtol=1e-4, atol=1e-5)
    assert [c["grid"] for c in REC["visionzip"]["next"]] == [(1, 2), (2, 2)]
