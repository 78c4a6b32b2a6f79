"""What a compressed model cannot do refuses at the call, in one line naming what to do instead:
torch.fx symbolic tracing (torchvision's ``create_feature_extractor``, timm's fx features) and
turning gradient checkpointing on (timm's and open_clip's ``set_grad_checkpointing``,
transformers' ``gradient_checkpointing_enable``), for every ViT family; restore gives the switches back."""
import pytest
import torch
import torch.nn as nn

import vitcompress
from vitcompress.testing import tiny_vit

FX_REFUSED = r"^torch\.fx symbolic tracing cannot trace a model compressed by vitcompress .*torch\.compile.*export_onnx"
CHECKPOINTING_REFUSED = r"^gradient checkpointing re-runs blocks .*vitcompress\.restore\(model\) before turning it on"


def eva02():
    from test_eva_beit import eva02 as build
    return build()


def beit():
    from test_eva_beit import beit as build
    return build(use_rel_pos_bias=True)


def open_clip_tower():
    from test_clip import tiny_clip
    return tiny_clip().visual


def open_clip_whole():
    from test_clip import tiny_clip
    return tiny_clip()


def hf_vit():
    from test_hf_vit import build
    return build("vit")[0]


def hf_clip():
    import transformers

    from test_clip import HF_VISION
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_VISION)).eval()


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- torch.fx


@pytest.mark.parametrize("build", [tiny_vit, eva02, beit], ids=["vit", "eva02", "beit"])
def test_timm_fx_features_are_refused_in_one_line(build):
    """timm's fx feature extraction (torchvision's create_feature_extractor with timm's tracer settings)
    is refused before the blocks' own checks misread the trace's Proxies (a Proxy mask, a Proxy shape);
    the restored model traces and gives its features."""
    from timm.models._features_fx import create_feature_extractor

    model = build()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.forward_features(x)
    vitcompress.compress(model, "tome", r=2)
    with pytest.raises(RuntimeError, match=FX_REFUSED) as err:
        create_feature_extractor(model, ["norm"])
    one_line(err)
    vitcompress.restore(model)
    with torch.no_grad():
        assert torch.equal(create_feature_extractor(model, ["norm"])(x)["norm"], want)


def test_torchvision_feature_extractor_is_refused_on_an_open_clip_tower():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = open_clip_tower()
    vitcompress.compress(model, "pitome", keep=0.9)
    with pytest.raises(RuntimeError, match=FX_REFUSED) as err:
        create_feature_extractor(model, ["ln_post"])
    one_line(err)


class Layers(nn.Module):
    """The layers of a transformers encoder in a row: transformers 5.x models are not symbolically
    traceable even uncompressed, so what reaches the compressed layers is a tracer of one's own."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("build,layers", [(hf_vit, lambda m: getattr(m.vit, "layers", None) or m.vit.encoder.layer),
                                          (hf_clip, lambda m: getattr(m, "vision_model", m).encoder.layers)],
                         ids=["vit", "clip"])  # transformers 5.x, else 4.x
def test_transformers_layers_refuse_a_symbolic_trace(build, layers):
    model = build()
    vitcompress.compress(model, "zero_tprune", keep=0.9)
    with pytest.raises(RuntimeError, match=FX_REFUSED) as err:
        torch.fx.symbolic_trace(Layers(layers(model)))
    one_line(err)


def test_the_fx_refusal_leaves_export_and_compile_alone():
    """The refusal looks for Proxies only: torch.export's fake tensors run the reducing blocks."""
    model = vitcompress.compress(tiny_vit(), "tome", r=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), want)


# --------------------------------------------------------------------------- gradient checkpointing

def hf_switches():
    """transformers' switches on and off and its flag, 5.x names first (the 4.x names are deprecated there)."""
    on = ["activation_checkpointing_enable", "gradient_checkpointing_enable"]
    off = lambda m: (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()
    flag = lambda m: m.is_activation_checkpointing if hasattr(m, "activation_checkpointing_enable") \
        else m.is_gradient_checkpointing
    return on, off, flag


def timm_switches(flag=lambda m: m.grad_checkpointing):
    return ["set_grad_checkpointing"], lambda m: m.set_grad_checkpointing(False), flag


# family -> (model factory, the module holding the switches, (switches that turn it on, a call that turns it
# off, the flag it sets))
SWITCHES = {
    "timm_vit": (tiny_vit, lambda m: m, timm_switches()),
    "eva02": (eva02, lambda m: m, timm_switches()),
    "beit": (beit, lambda m: m, timm_switches()),
    "open_clip_tower": (open_clip_tower, lambda m: m, timm_switches(lambda m: m.transformer.grad_checkpointing)),
    "open_clip_whole": (open_clip_whole, lambda m: m.visual,
                        timm_switches(lambda m: m.visual.transformer.grad_checkpointing)),
    "hf_vit": (hf_vit, lambda m: m, hf_switches()),
    "hf_clip": (hf_clip, lambda m: m, hf_switches()),
}


@pytest.mark.parametrize("family", SWITCHES)
def test_turning_gradient_checkpointing_on_is_refused_at_the_call(family):
    build, holder, (switches, off, flag) = SWITCHES[family]
    model = build()
    vitcompress.compress(model, "tome", r=2)
    switches = [name for name in switches if hasattr(model, name)]
    for name in switches:
        for args in [(), (True,)] if name == "set_grad_checkpointing" else [()]:
            with pytest.raises(RuntimeError, match=CHECKPOINTING_REFUSED) as err:
                getattr(model, name)(*args)
            one_line(err)
            assert not flag(model)
    off(model)  # turning it off is allowed
    assert not flag(model)
    vitcompress.restore(model)
    module = holder(model)
    for name in switches:  # the class's own switches again, no instance attribute left
        assert name not in module.__dict__ and getattr(module, name).__func__ is getattr(type(module), name)
    getattr(model, switches[0])()
    assert flag(model)

