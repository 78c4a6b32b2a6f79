"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL through the VLM runtime: tokencorr and QuoTA on tiny random models
(images of two sizes in one batch, videos, M-RoPE positions, generate with the KV cache, bf16)."""
import copy

import pytest
import torch

import vitcompress
from vitcompress.adapters.qwen_vl import token_sources
from vitcompress.interfaces import runtime_of
from vitcompress.methods import tokencorr
from vitcompress.testing import (QWEN_IMAGE_TOKEN, QWEN_KINDS, QWEN_MERGE, QWEN_VIDEO_TOKEN, qwen_processors,
                                 qwen_vl_inputs, ramp_scorer, tiny_qwen_vl)


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_qwen_vl(kind) for kind in QWEN_KINDS}


def uniform(frames, question):
    return [0.5] * frames.shape[0]


def first_group_only(frames, question):
    return [1.0] + [0.0] * (frames.shape[0] - 1)


#: every token kept: tokencorr with no patch redundant, QuoTA at keep=1.0 with equally relevant frames
KEEP_ALL = {"tokencorr": dict(c=10 ** 6), "quota": dict(keep=1.0, scorer=uniform)}


class BaseInputs:
    """Records what the inner model (which scatters the visual tokens and applies M-RoPE) receives."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        def hook(module, args, kwargs):
            features = {m: [t.clone() for t in out.pooler_output]
                        for m, out in (kwargs.get("mm_encoder_outputs") or {}).items()}
            self.calls.append(dict(input_ids=kwargs["input_ids"].clone(), position_ids=kwargs["position_ids"],
                                   attention_mask=kwargs.get("attention_mask"), features=features))
        self.handle = self.model.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def compressed(model, method, **options):
    vitcompress.compress(model, method, **options)
    return model


@pytest.mark.parametrize("method", KEEP_ALL)
@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_keeping_every_token_is_the_uncompressed_model_and_restore_is_exact(models, kind, method):
    model = models[kind]
    inputs = qwen_vl_inputs(model, kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), BaseInputs(model) as plain:
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    ref_deltas = model.model.rope_deltas.clone()
    vitcompress.compress(model, method, **KEEP_ALL[method])
    try:
        with torch.no_grad(), BaseInputs(model) as seen:
            out = model(**inputs, question="what is shown?").logits
            deltas = model.model.rope_deltas.clone()
            gen = model.generate(**inputs, question="what is shown?", max_new_tokens=4, do_sample=False)
        stats = vitcompress.stats(model)
    finally:
        vitcompress.restore(model)
    assert stats["visual_tokens_after"] == stats["visual_tokens_before"] == 60
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(deltas, ref_deltas)
    assert torch.equal(gen, ref_gen)
    # decoding steps: the positions the uncompressed generate gives (its 4-row form leads with text positions)
    for mine, theirs in zip(seen.calls[2:], plain.calls[2:]):
        assert torch.equal(mine["position_ids"][-3:], theirs["position_ids"][-3:])
    # restore: the same parameters, hooks and outputs, bit for bit
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and "generate" not in model.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def unit_columns(ids, token_id, counts):
    """(row, columns of its placeholders) of each unit, from the placeholder runs of the prompt."""
    out, used = [], {}
    per_row = [(ids[b] == token_id).nonzero().flatten() for b in range(ids.shape[0])]
    b = 0
    for n in counts:
        while used.get(b, 0) == len(per_row[b]):
            b += 1
        start = used.get(b, 0)
        out.append((b, per_row[b][start:start + n]))
        used[b] = start + n
    return out


def check_positions(model, inputs, call):
    """The inner model's input: each visual token is one of the uncompressed model's (found by its
    features) and has that token's 3-D position in the uncompressed model's get_rope_index; the
    text keeps its positions; the placeholders count the features."""
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs.get("image_grid_thw"),
                                         video_grid_thw=inputs.get("video_grid_thw"),
                                         attention_mask=inputs["attention_mask"])
    ids, positions, mask = call["input_ids"], call["position_ids"], call["attention_mask"]
    with torch.no_grad():
        original = {"image": model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]),
                    "video": model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])}
    for modality, token_id in (("image", QWEN_IMAGE_TOKEN), ("video", QWEN_VIDEO_TOKEN)):
        before = [f.shape[0] for f in original[modality].pooler_output]
        after = [f.shape[0] for f in call["features"][modality]]
        assert int((ids == token_id).sum()) == sum(after)
        old_cols = unit_columns(inputs["input_ids"], token_id, before)
        new_cols = unit_columns(ids, token_id, after)
        for f_old, f_new, (b, cols_old), (b2, cols_new) in zip(original[modality].pooler_output,
                                                                call["features"][modality], old_cols, new_cols):
            assert b == b2
            match = (f_new[:, None] == f_old[None]).all(-1)  # [new, old]: which original token each one is
            assert bool((match.sum(-1) == 1).all()), "a kept token is not one of the uncompressed model's"
            source = match.float().argmax(-1)
            assert torch.equal(positions[:, b, cols_new], full[:, b, cols_old[source]])
    # the text: the same tokens at the same positions, in the same order
    for b in range(ids.shape[0]):
        text_new = mask[b].bool() & (ids[b] != QWEN_IMAGE_TOKEN) & (ids[b] != QWEN_VIDEO_TOKEN)
        ids_old = inputs["input_ids"][b]
        text_old = inputs["attention_mask"][b].bool() & (ids_old != QWEN_IMAGE_TOKEN) & (ids_old != QWEN_VIDEO_TOKEN)
        assert torch.equal(ids[b][text_new], ids_old[text_old])
        assert torch.equal(positions[:, b][:, text_new], full[:, b][:, text_old])


# tokencorr prunes (its merge option would average tokens); QuoTA giving one frame group all of a
# half budget keeps that group's grid as it is and drops the other
REDUCING = {"tokencorr": {}, "quota": dict(keep=0.5, scorer=first_group_only)}


@pytest.mark.parametrize("method", REDUCING)
@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_kept_tokens_keep_their_positions_and_generate_continues_them(models, kind, method):
    model = models[kind]
    inputs = qwen_vl_inputs(model, kind)
    with torch.no_grad(), BaseInputs(model) as plain:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        full_logits = model(**inputs).logits
    full_deltas = model.model.rope_deltas.clone()
    vitcompress.compress(model, method, **REDUCING[method])
    try:
        with torch.no_grad(), BaseInputs(model) as seen:
            logits = model(**inputs, question="q").logits
            deltas = model.model.rope_deltas.clone()
            out = model.generate(**inputs, question="q", max_new_tokens=3, do_sample=False)
        stats = vitcompress.stats(model)
    finally:
        vitcompress.restore(model)
    reduced = "image" if method == "tokencorr" else "video"
    assert sum(u["tokens_after"] for u in stats[reduced]) < sum(u["tokens_before"] for u in stats[reduced])
    check_positions(model, inputs, seen.calls[0])
    assert torch.equal(seen.calls[1]["input_ids"], seen.calls[0]["input_ids"])  # generate's prefill: the same
    # the next token's position is the uncompressed model's: rope_deltas make up for the shorter prompt
    full_len, new_len = inputs["attention_mask"].sum(-1), seen.calls[0]["attention_mask"].sum(-1)
    assert torch.equal(deltas[:, 0] + new_len, full_deltas[:, 0] + full_len)
    for mine, theirs in zip(seen.calls[2:], plain.calls[1:]):
        assert torch.equal(mine["position_ids"][-3:], theirs["position_ids"][-3:])
    assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(out[:, inputs["input_ids"].shape[1]], logits[:, -1].argmax(-1))
    assert logits.shape[1] < full_logits.shape[1]


def row_alone(inputs, b):
    """Row ``b`` of the batch as a batch of one, without its padding."""
    keep = inputs["attention_mask"][b] == 1
    grids = {"image": inputs["image_grid_thw"], "video": inputs["video_grid_thw"]}
    out = {key: inputs[key][b][keep][None] for key in ("input_ids", "mm_token_type_ids")}
    for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        sizes = grids[modality].prod(-1).tolist()
        out[pixels] = inputs[pixels].split(sizes)[b]
        out[f"{modality}_grid_thw"] = grids[modality][b:b + 1]
    return out


@pytest.mark.parametrize("kind", ["qwen2_5", "qwen3"])
def test_a_batch_of_images_of_two_sizes_matches_each_row_alone(models, kind):
    model = models[kind]
    inputs = qwen_vl_inputs(model, kind)
    assert inputs["image_grid_thw"][0].tolist() != inputs["image_grid_thw"][1].tolist()
    vitcompress.compress(model, "tokencorr")
    try:
        with torch.no_grad():
            batch = model(**inputs).logits[:, -1]
            lengths = [u["tokens_after"] for u in vitcompress.stats(model)["image"]]
            alone = [model(**row_alone(inputs, b)).logits[0, -1] for b in range(2)]
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        gen_alone = [model.generate(**row_alone(inputs, b), max_new_tokens=3, do_sample=False) for b in range(2)]
    finally:
        vitcompress.restore(model)
    assert 0 < lengths[0] < 24 and 0 < lengths[1] < 16
    torch.testing.assert_close(batch, torch.stack(alone), atol=1e-5, rtol=1e-5)
    for b in range(2):
        assert torch.equal(gen[b, -3:], gen_alone[b][0, -3:])


# --------------------------------------------------------------------------- the methods' choices, recomputed


def tower_signals(model, inputs, layers):
    """Per tapped layer: each image's merged tokens' keys (head-mean, pre-rotary, patches concatenated)
    and the attention they receive (column mean of every query's softmax row, heads averaged, summed
    over the merged patches) -- recomputed here from the tower's own attention inputs with
    transformers' rotary function and full attention matrices."""
    import sys

    visual = model.model.visual
    rotary = sys.modules[type(visual).__module__].apply_rotary_pos_emb_vision
    captured = {}
    hooks = [visual.blocks[i].attn.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: captured.__setitem__(i, (args[0], kwargs["position_embeddings"])),
        with_kwargs=True) for i in set(layers)]
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    for h in hooks:
        h.remove()
    grid = inputs["image_grid_thw"]
    P = int(grid.prod(-1).sum())
    natural = torch.arange(P)  # the tower's order of the patches (Qwen2.5-VL: its attention windows)
    if hasattr(visual, "permute_input_for_window_attn"):
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(grid, QWEN_MERGE, visual.window_size, visual.patch_size)
        natural = visual.permute_input_for_window_attn(natural[:, None], index, P)[:, 0]
    out = []
    for i in layers:
        hidden, (cos, sin) = captured[i]
        attn = visual.blocks[i].attn
        q, k, _ = attn.qkv(hidden).reshape(P, 3, attn.num_heads, -1).unbind(1)
        q_rot, k_rot = rotary(q, k, cos, sin)
        keys, received = {}, {}
        start = 0
        for image, n in enumerate(grid.prod(-1).tolist()):
            span = [j for j in range(P) if start <= int(natural[j]) < start + n]
            by_patch = torch.tensor(span)[torch.argsort(natural[span])]  # tower rows in image order
            a = torch.einsum("qhd,khd->hqk", q_rot[by_patch], k_rot[by_patch]).mul(attn.scaling).softmax(-1)
            received[image] = a.mean(dim=(0, 1)).reshape(-1, QWEN_MERGE ** 2).sum(-1)
            keys[image] = k[by_patch].mean(1).reshape(n // QWEN_MERGE ** 2, -1)
            start += n
        out.append((keys, received))
    return out


@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_tokencorr_keeps_what_its_stand_in_signals_choose(models, kind):
    """The stand-in [CLS] attention and keys the adapter computes equal the ones recomputed here;
    tokencorr's kept tokens on a Qwen model are tokencorr's plan on them, and the language model gets
    exactly those merger outputs. (The tower's attention is sharpened, qkv x 8: a random tower's is
    nearly uniform, and the seeded sampling would then draw the same tokens whatever the signals.)"""
    model = copy.deepcopy(models[kind])
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight.mul_(8)
    inputs = qwen_vl_inputs(model, kind, video=False)
    spec = tokencorr.TokenCorr()
    options = dict(spec.defaults)
    layers = spec.tower_layers(options, len(model.model.visual.blocks))
    expected = tower_signals(model, inputs, layers)
    (keys, _), (_, deep), (_, shallow) = expected
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    vitcompress.compress(model, "tokencorr")
    try:
        runtime = runtime_of(model)
        with torch.no_grad(), BaseInputs(model) as seen:
            _, signals = runtime.taps.run(lambda: runtime.adapter.encode("image", inputs))
            model(**inputs)
        stats = vitcompress.stats(model)
    finally:
        vitcompress.restore(model)
    for got, (want_keys, want_attention) in zip(signals, expected):
        for image, n in enumerate([24, 16]):
            torch.testing.assert_close(got.keys[image, :n], want_keys[image], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.attention[image, :n], want_attention[image], atol=1e-6, rtol=1e-5)
            assert not got.attention[image, n:].any()  # the shorter image's padding
    for image in range(2):
        plan, budget = tokencorr.tokencorr_plan(keys[image], deep[image], shallow[image], tau=0.9, c=4, merge=False,
                                                generator=spec.generator(options, "cpu"), min_tokens=1)
        kept = plan.keep[0].tolist()
        assert stats["image"][image]["crops"][0]["kept"] == kept and budget == len(kept)
        assert 0 < len(kept) < features[image].shape[0]  # a real choice: some but not all
        assert torch.equal(seen.calls[0]["features"]["image"][image], features[image][kept])
        assert torch.equal(token_sources(stats["image"][image]), torch.tensor(kept))


def test_quota_scores_the_frame_groups_the_processor_made(models):
    """QuoTA's scorer sees each video's frame groups as images: the first frame of each pair,
    normalised as the processor normalises it; its allocation resizes each group's grid."""
    model = models["qwen2"]
    inputs = qwen_vl_inputs(model, "qwen2")
    seen_frames = []

    def scorer(frames, question):
        seen_frames.append(frames.clone())
        return ramp_scorer(frames, question)

    vitcompress.compress(model, "quota", keep=0.5, scorer=scorer)
    try:
        with torch.no_grad():
            model(**inputs, question="q")
        stats = vitcompress.stats(model)
    finally:
        vitcompress.restore(model)
    image_processor, _ = qwen_processors()
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    torch.manual_seed(2)
    clips = [torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 24)]
    for frames, clip in zip(seen_frames, clips):
        torch.testing.assert_close(frames, (clip[0::2] - mean) / std, atol=1e-5, rtol=1e-5)
    video = stats["video"][0]  # 4 frames of 16 x 16 pixels: 2 groups of 4 x 4 patches, 2 x 2 merged tokens
    assert video["frame_grids"] == [(2, 2), (2, 2)] and video["tokens_after"] < video["tokens_before"]
    assert token_sources(dict(frames=[0], frame_grids=[(2, 4)], grid=[(1, 2)])).tolist() == [5, 7]


# --------------------------------------------------------------------------- bf16, refusals


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_bf16(models, kind):
    model = copy.deepcopy(models[kind]).to(torch.bfloat16)
    inputs = qwen_vl_inputs(model, kind)
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].bfloat16()
    with torch.no_grad():
        ref = model(**inputs).logits
    for method, options in (("tokencorr", KEEP_ALL["tokencorr"]), ("tokencorr", {}),
                            ("quota", dict(keep=0.5, scorer=ramp_scorer))):
        vitcompress.compress(model, method, **options)
        try:
            with torch.no_grad():
                out = model(**inputs, question="q").logits
            gen = model.generate(**inputs, question="q", max_new_tokens=2, do_sample=False)
            stats = vitcompress.stats(model)
        finally:
            vitcompress.restore(model)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all() and gen.shape[1] == \
            inputs["input_ids"].shape[1] + 2
        if options is KEEP_ALL["tokencorr"]:
            assert torch.equal(out, ref)
        else:
            assert stats["visual_tokens_after"] < stats["visual_tokens_before"]


def test_other_methods_are_refused_naming_those_that_run(models):
    model = models["qwen2"]
    with pytest.raises(TypeError, match="takes: .*quota.*tokencorr"):
        vitcompress.compress(model, "tome")
    from vitcompress.adapters.qwen_vl import QwenVLAdapter

    spec = copy.copy(tokencorr.TokenCorr())
    spec.unit = "layer"  # a method of a unit Qwen-VL has no place for
    with pytest.raises(TypeError,
                       match="run on Qwen-VL are tokencorr, visionzip, cdpruner .*, quota .* and fastv, pyramiddrop"):
        QwenVLAdapter(model).make_runtime(spec, dict(spec.defaults), None, None)
    assert vitcompress.supported(model)["tokencorr"] is True and vitcompress.supported(model)["quota"] is True
    assert "K must be smaller" in vitcompress.supported(model)["fastv"]  # it runs on Qwen-VL, not on 2 layers


# --------------------------------------------------------------------------- the prompt rewrite with sources


def test_rewrite_keeps_each_token_at_its_sources_column():
    """A unit split by text (a Qwen3-VL video's frame groups) keeps its tokens in their own runs, each
    with its source's position; tokens whose sources go back (an upsampled grid's second row) stay in
    the method's order, after the ones before them."""
    from vitcompress.runtimes.prompt import rewrite_prompt

    P = 9
    ids = torch.tensor([[1, P, P, 5, P, P, 6]])  # one unit of 4 tokens: 2, text 5, 2 more
    positions = torch.arange(7)[None, None].repeat(3, 1, 1) * 10
    counts = {P: ("video", [4], [3])}
    out = rewrite_prompt(ids, None, None, None, counts, 0, sources={P: [torch.tensor([1, 2, 3])]},
                         columns={"position_ids": (positions, 0)})
    assert out["input_ids"].tolist() == [[1, P, 5, P, P, 6]]
    assert out["position_ids"][0, 0].tolist() == [0, 20, 30, 40, 50, 60]
    out = rewrite_prompt(ids, None, None, None, {P: ("video", [4], [4])}, 0,
                         sources={P: [torch.tensor([0, 1, 0, 1])]}, columns={"position_ids": (positions, 0)})
    assert out["input_ids"].tolist() == [[1, P, P, P, P, 5, 6]]
    assert out["position_ids"][0, 0].tolist() == [0, 10, 20, 10, 20, 30, 60]


def test_beam_search_and_copies(models):
    """generate() expands the reduced features, positions and token types per beam (keeping every
    token: the uncompressed beams); deepcopy and torch.save of a compressed model compress alike."""
    import io

    model = models["qwen3"]
    inputs = qwen_vl_inputs(model, "qwen3")
    ref = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    vitcompress.compress(model, "tokencorr", **KEEP_ALL["tokencorr"])
    try:
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False), ref)
        vitcompress.compress(model, "tokencorr")
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
        assert out.shape == (4, inputs["input_ids"].shape[1] + 3)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        with torch.no_grad():
            want = model(**inputs).logits
            assert torch.equal(copy.deepcopy(model)(**inputs).logits, want)
            assert torch.equal(torch.load(buffer, weights_only=False)(**inputs).logits, want)
    finally:
        vitcompress.restore(model)
