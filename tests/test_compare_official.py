"""vitcompress next to the official ToMe and PiToMe code (experiments/studies/compare_official.py).

Skipped unless ``$VITCOMPRESS_OFFICIAL_DIR`` names a folder holding the official code, fetched by
you and kept outside this repository (both repositories are CC BY-NC 4.0)::

    $VITCOMPRESS_OFFICIAL_DIR/ToMe/     github.com/facebookresearch/ToMe   (tome/merge.py, tome/patch/timm.py, ...)
    $VITCOMPRESS_OFFICIAL_DIR/PiToMe/   github.com/hchautran/PiToMe        (algo/pitome/merge.py, patch/{timm,deit}.py)

Measured with ToMe af95e4b1 and PiToMe 550b5dee on timm 1.0.31 (see the script for the numbers).
The default run compares with outputs of the same official code recorded in the repository
(tests/test_official_recorded.py; re-record with experiments/tools/record_official.py).
"""
import copy
import os

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitcompress
from conftest import load_script
from vitcompress.evaluation import realvit, reference_model
from vitcompress.evaluation.offline_data import to_input

OFFICIAL = os.environ.get("VITCOMPRESS_OFFICIAL_DIR")
pytestmark = pytest.mark.skipif(not OFFICIAL, reason="set VITCOMPRESS_OFFICIAL_DIR to the fetched official "
                                "ToMe/ and PiToMe/ code (see experiments/studies/compare_official.py)")

co = load_script("studies/compare_official.py")


@pytest.fixture(scope="module")
def off():
    try:
        return co.load_official(OFFICIAL)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ref():
    model, images, labels = reference_model.load()
    return model, images


def _rel(a, b):
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("r", [2, 4, 6])
def test_tome_matches_official_on_reference_model(off, ref, r):
    """Same tokens per block, the same prediction for every one of the 3000 shipped images,
    outputs equal to float rounding (measured: rel 2e-7, max abs 4e-6)."""
    model, x = ref
    o, ot = co.run(co.official_tome(copy.deepcopy(model), off, r, prop_attn=True), x, 500)
    v, vt = co.run(vitcompress.compress(copy.deepcopy(model), "tome", r=r, prop_attn=True), x, 500)
    assert vt == ot
    assert torch.equal(o.argmax(-1), v.argmax(-1))
    assert _rel(o, v) < 1e-5


def test_pitome_keep_09_matches_official_on_reference_model(off, ref):
    """keep=0.9 = the official ratio=0.9 (prop_attn=False): same counts, same predictions."""
    model, x = ref
    o, ot = co.run(co.official_pitome(copy.deepcopy(model), off, 0.9), x, 500)
    v, vt = co.run(vitcompress.compress(copy.deepcopy(model), "pitome", keep=0.9, prop_attn=False), x, 500)
    assert vt == ot == [65, 59, 54, 49, 45, 41, 37]
    assert torch.equal(o.argmax(-1), v.argmax(-1))
    assert _rel(o, v) < 1e-5


@pytest.mark.parametrize("ratio", [0.8, 0.7])
def test_pitome_keep_gives_official_counts(off, ref, ratio):
    model, x = ref
    _, ot = co.run(co.official_pitome(copy.deepcopy(model), off, ratio), x[:4], 4)
    _, vt = co.run(vitcompress.compress(copy.deepcopy(model), "pitome", keep=ratio, prop_attn=False), x[:4], 4)
    assert vt == ot


@pytest.mark.parametrize("ratio", [0.9, 0.8, 0.7])
def test_pitome_at_official_counts_matches_official_on_reference_model(off, ref, ratio):
    """Given the official per-block counts (r=[...]), the merging itself agrees: identical
    predictions at 0.9 / 0.8; at 0.7 one image of 3000 differs (two energies 4e-9 apart in float64,
    below float32 resolution, order the other way). Allow 3 images."""
    model, x = ref
    o, ot = co.run(co.official_pitome(copy.deepcopy(model), off, ratio), x, 500)
    sched = co.official_schedule(ot)
    v, vt = co.run(vitcompress.compress(copy.deepcopy(model), "pitome", r=sched, prop_attn=False), x, 500)
    assert vt == ot
    differ = int((o.argmax(-1) != v.argmax(-1)).sum())
    same_output = float(((o - v).abs().amax(-1) < 1e-4).float().mean())
    assert differ <= 3, f"{differ} of {len(x)} predictions differ"
    assert same_output >= 0.995


def _layerscale_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=48, depth=4,
                             num_heads=3, init_values=0.5).eval()


def test_official_code_ignores_layerscale(off):
    """On a LayerScale ViT the official block forwards (never calling ls1/ls2) differ from the
    uncompressed model at r=0 / ratio=1.0; vitcompress at r=0 is the uncompressed model, and the
    official code with ls1/ls2 routed back in (the script's LayerScale shim) is too."""
    model = _layerscale_vit()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base, _ = co.run(model, x, 8)
    o, _ = co.run(co.official_tome(copy.deepcopy(model), off, 0), x, 8)
    p, _ = co.run(co.official_pitome(copy.deepcopy(model), off, 1.0), x, 8)
    fixed, _ = co.run(co.official_tome(copy.deepcopy(model), off, 0, layerscale=True), x, 8)
    v, _ = co.run(vitcompress.compress(copy.deepcopy(model), "tome", r=0), x, 8)
    assert _rel(base, o) > 0.05 and _rel(base, p) > 0.05
    assert _rel(base, fixed) < 1e-5
    assert torch.allclose(base, v, rtol=0, atol=1e-6)


def test_tome_matches_official_with_layerscale_shim(off):
    """With ls1/ls2 routed back into the official block, ToMe agrees on a LayerScale model too."""
    model = _layerscale_vit()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    o, ot = co.run(co.official_tome(copy.deepcopy(model), off, 4, layerscale=True), x, 8)
    v, vt = co.run(vitcompress.compress(copy.deepcopy(model), "tome", r=4), x, 8)
    assert vt == ot
    assert _rel(o, v) < 1e-5


def test_realvit_layerscale_point(off):
    """The real DINOv2-style ViT-S/14 (LayerScale): official ToMe at r=0 is far from the model,
    vitcompress at r=0 is the model. Skipped where vitcompress.evaluation.realvit has no cached model."""
    model, why = co.load_realvit_or_none()
    if model is None:
        pytest.skip(why)
    with np.load(os.path.join(reference_model.data_dir(), reference_model.IMAGES_FILE)) as npz:
        x = to_input(npz["images"][:2], realvit.IMG_SIZE, realvit.MEAN, realvit.STD)
    base, _ = co.run(model, x, 2)
    o, _ = co.run(co.official_tome(copy.deepcopy(model), off, 0), x, 2)
    v, _ = co.run(vitcompress.compress(copy.deepcopy(model), "tome", r=0), x, 2)
    assert _rel(base, o) > 0.5
    assert torch.allclose(base, v, rtol=0, atol=1e-5)
