"""The shipped Fashion-MNIST reference ViT loads, preprocesses consistently and is accurate."""
import numpy as np
import pytest
import torch

from vitcompress.evaluation import reference_model as reference


@pytest.fixture(scope="module")
def loaded():
    return reference.load()


def test_shapes_and_config(loaded):
    model, images, labels = loaded
    assert images.dtype == torch.float32 and images.shape[1:] == (1, 32, 32)
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
    assert images.shape[0] == 3000
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(model.blocks) >= 6
    assert model.patch_embed.num_patches == 64 and model.num_prefix_tokens == 1
    assert len(reference.CLASSES) == 10


def test_accuracy_on_shipped_images(loaded):
    model, images, labels = loaded
    with torch.inference_mode():
        pred = torch.cat([model(images[i:i + 1000]).argmax(-1) for i in range(0, len(images), 1000)])
    acc = (pred == labels).float().mean().item()
    assert acc >= 0.87, acc


def test_preprocess_matches_load(loaded):
    _, images, labels = loaded
    with np.load(f"{reference.data_dir()}/{reference.IMAGES_FILE}") as npz:
        raw, raw_labels = npz["images"], npz["labels"]
    assert raw.dtype == np.uint8 and raw.shape == (3000, 28, 28)
    assert torch.equal(reference.preprocess(raw), images)
    assert torch.equal(reference.preprocess(torch.from_numpy(raw)), images)
    assert torch.equal(torch.from_numpy(raw_labels), labels)


def test_load_num_images():
    _, images, labels = reference.load(num_images=10)
    assert images.shape == (10, 1, 32, 32) and labels.shape == (10,)


@pytest.mark.parametrize("shape", [(28, 28), (2, 1, 28, 28), (2, 32, 32), (2, 28, 27)])
def test_preprocess_rejects_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
        reference.preprocess(np.zeros(shape, dtype=np.uint8))


def test_read_idx_roundtrip(tmp_path):
    import gzip
    import struct

    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    blob = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", *arr.shape) + arr.tobytes()
    (tmp_path / "a-idx3-ubyte").write_bytes(blob)
    with gzip.open(tmp_path / "a-idx3-ubyte.gz", "wb") as f:
        f.write(blob)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        np.testing.assert_array_equal(reference.read_idx(str(tmp_path / name)), arr)
