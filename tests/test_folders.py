"""Image folders matched to the model's classes by name (issue 29, item 4): the reference model on
an ImageFolder named by class must score what it scores on the same images in memory."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vitcompress.evaluation import reference_model as reference
from vitcompress.evaluation.classification import imagefolder_loader, predict
from vitcompress.evaluation.folders import folder_labels, image_dataset

NAMES = {"T-shirt/top": "T-shirt_top"}  # a '/' cannot be in a folder name


def _write(root, raw, labels, name_of):
    for i, (img, y) in enumerate(zip(raw, labels)):
        folder = root / name_of(int(y))
        folder.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def shipped():
    with np.load(os.path.join(reference.data_dir(), reference.IMAGES_FILE)) as npz:
        return npz["images"][:60], npz["labels"][:60]


def test_folders_named_by_class_get_the_classes_labels(shipped, tmp_path):
    raw, labels = shipped
    assert len(set(labels.tolist())) == 10
    _write(tmp_path, raw, labels, lambda y: NAMES.get(reference.CLASSES[y], reference.CLASSES[y]))
    # sorted folder order ('Ankle boot', 'Bag', 'Coat', ...) is not the class order: the old rule was wrong
    assert sorted(os.listdir(tmp_path)) != [NAMES.get(c, c) for c in reference.CLASSES]
    model = reference.load(num_images=0)[0]
    loader = imagefolder_loader(str(tmp_path), model, 16, workers=0, reference_model=True)
    top, seen = predict(model, loader, torch.device("cpu"))
    order = sorted(range(len(raw)), key=lambda i: (NAMES.get(reference.CLASSES[labels[i]],
                                                             reference.CLASSES[labels[i]]), i))
    assert seen.tolist() == [int(labels[i]) for i in order]
    with torch.inference_mode():
        in_memory = model(reference.preprocess(raw)).argmax(-1)
    assert top[:, 0].tolist() == [int(in_memory[i]) for i in order]  # the same predictions through the files
    assert (top[:, 0] == seen).float().mean() > 0.8


def test_a_folder_set_matching_neither_names_nor_count_names_the_classes(tmp_path):
    names = [[c] for c in reference.CLASSES]
    with pytest.raises(ValueError, match="Ankle boot") as err:
        folder_labels(["cat", "dog"], names, 10)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="'Bagz'.*match none"):
        folder_labels(["Bag", "Bagz"], names, 10)
    assert folder_labels(["Ankle boot", "trouser", "T-shirt"], names, 10) == [9, 1, 0]
    assert folder_labels([str(i) for i in (0, 1, 10, 2)], None, 11) == [0, 1, 10, 2]  # numbers, not sorted text
    assert folder_labels([f"c{i}" for i in range(10)], names, 10) == list(range(10))  # count: sorted order
    assert folder_labels(["n01440764", "goldfish"], [["n01440764", "tench, Tinca tinca"],
                                                     ["n01443537", "goldfish, Carassius auratus"]], 2) == [0, 1]


def test_a_flat_folder_is_unlabelled_and_an_empty_one_an_error(shipped, tmp_path):
    raw, _ = shipped
    for i in range(3):
        Image.fromarray(raw[i]).save(tmp_path / f"{i}.png")
    data = image_dataset(str(tmp_path))
    assert len(data) == 3 and not data.labelled and data[0][1] == -1
    with pytest.raises(ValueError, match="no class folders"):
        image_dataset(str(tmp_path), labelled=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="hold no images"):
        image_dataset(str(tmp_path))
