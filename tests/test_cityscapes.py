"""Cityscapes reader on a tiny tree (2 cities, 32x64): id mapping, split formats, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as official_labels
from PIL import Image
from real_layouts import CITYSCAPES_TRAIN_ID  # cityscapesScripts' table, written out there

from ctt.data.cityscapes import LABEL_ID_TO_TRAIN_ID, CityscapesDataset

H, W = 32, 64
TRAIN = {
    "aachen": ["aachen_000000_000019", "aachen_000001_000019"],
    "bremen": ["bremen_000000_000019"],
}
VAL = {"lindau": ["lindau_000000_000019"]}


def label_ids(k: int) -> np.ndarray:
    """Every raw id 0..33 appears."""
    return ((np.arange(H * W).reshape(H, W) + 5 * k) % 34).astype(np.uint8)


def reference_train_ids(raw: np.ndarray) -> np.ndarray:
    out = np.full(raw.shape, 255, dtype=np.int64)
    for i in range(raw.shape[0]):
        for j in range(raw.shape[1]):
            out[i, j] = CITYSCAPES_TRAIN_ID.get(int(raw[i, j]), 255)
    return out


def image_path(root: Path, split: str, city: str, name: str) -> Path:
    return root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"


def label_path(root: Path, split: str, city: str, name: str, kind: str) -> Path:
    return root / "gtFine" / split / city / f"{name}_gtFine_{kind}.png"


def write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_cityscapes(root: Path) -> Path:
    k = 0
    for city, names in TRAIN.items():
        for name in names:
            write(image_path(root, "train", city, name), np.full((H, W, 3), 20 * k, np.uint8))
            write(label_path(root, "train", city, name, "labelIds"), label_ids(k))
            k += 1
    for city, names in VAL.items():
        for name in names:
            write(image_path(root, "val", city, name), np.zeros((H, W, 3), np.uint8))
            # only train ids here: they must be used as stored
            trainids = (np.arange(H * W).reshape(H, W) % 20).astype(np.uint8)
            trainids[trainids == 19] = 255
            write(label_path(root, "val", city, name, "labelTrainIds"), trainids)
            write(label_path(root, "val", city, name, "labelIds"), label_ids(9))
    return root


def test_walk_and_label_id_mapping(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path)
    ds = CityscapesDataset(root, "train")
    assert ds.ids == [n for names in TRAIN.values() for n in names]
    assert ds.files[2] == (
        image_path(root, "train", "bremen", TRAIN["bremen"][0]),
        label_path(root, "train", "bremen", TRAIN["bremen"][0], "labelIds"),
    )
    for k in range(3):
        image, label = ds[k]
        assert image.shape == (3, H, W) and image.dtype == torch.float32
        assert label.dtype == torch.int64
        assert torch.equal(label, torch.from_numpy(reference_train_ids(label_ids(k))))
        assert image.max().item() == pytest.approx(20 * k / 255)


def test_train_ids_used_as_stored(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path)
    ds = CityscapesDataset(root, "val")  # labelTrainIds preferred over labelIds
    assert ds.files[0][1].name.endswith("_labelTrainIds.png")
    stored = np.array(Image.open(ds.files[0][1]))
    assert torch.equal(ds[0][1], torch.from_numpy(stored).long())
    assert set(ds[0][1].unique().tolist()) == set(range(19)) | {255}


def test_split_files(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path)
    name = TRAIN["aachen"][1]
    img = image_path(root, "train", "aachen", name).relative_to(root)
    lab = label_path(root, "train", "aachen", name, "labelIds").relative_to(root)
    split = root / "splits" / "1"
    split.mkdir(parents=True)
    (split / "labeled.txt").write_text(f"{img} {lab}\n")
    other = image_path(root, "train", "bremen", TRAIN["bremen"][0]).relative_to(root)
    (split / "unlabeled.txt").write_text(f"/{other}\n")  # a lone image path
    labeled = CityscapesDataset(root, "splits/1/labeled")
    assert torch.equal(labeled[0][1], torch.from_numpy(reference_train_ids(label_ids(1))))
    unlabeled = CityscapesDataset(root, "splits/1/unlabeled", labeled=False)
    image, label = unlabeled[0]
    assert (label == 255).all() and label.shape == image.shape[1:] == (H, W)
    assert unlabeled.files[0][1] is None
    # a lone image path, labelled: the gtFine path is derived from it
    derived = CityscapesDataset(root, split / "unlabeled.txt")
    assert torch.equal(derived[0][1], torch.from_numpy(reference_train_ids(label_ids(2))))


def test_resize(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path)
    image, label = CityscapesDataset(root, "train", resize=(16, 32))[0]
    assert image.shape == (3, 16, 32)
    full = torch.from_numpy(reference_train_ids(label_ids(0)))
    assert torch.equal(label, full[1::2, 1::2])  # nearest at factor 2 = centre-most pixel


def test_out_of_range_values_name_the_file(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path)
    name = TRAIN["aachen"][0]
    bad_raw = label_ids(0)
    bad_raw[0, 0] = 40
    path = label_path(root, "train", "aachen", name, "labelIds")
    write(path, bad_raw)
    with pytest.raises(ValueError, match=r"\[40\]") as e:
        CityscapesDataset(root, "train")[0]
    assert str(path) in str(e.value)
    val = label_path(root, "val", "lindau", VAL["lindau"][0], "labelTrainIds")
    write(val, np.full((H, W), 19, np.uint8))
    with pytest.raises(ValueError, match=r"\[19\]") as e:
        CityscapesDataset(root, "val", validate="full")
    assert str(val) in str(e.value)


def test_missing_things(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--data-root") as e:
        CityscapesDataset(tmp_path / "nope", "train")
    assert str(tmp_path / "nope") in str(e.value)
    root = make_cityscapes(tmp_path)
    gone = label_path(root, "train", "bremen", TRAIN["bremen"][0], "labelIds")
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=str(gone)):
        CityscapesDataset(root, "train")
    assert len(CityscapesDataset(root, "train", labeled=False)) == 3
    with pytest.raises(FileNotFoundError) as e:
        CityscapesDataset(root, "splits/7/labeled")
    assert str(root / "splits" / "7" / "labeled.txt") in str(e.value)
    (root / "leftImg8bit" / "test").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        CityscapesDataset(root, "test")


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path)
    name = TRAIN["aachen"][0]
    lab = label_path(root, "train", "aachen", name, "labelIds")
    write(lab, np.zeros((H, W // 2), np.uint8))
    with pytest.raises(ValueError, match="size mismatch") as e:
        CityscapesDataset(root, "train")[0]
    assert str(lab) in str(e.value)
    assert str(image_path(root, "train", "aachen", name)) in str(e.value)


def test_label_id_table_matches_cityscapesscripts() -> None:
    """LABEL_ID_TO_TRAIN_ID against the official table (cityscapesScripts helpers/labels.py):
    an evaluated label (train id 0..18) maps to its train id; an ignored one (ignoreInEval,
    train id 255 or -1) to 255; and so does every byte value that is no label id."""
    expected = np.full(256, 255, dtype=np.int64)
    evaluated = {}
    for label in official_labels:
        if label.id < 0:  # license plate: -1, never stored in a labelIds PNG
            continue
        if 0 <= label.trainId <= 18 and not label.ignoreInEval:
            expected[label.id] = label.trainId
            evaluated[label.trainId] = label.name
    assert sorted(evaluated) == list(range(19))  # the 19 classes, each once
    assert LABEL_ID_TO_TRAIN_ID.shape == (256,)
    mismatched = {i: (int(LABEL_ID_TO_TRAIN_ID[i]), int(expected[i])) for i in range(256)
                  if LABEL_ID_TO_TRAIN_ID[i] != expected[i]}
    assert not mismatched, f"label id: (ours, official) {mismatched}"


def test_underivable_label_names_the_split_line(tmp_path: Path) -> None:
    """A lone image path outside leftImg8bit/ cannot give its gtFine label: the error is a
    DataError (a ValueError) naming the split file and line."""
    from ctt.errors import DataError, UserError

    root = make_cityscapes(tmp_path)
    split = root / "splits" / "odd"
    split.mkdir(parents=True)
    good = image_path(root, "train", "aachen", TRAIN["aachen"][0]).relative_to(root)
    (split / "labeled.txt").write_text(f"{good}\nimages/aachen_000000.png\n")
    with pytest.raises(DataError, match=r"images/aachen_000000.png' \(listed in .*labeled.txt, "
                                        r"line 2\): expected leftImg8bit/") as e:
        CityscapesDataset(root, "splits/odd/labeled")
    assert isinstance(e.value, (ValueError, UserError)) and "\n" not in str(e.value)
