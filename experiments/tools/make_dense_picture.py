"""Write the picture of the dense-features page: PCA of the real ViT-S/14's final patch features on real
photos, uncompressed next to every ViT method compressed with ``unmerge=True``.

    PYTHONPATH=$PWD python experiments/tools/make_dense_picture.py      # -> docs/images/dense_pca.png

The first three principal components of the uncompressed model's patch features (fitted on all the photos
shown, every patch) become red, green and blue; each compressed model's features are projected on the same
components and coloured on the same scale, so a colour means the same feature everywhere. Needs the cached
ViT-S/14 (``python -m vitcompress.evaluation.realvit``) and scikit-image's sample photos.
"""
import argparse
import os
import sys

import torch

from vitcompress import api
from vitcompress.cli.show import photo_inputs
from vitcompress.evaluation import offline_data, realvit
from vitcompress.methods import names

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_pictures import OUT, save  # noqa: E402  (the shared quantised-PNG writer)

PHOTOS = ("chelsea", "astronaut", "coffee")
FLOPS = 0.55
GRID = realvit.IMG_SIZE // 14


def features(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(x)[:, 1:]


def main(argv=None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flops", type=float, default=FLOPS, help=f"budget of every method (default {FLOPS})")
    ap.add_argument("--out", default=OUT, metavar="FOLDER", help="where to write dense_pca.png (default: docs/images)")
    args = ap.parse_args(argv)
    files = {os.path.basename(f).split(".")[0]: f for f in offline_data.photo_files()}
    model = realvit.load_realvit()
    x, pictures = photo_inputs([files[n] for n in PHOTOS], (realvit.IMG_SIZE,) * 2, realvit.MEAN, realvit.STD)
    columns = {"uncompressed": features(model, x)}
    for method in names("vit"):
        api.compress(model, method, flops=args.flops, unmerge=True)
        try:
            columns[f"{method}, flops={args.flops}"] = features(model, x)
        finally:
            api.restore(model)
    base = columns["uncompressed"].reshape(-1, columns["uncompressed"].shape[-1])
    mean = base.mean(0)
    _, _, v = torch.pca_lowrank(base - mean, q=3, center=False)
    low, high = ((base - mean) @ v).quantile(0.01, dim=0), ((base - mean) @ v).quantile(0.99, dim=0)
    fig, axes = plt.subplots(len(PHOTOS), len(columns) + 1, figsize=(2.2 * (len(columns) + 1), 2.2 * len(PHOTOS)))
    for row in range(len(PHOTOS)):
        axes[row, 0].imshow(pictures[row].permute(1, 2, 0).numpy())
        for col, (name, feats) in enumerate(columns.items(), start=1):
            rgb = (((feats[row] - mean) @ v - low) / (high - low)).clamp(0, 1).reshape(GRID, GRID, 3)
            axes[row, col].imshow(rgb.numpy(), interpolation="nearest")
            if row == 0:
                axes[row, col].set_title(name, fontsize=9)
    axes[0, 0].set_title("photo", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("real ViT-S/14: PCA of the final patch features, unmerge=True", fontsize=10)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    save(fig, args.out, "dense_pca.png")


if __name__ == "__main__":
    main()
