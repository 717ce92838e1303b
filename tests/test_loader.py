"""ctt.data.loader: deterministic, resumable batch streams across epochs and worker counts;
datasets from a config."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

from ctt.config import PRESETS
from ctt.data import synthetic
from ctt.data.loader import BatchStream, build_datasets, dataset_root, detect_layout
from ctt.errors import DataRootError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), num_train=24, num_val=6,
                              num_test=6, size=32, label_counts=(8,))


@pytest.fixture(scope="module")
def cfg(root):
    return PRESETS["tiny"].override({"data.root": str(root), "data.labeled_split": "8",
                                     "data.crop_size": 32, "data.batch_size": 3})


class KeyDataset(Dataset):
    """Item ``(index, epoch)`` -> image filled with ``index``, label filled with ``epoch``."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        index, epoch = key
        return torch.full((3, 2, 2), float(index)), torch.full((2, 2), epoch, dtype=torch.long)


def keys(batch) -> list[tuple[int, int]]:
    images, labels = batch
    return [(int(i[0, 0, 0]), int(e[0, 0])) for i, e in zip(images, labels)]


def test_epochs_are_permutations_and_batches_span_their_boundaries():
    stream = BatchStream(KeyDataset(8), 3, seed=5)
    seen = [k for _ in range(6) for k in keys(stream.next())]  # 18 items: epochs 0, 1, 2
    assert stream.state_dict() == {"consumed": 18}
    epoch0, epoch1 = seen[:8], seen[8:16]
    assert sorted(i for i, _ in epoch0) == list(range(8)) and {e for _, e in epoch0} == {0}
    assert sorted(i for i, _ in epoch1) == list(range(8)) and {e for _, e in epoch1} == {1}
    assert [e for _, e in seen[6:9]] == [0, 0, 1]  # batch 3 straddles the boundary
    assert [e for _, e in seen[16:]] == [2, 2]
    assert [i for i, _ in epoch0] != [i for i, _ in epoch1]  # reshuffled each epoch
    assert [i for i, _ in epoch0] != list(range(8))


def test_stream_is_a_function_of_seed_and_position():
    a, b, c = (BatchStream(KeyDataset(10), 4, seed=s) for s in (1, 1, 2))
    seq_a = [keys(a.next()) for _ in range(5)]
    assert seq_a == [keys(b.next()) for _ in range(5)]
    assert seq_a != [keys(c.next()) for _ in range(5)]
    resumed = BatchStream(KeyDataset(10), 4, seed=1)
    resumed.load_state_dict({"consumed": 8})
    assert [keys(resumed.next()) for _ in range(3)] == seq_a[2:]


def test_real_dataset_resume_equals_continued(cfg):
    ds = build_datasets(cfg)["labeled"]
    full = BatchStream(ds, 3, seed=0)
    batches = [full.next() for _ in range(6)]  # 18 items over an 8-image set
    part = BatchStream(ds, 3, seed=0)
    for _ in range(2):
        part.next()
    state = part.state_dict()
    assert state == {"consumed": 6}
    again = BatchStream(ds, 3, seed=0)
    again.load_state_dict(state)
    for want in batches[2:]:
        got = again.next()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # augmentation depends on the epoch: the same item looks different in epoch 1
    assert not torch.equal(batches[0][0], batches[3][0])


def test_workers_give_the_same_batches_and_resume(cfg):
    ds = build_datasets(cfg)["labeled"]
    plain = BatchStream(ds, 3, seed=0)
    want = [plain.next() for _ in range(6)]
    workers = BatchStream(ds, 3, seed=0, num_workers=2)
    got = [workers.next() for _ in range(3)]
    workers.load_state_dict({"consumed": 12})  # jump: workers restart at the new position
    got += [workers.next() for _ in range(2)]
    for w, g in zip(want[:3] + want[4:], got):
        assert torch.equal(w[0], g[0]) and torch.equal(w[1], g[1])
    assert workers.state_dict() == {"consumed": 18}


def test_build_datasets(cfg):
    ds = build_datasets(cfg)
    assert set(ds) == {"labeled", "unlabeled", "val", "test"}
    assert (len(ds["labeled"]), len(ds["unlabeled"]), len(ds["val"])) == (8, 16, 6)
    image, label = ds["labeled"][0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert label.dtype == torch.int64 and int(label[label != 255].max()) < 7
    assert (ds["unlabeled"][0][1] == 255).all()
    assert set(build_datasets(cfg, need_unlabeled=False)) == {"labeled", "val", "test"}
    assert "test" not in build_datasets(cfg.override({"data.test_split": "none"}))


def test_dataset_root_uses_a_generated_synthetic_set_as_is(cfg, root, tmp_path):
    assert dataset_root(cfg) == root  # 24 images, not the default 1000: no regeneration
    marker = json.loads((root / synthetic.MARKER).read_text())
    assert marker["params"]["num_train"] == 24
    with pytest.raises(ValueError, match="num_classes=7.*data.num_classes=5"):
        dataset_root(cfg.override({"data.num_classes": 5}))
    with pytest.raises(ValueError, match="empty dataset"):
        BatchStream(KeyDataset(0), 2, seed=0)


def _tree(root) -> list:
    return sorted((str(p.relative_to(root)), p.is_file() and p.read_bytes())
                  for p in root.rglob("*"))


@pytest.mark.parametrize("preset", ["tiny", "voc-r101", "cityscapes-r101"])
def test_dataset_root_refuses_missing_root_and_creates_nothing(preset, tmp_path):
    missing = tmp_path / "VOC2012"
    cfg = PRESETS[preset].override({"data.root": str(missing)})
    with pytest.raises(DataRootError, match=f"data root {missing} does not exist"):
        dataset_root(cfg)
    assert not missing.exists()


def test_dataset_root_without_root_needs_data_except_synthetic():
    with pytest.raises(DataRootError, match="data.dataset='voc' needs its dataset: pass "
                       "--data-root.*JPEGImages"):
        dataset_root(PRESETS["voc-r101"])
    with pytest.raises(DataRootError, match="leftImg8bit/ and gtFine/"):
        dataset_root(PRESETS["cityscapes-r101"])


def test_dataset_root_names_the_layout_found_and_the_preset_that_fits(root, tmp_path):
    voc, city, half, empty = (tmp_path / n for n in ("voc", "city", "half", "empty"))
    for d in ("JPEGImages", "SegmentationClassAug"):
        (voc / d).mkdir(parents=True)
    for d in ("leftImg8bit", "gtFine"):
        (city / d).mkdir(parents=True)
    (half / "splits" / "92").mkdir(parents=True)
    (half / "ImageSets").mkdir()
    empty.mkdir()
    assert detect_layout(voc) == "voc" and detect_layout(city) == "cityscapes"
    assert detect_layout(root) == "synthetic" and detect_layout(half) is None
    cases = [
        ("tiny", voc, "is not a synthetic dataset.*holds a voc dataset; use --preset voc-r101"),
        ("tiny", half, "holds no known dataset layout \\(found: ImageSets, splits\\)"),
        ("tiny", empty, "holds no known dataset layout \\(found: nothing\\)"),
        ("voc-r101", city, "is not a Pascal VOC.*cityscapes dataset; use --preset "
                           "cityscapes-r101"),
        ("voc-r101", root, "holds a synthetic dataset; use --preset tiny"),
        ("cityscapes-r101", voc, "is not a Cityscapes root.*use --preset voc-r101"),
    ]
    before = {d: _tree(d) for d in (voc, city, half, empty, root)}
    for preset, data, message in cases:
        with pytest.raises(DataRootError, match=message):
            dataset_root(PRESETS[preset].override({"data.root": str(data)}))
    assert {d: _tree(d) for d in before} == before  # nothing written, locked or deleted
    assert dataset_root(PRESETS["voc-r101"].override({"data.root": str(voc)})) == voc
    (voc.parent / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    with pytest.raises(DataRootError, match="did you mean .*VOCdevkit/VOC2012"):
        dataset_root(PRESETS["voc-r101"].override({"data.root": str(voc.parent / "VOCdevkit")}))
