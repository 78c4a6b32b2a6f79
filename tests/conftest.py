import os
import subprocess
import sys

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


#: the two halves of a kernel test file, each run in its own interpreted process: the default run
#: takes the first, ``-m slow`` the second, and a run without ``-m`` both
INTERPRETED_SELECTIONS = ["not slow", pytest.param("slow", marks=pytest.mark.slow)]
_interpreted_runs = {}  # selection -> the finished process


def run_interpreted(request, path: str, selection: str) -> None:
    """Run the tests of the file ``path`` selected by the marker expression ``selection`` in a
    fresh process that has ``TRITON_INTERPRET=1`` from the start: Triton decides at import whether
    its own library is interpreted, and timm imports it before any test file can set the variable.
    The files of every such runner collected in this session go into one process (one start-up,
    not one per file), whose result each runner reports."""
    runs = _interpreted_runs
    if selection not in runs:
        files = sorted({str(item.path) for item in request.session.items
                        if getattr(item, "originalname", "").endswith("_in_an_interpreted_process")
                        and getattr(item, "callspec", None) is not None
                        and item.callspec.params.get("selection") == selection} | {str(path)})
        env = dict(os.environ, TRITON_INTERPRET="1")
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-m", selection]
        runs[selection] = subprocess.run(args, env=env, cwd=str(request.config.rootpath), capture_output=True,
                                         text=True)
    done = runs[selection]
    if done.returncode == 5:  # nothing selected
        return
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    print(done.stdout.strip().splitlines()[-1])
