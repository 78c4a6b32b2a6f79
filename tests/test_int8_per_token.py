"""The int8 simulation of ``experiments/studies/int8_per_token.py`` (issue 31): its rounding grids
and the parts of a qkv it leaves in float. Pure torch."""
import pytest
import torch
import torch.nn as nn

from conftest import load_script


@pytest.fixture(scope="module")
def study():
    return load_script("studies/int8_per_token.py")


def test_uint8_grid_keeps_its_ends_and_rounds_within_half_a_step(study):
    low, high = torch.tensor(-1.5), torch.tensor(3.0)
    step = (high - low) / 255
    x = torch.linspace(-3, 5, 1001)
    out = study.fake_uint8(x, low, high)
    inside = (x >= low) & (x <= high)
    assert ((out[inside] - x[inside]).abs() <= step / 2 + 1e-6).all()
    assert torch.allclose(out[x < low - step], low.expand(int((x < low - step).sum())), atol=1e-6)
    assert torch.allclose(out[x > high + step], high.expand(int((x > high + step).sum())), atol=1e-6)
    assert study.fake_uint8(torch.zeros(3), low, high).eq(0).all()  # the zero is on the grid
    # a range that excludes zero is widened to it, as onnxruntime's calibration does
    assert study.fake_uint8(torch.tensor([0.0, 2.0]), torch.tensor(1.0), torch.tensor(2.0)).tolist() == [0.0, 2.0]


def test_int8_weights_have_one_symmetric_scale_per_output_channel(study):
    w = torch.randn(5, 7) * torch.tensor([0.01, 1, 10, 100, 1000]).unsqueeze(1)
    out = study.fake_int8_weight(w)
    scale = w.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(out.abs().amax(1), w.abs().amax(1))  # each row's largest weight is exact
    assert ((out - w).abs() <= scale / 2 + 1e-6 * scale).all()
    assert torch.allclose(out / scale, torch.round(out / scale), atol=1e-3)


def test_per_token_ranges_are_each_tokens_and_each_patchs_own(study):
    x = torch.randn(2, 5, 16) * 0.01
    x[0, 0] *= 1000  # one loud token does not coarsen the others' grid
    out = study.per_token(x)
    for b in range(2):
        for t in range(5):
            row = x[b, t]
            step = (row.max().clamp(min=0) - row.min().clamp(max=0)) / 255
            assert ((out[b, t] - row).abs() <= step / 2 + 1e-7).all()
    image = torch.randn(1, 2, 8, 8) * 0.01
    image[..., :4, :4] *= 1000  # a loud patch of 4 x 4, both channels
    quiet = study.per_token(image, patch=4)[..., 4:, 4:]
    coarse = study.fake_uint8(image, image.min(), image.max())[..., 4:, 4:]
    assert (quiet - image[..., 4:, 4:]).abs().max() < (coarse - image[..., 4:, 4:]).abs().max() / 100


def test_the_parts_a_token_choice_reads_stay_float(study):
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(12, 36)

    model = nn.Module()
    model.blocks = nn.ModuleList([Block()])
    x = torch.randn(2, 9, 12)
    exact = model.blocks[0].qkv(x)
    layers = study.Int8Layers(model, {"blocks.0.qkv": "k"})
    model.blocks[0].qkv(x)  # calibration leaves the output float
    for mode in ("per-tensor", "per-token", "weights only"):
        layers.mode = mode
        out = model.blocks[0].qkv(x)
        assert torch.equal(out[..., 12:24], exact[..., 12:24]), mode  # keys: float
        assert not torch.equal(out[..., :12], exact[..., :12]) and not torch.equal(out[..., 24:], exact[..., 24:])
