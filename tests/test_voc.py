"""VOC reader on tiny trees (real_layouts.make_flat_voc): split forms, label dirs, errors, seeds."""

from pathlib import Path

import numpy as np
import pytest
import torch
from real_layouts import flat_label, make_flat_voc, voc_pair, write_label_png
from torch.utils.data import DataLoader

from ctt.data.transforms import train_transform
from ctt.data.voc import VOCDataset

SIZE = (20, 24)  # H, W
IDS = ["2007_000032", "2007_000039", "2008_000001", "2008_000002"]


def make_small_voc(root: Path) -> Path:
    """The 4 images of IDS (real_layouts.make_flat_voc): train.txt all, val.txt the first,
    splits/2 with 2 labeled (a comment, a blank line and a leading slash, as some published
    files have) and 2 unlabeled."""
    return make_flat_voc(
        root, IDS, size=SIZE, val_ids=IDS[:1],
        labeled=f"# two labels\n{voc_pair(IDS[0])}\n\n/{voc_pair(IDS[1])}\n", unlabeled=IDS[2:])


def test_bare_ids_and_pairs_give_the_same_items(tmp_path: Path) -> None:
    root = make_small_voc(tmp_path)
    train = VOCDataset(root, "train")
    labeled = VOCDataset(root, "splits/2/labeled")
    assert len(train) == 4 and len(labeled) == 2
    assert train.ids == IDS and labeled.ids == IDS[:2]
    assert train.files[0] == (root / "JPEGImages" / f"{IDS[0]}.jpg",
                              root / "SegmentationClass" / f"{IDS[0]}.png")
    for k in range(2):
        (img_a, lab_a), (img_b, lab_b) = train[k], labeled[k]
        assert torch.equal(img_a, img_b) and torch.equal(lab_a, lab_b)
    image, label = train[1]
    assert image.shape == (3, *SIZE) and image.dtype == torch.float32
    assert label.shape == SIZE and label.dtype == torch.int64
    assert torch.equal(label, torch.from_numpy(flat_label(1, SIZE)).long())
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image[2].mean().item() == pytest.approx(200 / 255, abs=0.02)  # JPEG is lossy


def test_split_given_as_path_and_with_txt(tmp_path: Path) -> None:
    root = make_small_voc(tmp_path)
    path = root / "splits" / "2" / "labeled.txt"
    assert VOCDataset(root, path).ids == IDS[:2]
    assert VOCDataset(root, "splits/2/labeled.txt").ids == IDS[:2]
    assert VOCDataset(root, "2/labeled").ids == IDS[:2]  # under splits/
    assert VOCDataset(root, "val").ids == IDS[:1]


def test_unlabeled_is_all_ignore_and_needs_no_labels(tmp_path: Path) -> None:
    root = make_small_voc(tmp_path)
    (root / "SegmentationClass" / f"{IDS[2]}.png").unlink()
    ds = VOCDataset(root, "splits/2/unlabeled", labeled=False)
    assert [label for _, label in ds.files] == [None, None]
    image, label = ds[0]
    assert label.shape == image.shape[1:] == SIZE
    assert (label == 255).all() and label.dtype == torch.int64


def test_label_dir_auto_and_override(tmp_path: Path) -> None:
    root = make_small_voc(tmp_path)
    aug = flat_label(5, SIZE)
    write_label_png(root / "SegmentationClassAug" / f"{IDS[0]}.png", aug, mode="L")
    auto = VOCDataset(root, "train")  # Aug where the id is there, else SegmentationClass
    assert auto.files[0][1] == root / "SegmentationClassAug" / f"{IDS[0]}.png"
    assert auto.files[1][1] == root / "SegmentationClass" / f"{IDS[1]}.png"
    assert torch.equal(auto[0][1], torch.from_numpy(aug).long())  # "L" labels accepted
    # pair lines are used as written unless label_dir is given, which replaces their folder
    assert VOCDataset(root, "splits/2/labeled").files[0][1].parent.name == "SegmentationClass"
    with pytest.raises(FileNotFoundError, match=f"SegmentationClassAug/{IDS[1]}.png"):
        VOCDataset(root, "splits/2/labeled", label_dir="SegmentationClassAug")
    ds = VOCDataset(root, "val", label_dir="SegmentationClassAug")
    assert torch.equal(ds[0][1], torch.from_numpy(aug).long())


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--data-root") as e:
        VOCDataset(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(e.value) and "synthetic" in str(e.value)


def test_missing_split_lists_searched_paths(tmp_path: Path) -> None:
    root = make_small_voc(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        VOCDataset(root, "trainaug")
    msg = str(e.value)
    assert str(root / "ImageSets" / "Segmentation" / "trainaug.txt") in msg
    assert str(root / "trainaug.txt") in msg
    assert "and 4 more" in msg and "\n" not in msg  # one line: the likeliest paths, a count


def test_missing_listed_file_names_file_and_line(tmp_path: Path) -> None:
    root = make_small_voc(tmp_path)
    gone = root / "JPEGImages" / f"{IDS[1]}.jpg"
    gone.unlink()
    with pytest.raises(FileNotFoundError) as e:
        VOCDataset(root, "splits/2/labeled")
    msg = str(e.value)
    assert str(gone) in msg and "labeled.txt, line 4" in msg
    lazy = VOCDataset(root, "splits/2/labeled", validate=False)  # deferred to loading
    lazy[0]
    with pytest.raises(FileNotFoundError, match="line 4") as e:
        lazy[1]
    assert str(gone) in str(e.value)


def test_label_out_of_range_names_file(tmp_path: Path) -> None:
    root = make_small_voc(tmp_path)
    bad = flat_label(0, SIZE)
    bad[3, 3], bad[4, 4] = 21, 254
    path = root / "SegmentationClass" / f"{IDS[2]}.png"
    write_label_png(path, bad)
    ds = VOCDataset(root, "train")  # values are checked when read
    ds[0]
    with pytest.raises(ValueError, match=r"\[21, 254\]") as e:
        ds[2]
    assert str(path) in str(e.value) and "line 3" in str(e.value)
    with pytest.raises(ValueError, match=str(path)):
        VOCDataset(root, "train", validate="full")
    assert VOCDataset(root, "train", num_classes=255)[2][1][3, 3] == 21


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    root = make_small_voc(tmp_path)
    label = root / "SegmentationClass" / f"{IDS[0]}.png"
    write_label_png(label, flat_label(0, (SIZE[0], SIZE[1] + 2)))
    with pytest.raises(ValueError, match="size mismatch") as e:
        VOCDataset(root, "val")[0]
    assert str(label) in str(e.value) and str(root / "JPEGImages" / f"{IDS[0]}.jpg") in str(e.value)


def test_colour_label_refused(tmp_path: Path) -> None:
    root = make_small_voc(tmp_path)
    path = root / "SegmentationClass" / f"{IDS[0]}.png"
    write_label_png(path, flat_label(0, SIZE), mode="RGB")
    with pytest.raises(ValueError, match="'RGB'") as e:
        VOCDataset(root, "val")[0]
    assert str(path) in str(e.value)


def test_malformed_split_line(tmp_path: Path) -> None:
    root = make_small_voc(tmp_path)
    (root / "bad.txt").write_text(f"{IDS[0]}\na b c\n")
    with pytest.raises(ValueError, match="bad.txt, line 2"):
        VOCDataset(root, "bad")
    (root / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no items"):
        VOCDataset(root, "empty")


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path: Path) -> None:
    root = make_small_voc(tmp_path)
    t = train_transform(16, 0, scale=(0.5, 1.5), flip=True)
    ds = VOCDataset(root, "train", transform=t, seed=3)
    first = [ds[i] for i in range(len(ds))]
    again = ds[2]
    assert torch.equal(first[2][0], again[0]) and torch.equal(first[2][1], again[1])
    ds.set_epoch(1)
    epoch1 = ds[2]
    assert not torch.equal(epoch1[0], again[0])
    ds.set_epoch(0)
    assert torch.equal(ds[(2, 1)][0], epoch1[0])  # (index, epoch) keys
    assert not torch.equal(VOCDataset(root, "train", transform=t, seed=4)[2][0], again[0])
    # worker processes (and their number) do not change what an item is
    loader = DataLoader(ds, batch_size=1, num_workers=2, shuffle=False)
    for (img, lab), (ref_img, ref_lab) in zip(loader, first, strict=True):
        assert torch.equal(img[0], ref_img) and torch.equal(lab[0], ref_lab)


def test_reads_generated_synthetic_set(tmp_path: Path) -> None:
    synthetic = pytest.importorskip("ctt.data.synthetic")
    root = synthetic.generate(
        tmp_path / "syn", seed=0, num_train=12, num_val=3, num_test=3, size=32, num_classes=7,
        label_counts=(4,),
    )
    train = VOCDataset(root, "train", num_classes=7)
    labeled = VOCDataset(root, "splits/4/labeled", num_classes=7)
    unlabeled = VOCDataset(root, "splits/4/unlabeled", num_classes=7, labeled=False)
    everything = VOCDataset(root, "splits/all/labeled", num_classes=7)
    assert len(train) == len(everything) == 12 and len(labeled) == 4 and len(unlabeled) == 8
    assert sorted(labeled.ids + unlabeled.ids) == sorted(train.ids) == sorted(everything.ids)
    assert len(VOCDataset(root, "val", num_classes=7)) == 3
    assert len(VOCDataset(root, "test", num_classes=7)) == 3
    by_id = dict(zip(train.ids, range(len(train)), strict=True))
    for k, item_id in enumerate(labeled.ids):  # the two formats give identical items
        image, label = labeled[k]
        ref_image, ref_label = train[by_id[item_id]]
        assert torch.equal(image, ref_image) and torch.equal(label, ref_label)
        assert image.shape == (3, 32, 32) and label.shape == (32, 32)
        assert set(label.unique().tolist()) <= set(range(7)) | {255}
    assert (unlabeled[0][1] == 255).all()


def test_unreadable_files_name_file_and_line(tmp_path: Path) -> None:
    """Truncated or non-image files, and split files that are not UTF-8, are DataErrors (so
    ValueErrors, and one-line user errors at entry points) naming the file and split line."""
    from ctt.errors import DataError, MissingDataError, UserError

    root = make_small_voc(tmp_path)
    jpeg = root / "JPEGImages" / f"{IDS[1]}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    ds = VOCDataset(root, "splits/2/labeled")
    ds[0]
    with pytest.raises(DataError, match=rf"cannot read image .*{IDS[1]}.jpg \(listed in "
                                        r".*labeled.txt, line 4\): truncated file \(") as e:
        ds[1]
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
    (root / "JPEGImages" / f"{IDS[0]}.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"line 2\): cannot identify image file"):
        VOCDataset(root, "splits/2/labeled")[0]  # ds keeps item 0 decoded: a new reader

    (root / "latin.txt").write_bytes(f"{IDS[2]}\n# café\n{IDS[3]}\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt, line 2 is not UTF-8 text \(byte 0xe9\)"):
        VOCDataset(root, "latin")
    (root / "crlf.txt").write_bytes(f"{IDS[2]}\r\n\r\n{IDS[3]} a b\r\n".encode())
    with pytest.raises(DataError, match=r"crlf.txt, line 3: expected"):
        VOCDataset(root, "crlf")

    (root / "SegmentationClass" / f"{IDS[2]}.png").unlink()
    VOCDataset(root, "splits/2/unlabeled", labeled=False)[0]  # no label needed there
    with pytest.raises(MissingDataError) as e:
        VOCDataset(root, "splits/2/unlabeled")
    assert isinstance(e.value, FileNotFoundError) and "unlabeled.txt, line 1" in str(e.value)


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_items_are_decoded_once_and_read_bit_identically(tmp_path: Path) -> None:
    """The in-memory cache of decoded items: each file is decoded on its first read only, a
    cached read equals an uncached one bit for bit (augmented, over several epochs, labeled
    and unlabeled), the budget bounds it, and the data root is never written."""
    root = make_small_voc(tmp_path)
    before = _tree_state(root)
    t = train_transform(16, 0, scale=(0.5, 1.5), flip=True)
    for labeled in (True, False):
        cached = VOCDataset(root, "train", transform=t, seed=3, labeled=labeled)
        plain = VOCDataset(root, "train", transform=t, seed=3, labeled=labeled, cache_bytes=0)
        for epoch in range(3):
            for i in range(len(cached)):
                (a, la), (b, lb) = cached[(i, epoch)], plain[(i, epoch)]
                assert torch.equal(a, b) and torch.equal(la, lb)
                a.mul_(0.0)  # what a caller does to an item cannot reach the cache
        assert cached.decodes == len(IDS)  # once per item
        assert plain.decodes == 3 * len(IDS)  # off: every read decodes
    # a budget of two items' bytes keeps the first two items read; the rest decode each time
    one = VOCDataset(root, "train", cache_bytes=0)
    one[0]
    item_bytes = SIZE[0] * SIZE[1] * 3 + flat_label(0, SIZE).astype(np.uint8).nbytes
    small = VOCDataset(root, "train", cache_bytes=2 * item_bytes)
    for _ in range(2):
        for i in range(len(small)):
            small[i]
    assert small.decodes == 2 + 2 * (len(IDS) - 2)
    assert _tree_state(root) == before


def test_cache_budget_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    from ctt.data.voc import DEFAULT_CACHE_MB, default_cache_bytes
    from ctt.errors import DataError

    root = make_small_voc(tmp_path)
    monkeypatch.delenv("CTT_DATA_CACHE_MB", raising=False)
    assert default_cache_bytes() == DEFAULT_CACHE_MB * 2**20
    monkeypatch.setenv("CTT_DATA_CACHE_MB", "0")
    ds = VOCDataset(root, "train")
    ds[0], ds[0]
    assert ds.cache_bytes == 0 and ds.decodes == 2
    monkeypatch.setenv("CTT_DATA_CACHE_MB", "lots")
    with pytest.raises(DataError, match="CTT_DATA_CACHE_MB='lots' is not a number of MiB"):
        VOCDataset(root, "train")
