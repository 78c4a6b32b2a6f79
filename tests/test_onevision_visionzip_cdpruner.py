"""visionzip and cdpruner on LLaVA-OneVision as released (a SigLIP tower without [CLS], anyres crops up to
a grid the model downsamples to anyres_max_9, videos): token counts, generate() with the KV cache, exact
restore, batches of different image sizes, one-crop images with their newline, visionzip's tokens against a
computation written here (no official code for towers without [CLS]), cdpruner's selection against the
official code's recorded on this model (tests/data/official_onevision_cdpruner.pt)."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

import vitcompress
from vitcompress.testing import (LLAVA_IMAGE_TOKEN, LLAVA_VIDEO_TOKEN, ONEVISION_SIGLIP_PINPOINTS,
                                 onevision_siglip_inputs, projection_scorer, tiny_llava, tiny_llava_onevision_siglip)

QUESTIONS = ["what is shown?", "where is the red car?"]
OPTIONS = {"visionzip": dict(dominant=10, contextual=3, layer=-1),
           "cdpruner": dict(tokens=12, scorer=projection_scorer)}
SIDE, PATCHES = 9, 81  # 9 x 9 patches per crop


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision_siglip()


@pytest.fixture(scope="module")
def inputs(model):
    return onevision_siglip_inputs(model)


def grids(inputs):
    """(rows, columns) of each image's crop grid, as the model computes it."""
    return [tuple(get_anyres_image_grid_shape(s.tolist(), ONEVISION_SIGLIP_PINPOINTS, 36))
            for s in inputs["image_sizes"]]


def prefill(model, inputs, **kwargs):
    """The visual tokens the language model gets, per modality, and the input_ids it sees."""
    seen = {}

    def grab(module, args, kw):
        seen.update({m: o.pooler_output for m, o in kw["mm_encoder_outputs"].items()}, input_ids=kw["input_ids"])

    handle = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs, **kwargs).logits
    finally:
        handle.remove()
    return seen, logits


@pytest.mark.parametrize("method", ["visionzip", "cdpruner"])
def test_budget_generate_fused_attention_and_exact_restore(model, inputs, method, monkeypatch):
    """Every crop keeps the budget (visionzip dominant + contextual, cdpruner tokens), the images of
    different sizes (2 x 2 and a 3 x 4 grid the model would downsample) pack to budget x crops tokens,
    each video to budget x frames and its newline; SDPA kept in the tower and the language model; generate() with the KV
    cache equals it without; restore gives bit-identical outputs."""
    with torch.no_grad():
        video = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        before = model(**inputs).logits
    plain_calls = len(calls)
    vitcompress.compress(model, method, **OPTIONS[method])
    try:
        calls.clear()
        seen, logits = prefill(model, inputs, question=QUESTIONS)
        compressed_calls = len(calls)
        stats = vitcompress.stats(model)
        out = model.generate(**inputs, question=QUESTIONS, max_new_tokens=3, do_sample=False)
        no_cache = model.generate(**inputs, question=QUESTIONS, max_new_tokens=3, do_sample=False, use_cache=False)
    finally:
        vitcompress.restore(model)
    per_crop = 13 if method == "visionzip" else 12
    crops = [rows * columns + 1 for rows, columns in grids(inputs)]
    assert crops == [5, 13]
    assert [u["tokens_after"] for u in stats["image"]] == [per_crop * n for n in crops]
    assert [u["tokens_before"] for u in stats["image"]] == [f.shape[0] for f in model.model.get_image_features(
        inputs["pixel_values"], inputs["image_sizes"]).pooler_output]
    if method == "visionzip":
        assert all(len(c["kept"]) == 10 and len(c["contextual"]) == 3 for u in stats["image"] for c in u["crops"])
    else:
        assert all(len(k) == 12 for u in stats["image"] for k in u["kept"])
    assert [(row == LLAVA_IMAGE_TOKEN).sum().item() for row in seen["input_ids"]] == [per_crop * n for n in crops]
    frames = inputs["pixel_values_videos"].shape[1]  # each frame a crop of its own, then the video's newline
    assert [u["tokens_after"] for u in stats["video"]] == [per_crop * frames + 1] * 2
    assert [u["tokens_before"] for u in stats["video"]] == [video.shape[1]] * 2
    assert [(row == LLAVA_VIDEO_TOKEN).sum().item() for row in seen["input_ids"]] == [per_crop * frames + 1] * 2
    assert torch.equal(seen["video"][:, -1], video[:, -1])
    assert compressed_calls == plain_calls > 0
    assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(out[:, inputs["input_ids"].shape[1]], logits[:, -1].argmax(-1))
    assert torch.equal(out, no_cache)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def siglip_layers(model, pixels):
    """The tower's last two hidden states and the last layer's softmax attention ``[crops, H, N, N]`` (eager)."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
    return out.hidden_states[-2], out.hidden_states[-1], out.attentions[-1]


def raster(tokens_per_crop, patches_per_crop, columns):
    """Grid crops' tokens at their patches, sorted by (row, column) of the whole grid, written with loops."""
    placed = []
    for crop, (tokens, patches) in enumerate(zip(tokens_per_crop, patches_per_crop)):
        for token, patch in zip(tokens, patches.tolist()):
            row = (crop // columns) * SIDE + patch // SIDE
            col = (crop % columns) * SIDE + patch % SIDE
            placed.append(((row, col), token))
    return torch.stack([t for _, t in sorted(placed, key=lambda x: x[0])])


def expected_visionzip(model, pixels, dominant, contextual):
    """Per crop of ``pixels``: the projected dominant tokens, the projected contextual tokens, the dominant
    patches -- written here from the paper for a tower without [CLS] (see the test below)."""
    layer = model.model.vision_tower.encoder.layers[-1]
    project = model.model.multi_modal_projector
    before, hidden, attention = siglip_layers(model, pixels)
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.layer_norm1(before)).reshape(*before.shape[:2], 4, -1).mean(dim=2)
    placed, others, picked = [], [], []
    for crop in range(pixels.shape[0]):
        top = attention[crop].mean(dim=0).mean(dim=0).topk(dominant).indices.sort().values
        rest = [p for p in range(PATCHES) if p not in top.tolist()]
        targets = rest[::len(rest) // contextual][:contextual]
        joined = {t: [] for t in targets}
        for p in rest:
            if p not in targets:
                cosine = [F.cosine_similarity(keys[crop, p], keys[crop, t], dim=0) for t in targets]
                joined[targets[int(torch.stack(cosine).argmax())]].append(p)
        merged = torch.stack([hidden[crop, t] + hidden[crop, joined[t]].mean(dim=0) for t in targets])
        with torch.no_grad():
            placed.append(project(hidden[crop, top]))
            others.append(project(merged))
        picked.append(top)
    return placed, others, picked


def test_visionzip_tokens_are_the_received_attention_top_plus_contextual_merges(model, inputs):
    """Written here from the paper for a tower without [CLS]: per crop the ``dominant`` patches that
    receive the most attention (the last layer's softmax over heads and all queries, from the eager
    model), every ``R // contextual``-th other patch a target that the rest join by key cosine (keys of the
    last layer, mean over heads), target + mean of the joined; through the projector. Images: base crop,
    grid dominant tokens in raster order of the whole grid, grid contextual tokens; videos: per frame
    (unpooled) dominant then contextual tokens, frame after frame, then the video's newline."""
    dominant, contextual = 10, 3
    vitcompress.compress(model, "visionzip", dominant=dominant, contextual=contextual, layer=-1)
    try:
        seen, _ = prefill(model, inputs)
        stats = vitcompress.stats(model)
    finally:
        vitcompress.restore(model)
    for b, ((rows, columns), unit) in enumerate(zip(grids(inputs), stats["image"])):
        placed, others, picked = expected_visionzip(model, inputs["pixel_values"][b, :rows * columns + 1], dominant,
                                                    contextual)
        expected = torch.cat([placed[0], others[0], raster(placed[1:], picked[1:], columns), torch.cat(others[1:])])
        assert [c["kept"] for c in unit["crops"]] == [p.tolist() for p in picked]
        torch.testing.assert_close(seen["image"][b], expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        newline = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0, -1:]
    for b, unit in enumerate(stats["video"]):
        placed, others, picked = expected_visionzip(model, inputs["pixel_values_videos"][b], dominant, contextual)
        expected = torch.cat([t for frame in zip(placed, others) for t in frame] + [newline])
        assert [c["kept"] for c in unit["crops"]] == [p.tolist() for p in picked]
        torch.testing.assert_close(seen["video"][b], expected, rtol=1e-4, atol=1e-5)


def test_cdpruner_tokens_are_the_kept_patches_packed_in_raster_order(model, inputs):
    """cdpruner's kept patches (per crop, ``tokens`` of them, the selection itself checked against the
    official code) reach the language model as the projected features of those patches, packed as
    visionzip packs them: base crop, then the grid crops' tokens in the raster order of the whole grid;
    a video's frames in turn."""
    vitcompress.compress(model, "cdpruner", **OPTIONS["cdpruner"])
    try:
        seen, _ = prefill(model, inputs, question=QUESTIONS)
        stats = vitcompress.stats(model)
    finally:
        vitcompress.restore(model)
    project = model.model.multi_modal_projector
    for b, ((rows, columns), unit) in enumerate(zip(grids(inputs), stats["image"])):
        _, hidden, _ = siglip_layers(model, inputs["pixel_values"][b, :rows * columns + 1])
        kept = [torch.tensor(k) for k in unit["kept"]]
        assert [len(k) for k in kept] == [12] * (rows * columns + 1)
        with torch.no_grad():
            tokens = [project(hidden[c, k]) for c, k in enumerate(kept)]
        torch.testing.assert_close(seen["image"][b], torch.cat([tokens[0], raster(tokens[1:], kept[1:], columns)]),
                                   rtol=1e-4, atol=1e-5)
    for b, unit in enumerate(stats["video"]):  # each frame keeps 12 of its unpooled patches, then the newline
        _, hidden, _ = siglip_layers(model, inputs["pixel_values_videos"][b])
        with torch.no_grad():
            tokens = [project(hidden[f, k]) for f, k in enumerate(unit["kept"])]
        torch.testing.assert_close(seen["video"][b, :-1], torch.cat(tokens), rtol=1e-4, atol=1e-5)


def row_alone(inputs, b):
    keep = inputs["attention_mask"][b] == 1
    one = {k: v[b:b + 1] for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return dict(one, input_ids=inputs["input_ids"][b][keep][None])


@pytest.mark.parametrize("method", ["visionzip", pytest.param("cdpruner", marks=pytest.mark.slow)])
def test_batch_rows_match_rows_alone(model, method):
    """A padded batch of two images of different sizes (and crop counts) keeps, per image, what the image
    keeps alone, and generates the same tokens; each row gets its own question."""
    inputs = onevision_siglip_inputs(model, video=False)
    vitcompress.compress(model, method, **OPTIONS[method])
    try:
        gen = model.generate(**inputs, question=QUESTIONS, max_new_tokens=3, do_sample=False)
        batch = vitcompress.stats(model)["image"]
        alone = []
        for b in range(2):
            out = model.generate(**row_alone(inputs, b), question=QUESTIONS[b], max_new_tokens=3, do_sample=False)
            alone.append((out, vitcompress.stats(model)["image"][0]))
    finally:
        vitcompress.restore(model)
    assert batch[0]["tokens_before"] != batch[1]["tokens_before"]
    for b, (out, unit) in enumerate(alone):
        assert (batch[b].get("crops") or batch[b]["kept"]) == (unit.get("crops") or unit["kept"])
        assert batch[b]["tokens_after"] == unit["tokens_after"]
        assert torch.equal(gen[b, -3:], out[0, -3:])


@pytest.mark.parametrize("method", ["visionzip", "cdpruner"])
def test_images_of_a_multi_image_sample_are_one_crop_each_and_keep_their_newline(model, method):
    """``batch_num_images``: the model encodes each image of a three-image sample as one crop followed by
    its newline token; each keeps the budget of one crop (its own: the third image's too) and the newline,
    as the model's own last token."""
    pixels = torch.randn(3, 13, 3, 36, 36, generator=torch.Generator().manual_seed(19))
    sizes = torch.tensor([[40, 60], [100, 130], [36, 36]])
    count = PATCHES + 1  # one crop and its newline, each
    ids = torch.tensor([[1, 5] + [LLAVA_IMAGE_TOKEN] * count + [6] + [LLAVA_IMAGE_TOKEN] * count + [6]
                        + [LLAVA_IMAGE_TOKEN] * count + [7]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_sizes=sizes,
                  batch_num_images=torch.tensor([3]))
    with torch.no_grad():
        full = model.model.get_image_features(pixels, sizes, batch_num_images=torch.tensor([3])).pooler_output
    assert [f.shape[0] for f in full] == [count, count, count]
    vitcompress.compress(model, method, **OPTIONS[method])
    try:
        seen, _ = prefill(model, inputs, question=QUESTIONS[0])
        stats = vitcompress.stats(model)
        first = [2, 0, 1]  # the third image first: the same tokens wherever it stands in the sample
        rotated, _ = prefill(model, dict(inputs, pixel_values=pixels[first], image_sizes=sizes[first]),
                             question=QUESTIONS[0])
    finally:
        vitcompress.restore(model)
    assert torch.equal(rotated["image"][0], seen["image"][2])
    per_crop = 13 if method == "visionzip" else 12
    assert [u["tokens_after"] for u in stats["image"]] == [per_crop + 1] * 3
    for tokens, every in zip(seen["image"], full):
        assert torch.equal(tokens[-1], every[-1])  # the model's newline
    if method == "cdpruner":
        for tokens, every, unit in zip(seen["image"], full, stats["image"]):
            torch.testing.assert_close(tokens[:-1], every[unit["kept"]], rtol=0, atol=0)
    else:  # a one-crop image's report: its crop's choice, flat, and no [CLS] handed on
        for unit in stats["image"]:
            assert len(unit["kept"]) == OPTIONS["visionzip"]["dominant"] and unit["cls_tokens"] == 0


def test_visionzip_reports_every_crop_of_a_many_crop_image_and_no_cls(model, inputs):
    """Images of several crops report one choice per crop (dominant patches, contextual targets) and
    no [CLS] token: SigLIP has none."""
    vitcompress.compress(model, "visionzip", **OPTIONS["visionzip"])
    try:
        with torch.no_grad():
            model(**onevision_siglip_inputs(model, video=False), question=QUESTIONS)
        units = vitcompress.stats(model)["image"]
    finally:
        vitcompress.restore(model)
    for unit, (rows, columns) in zip(units, grids(inputs)):
        assert unit["cls_tokens"] == 0 and len(unit["crops"]) == 1 + rows * columns
        assert {len(c["kept"]) for c in unit["crops"]} == {OPTIONS["visionzip"]["dominant"]}
        assert {len(c["contextual"]) for c in unit["crops"]} == {OPTIONS["visionzip"]["contextual"]}


def test_visionzip_takes_dominant_plus_contextual_up_to_every_patch_of_a_crop(model, inputs):
    """dominant + contextual may use every one of a crop's patches, not one more."""
    vitcompress.compress(model, "visionzip", dominant=PATCHES - 3, contextual=3, layer=-1)
    try:
        with torch.no_grad():
            model(**onevision_siglip_inputs(model, video=False))
        assert {len(c["kept"]) for c in vitcompress.stats(model)["image"][0]["crops"]} == {PATCHES - 3}
    finally:
        vitcompress.restore(model)
    vitcompress.compress(model, "visionzip", dominant=PATCHES - 3, contextual=4, layer=-1)
    try:
        with pytest.raises(ValueError, match=f"contextual=4 tokens need more than the {PATCHES} patches"):
            with torch.no_grad():
                model(**onevision_siglip_inputs(model, video=False))
    finally:
        vitcompress.restore(model)


def test_clear_errors(model):
    """tokencorr needs [CLS]; a OneVision with a CLIP tower, or whose SigLIP features are "default"
    (which would drop a patch), is refused."""
    with pytest.raises(TypeError, match=r"no \[CLS\] token"):
        vitcompress.compress(model, "tokencorr")
    with pytest.raises(TypeError, match="image crops of a LlavaOnevision with a vision tower without"):
        vitcompress.compress(tiny_llava("onevision"), "visionzip")
    default = copy.deepcopy(model)
    default.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        vitcompress.compress(default, "cdpruner", tokens=4, scorer=projection_scorer)


def test_cdpruner_keeps_the_official_tokens_on_every_crop_and_frame(model, inputs):
    """CDPruner has no LLaVA-OneVision code; its LLaVA selection (``encode_images``, 9541616c, run by
    experiments/tools/record_official_visionzip_cdpruner.py --onevision on this model's SigLIP features,
    with the patch and question embeddings of ``projection_embeddings``) per image's crops and per video's
    frames: each keeps exactly the official patches."""
    record = torch.load(os.path.join(os.path.dirname(__file__), "data", "official_onevision_cdpruner.pt"),
                        weights_only=False)
    assert record["commits"] == {"CDPruner": "9541616c40fcd5625de1cdb8ea6c33c129eb7864"}
    assert record["questions"] == QUESTIONS and record["tokens"] == OPTIONS["cdpruner"]["tokens"]
    vitcompress.compress(model, "cdpruner", **OPTIONS["cdpruner"])
    try:
        prefill(model, inputs, question=QUESTIONS)
        stats = vitcompress.stats(model)
    finally:
        vitcompress.restore(model)
    for modality, recorded in (("image", record["images"]), ("video", record["videos"])):
        official = [[m.nonzero().flatten().tolist() for m in masks] for masks in recorded]
        assert [u["kept"] for u in stats[modality]] == official
    assert [len(m) for m in record["images"]] == [5, 13] and [len(m) for m in record["videos"]] == [4, 4]
