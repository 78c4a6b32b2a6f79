import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer



@pytest.fixture(scope="module")
def deit_small():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224").eval()


def tiny_vit(**kwargs) -> VisionTransformer:
    """A small random ViT (32x32 input, 64 patches) for fast structural tests."""
    cfg = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=48, depth=4, num_heads=3)
    cfg.update(kwargs)
    torch.manual_seed(0)
    return VisionTransformer(**cfg).eval()
