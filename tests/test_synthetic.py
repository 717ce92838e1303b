"""Tests for ctt/data/synthetic.py: VOC layout, labels, splits, determinism, caching, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctt.data import synthetic
from ctt.data.synthetic import (
    MARKER,
    VOC_PALETTE,
    default_root,
    ensure,
    generate,
    ignore_border,
    main,
    render_sample,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = {"num_train": 12, "num_val": 4, "num_test": 4, "size": 32, "label_counts": (2, 4, 8)}
PAIR_RE = re.compile(r"^JPEGImages/(\w+)\.jpg SegmentationClass/(\w+)\.png$")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "voc", seed=0, **SMALL)


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def read_label(root: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(root / "SegmentationClass" / f"{image_id}.png"))


def test_voc_palette_matches_known_voc_colours() -> None:
    assert len(VOC_PALETTE) == 768 and all(0 <= x <= 255 for x in VOC_PALETTE)

    def rgb(i: int) -> tuple[int, ...]:
        return tuple(VOC_PALETTE[3 * i : 3 * i + 3])

    # Published VOC colours: background, aeroplane, bicycle, bird, person, tvmonitor, ignore.
    assert rgb(0) == (0, 0, 0)
    assert rgb(1) == (128, 0, 0)
    assert rgb(2) == (0, 128, 0)
    assert rgb(3) == (128, 128, 0)
    assert rgb(15) == (192, 128, 128)
    assert rgb(20) == (0, 64, 128)
    assert rgb(255) == (224, 224, 192)
    assert len({rgb(i) for i in range(256)}) == 256


def test_layout_and_file_formats(small_root: Path) -> None:
    sets = small_root / "ImageSets" / "Segmentation"
    for split, count in (("train", 12), ("val", 4), ("test", 4)):
        ids = read_lines(sets / f"{split}.txt")
        assert ids == [f"{split}_{i:06d}" for i in range(count)]
        for image_id in ids:
            jpg = Image.open(small_root / "JPEGImages" / f"{image_id}.jpg")
            assert jpg.format == "JPEG" and jpg.mode == "RGB" and jpg.size == (32, 32)
            png = Image.open(small_root / "SegmentationClass" / f"{image_id}.png")
            assert png.format == "PNG" and png.mode == "P" and png.size == (32, 32)
            assert png.getpalette()[:768] == VOC_PALETTE
    marker = json.loads((small_root / MARKER).read_text())
    assert marker["params"]["num_train"] == 12 and marker["counts"]["test"] == 4


def test_label_values_and_ignore_borders(small_root: Path) -> None:
    ids = read_lines(small_root / "ImageSets" / "Segmentation" / "train.txt")
    labels = np.stack([read_label(small_root, i) for i in ids])  # [N, H, W]
    values = set(np.unique(labels).tolist())
    assert values <= set(range(7)) | {255}
    assert 255 in values and len(values - {0, 255}) >= 3
    # Every object is outlined: no object pixel touches a pixel of another non-ignore class.
    for a, b in (
        (labels[:, 1:, :], labels[:, :-1, :]),
        (labels[:, :, 1:], labels[:, :, :-1]),
    ):
        touching = (a != b) & (a != 255) & (b != 255)
        assert not touching.any()
    # The border is thin: most object pixels are not ignored.
    assert (labels == 255).sum() < ((labels > 0) & (labels < 255)).sum()


def test_ignore_border_matches_pixel_loop() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        instances = rng.integers(0, 4, size=(9, 11)) * (rng.random((9, 11)) < 0.7)
        expected = np.zeros(instances.shape, dtype=bool)
        height, width = instances.shape
        for y in range(height):
            for x in range(width):
                if instances[y, x] == 0:
                    continue
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    ny, nx = y + dy, x + dx
                    inside = 0 <= ny < height and 0 <= nx < width
                    if inside and instances[ny, nx] != instances[y, x]:
                        expected[y, x] = True
        np.testing.assert_array_equal(ignore_border(instances), expected)


def test_split_files_nested_and_partition_train(small_root: Path) -> None:
    train = set(read_lines(small_root / "ImageSets" / "Segmentation" / "train.txt"))
    previous: set[str] = set()
    for count in (2, 4, 8):
        split_dir = small_root / "splits" / str(count)
        sides = {}
        for side in ("labeled", "unlabeled"):
            ids = []
            for line in read_lines(split_dir / f"{side}.txt"):
                match = PAIR_RE.match(line)
                assert match, f"bad split line {line!r}"
                assert match.group(1) == match.group(2)
                assert (small_root / line.split()[0]).is_file()
                ids.append(match.group(1))
            assert len(ids) == len(set(ids))
            sides[side] = set(ids)
        assert len(sides["labeled"]) == count
        assert sides["labeled"] | sides["unlabeled"] == train
        assert not sides["labeled"] & sides["unlabeled"]
        assert previous <= sides["labeled"]
        previous = sides["labeled"]
    full = read_lines(small_root / "splits" / "all" / "labeled.txt")
    assert {PAIR_RE.match(line).group(1) for line in full} == train and len(full) == len(train)


def test_same_seed_is_byte_identical_and_seeds_differ(small_root: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", seed=0, **SMALL)
    other = generate(tmp_path / "other", seed=1, **SMALL)
    ids = read_lines(small_root / "ImageSets" / "Segmentation" / "train.txt")
    differs = 0
    for image_id in ids:
        png = f"SegmentationClass/{image_id}.png"
        jpg = f"JPEGImages/{image_id}.jpg"
        assert (small_root / png).read_bytes() == (again / png).read_bytes()
        np.testing.assert_array_equal(
            np.asarray(Image.open(small_root / jpg)), np.asarray(Image.open(again / jpg))
        )
        differs += (small_root / png).read_bytes() != (other / png).read_bytes()
    assert differs == len(ids)
    for side in ("labeled", "unlabeled"):
        path = Path("splits") / "4" / f"{side}.txt"
        assert (small_root / path).read_text() == (again / path).read_text()
    assert (small_root / "splits/4/labeled.txt").read_text() != (
        other / "splits/4/labeled.txt"
    ).read_text()


def test_images_depend_only_on_seed_split_and_index(small_root: Path, tmp_path: Path) -> None:
    # Out of generation order, an image equals the file written in order.
    image, label = render_sample(0, "train", 7, size=32)
    np.testing.assert_array_equal(label, read_label(small_root, "train_000007"))
    written = np.asarray(Image.open(small_root / "JPEGImages" / "train_000007.jpg")).astype(int)
    other, _ = render_sample(0, "train", 6, size=32)
    assert np.abs(written - image.astype(int)).mean() < 6.0  # JPEG q95 of a noisy image: ~3
    assert np.abs(written - other.astype(int)).mean() > 15.0
    # Changing num_train leaves val and test untouched.
    fewer = generate(tmp_path / "fewer", seed=0, **{**SMALL, "num_train": 8, "label_counts": (2,)})
    for image_id in ("val_000003", "test_000000"):
        png = f"SegmentationClass/{image_id}.png"
        assert (fewer / png).read_bytes() == (small_root / png).read_bytes()


def test_ensure_reuses_complete_and_regenerates_incomplete(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    assert ensure(root, seed=3, **SMALL) == root
    png = root / "SegmentationClass" / "train_000000.png"
    os.utime(png, (1_000_000, 1_000_000))
    marker_mtime = (root / MARKER).stat().st_mtime_ns
    assert ensure(root, seed=3, **SMALL) == root
    assert png.stat().st_mtime == 1_000_000
    assert (root / MARKER).stat().st_mtime_ns == marker_mtime

    # As if generation had been interrupted: its in-progress file is there, the marker not.
    (root / MARKER).unlink()
    (root / synthetic._PARTIAL).touch()
    assert ensure(root, seed=3, **SMALL) == root
    assert not (root / synthetic._PARTIAL).exists()
    assert (root / MARKER).is_file() and png.stat().st_mtime != 1_000_000

    with pytest.raises(ValueError, match=re.escape(str(root))) as err:
        ensure(root, seed=4, **SMALL)
    assert "seed" in str(err.value)


def test_ensure_without_root_uses_parameter_named_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CTT_CACHE", str(tmp_path / "cache"))
    params = {**SMALL, "num_train": 6, "label_counts": (2,)}
    root = ensure(**params)
    assert root.parent == tmp_path / "cache" and root.name.startswith("synthetic-voc-")
    assert root == default_root(**params) and (root / MARKER).is_file()
    assert ensure(**params) == root
    assert default_root(**{**params, "seed": 1}) != root
    assert default_root(**{**params, "label_counts": [2, 2]}) == root  # normalised


def test_never_touches_a_half_prepared_dataset(tmp_path: Path) -> None:
    # A user half-way through preparing VOC: only splits/ and ImageSets/. Those names are the
    # generator's own too, but without its marker or in-progress file the tree is not ours.
    root = tmp_path / "VOC2012"
    (root / "splits" / "1464").mkdir(parents=True)
    (root / "splits" / "1464" / "labeled.txt").write_text("2007_000032\n")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    before = sorted((p.relative_to(root), p.is_file() and p.read_bytes()) for p in root.rglob("*"))
    for call in (lambda: ensure(root, **SMALL), lambda: generate(root, **SMALL)):
        with pytest.raises(FileExistsError, match="holds no synthetic dataset"):
            call()
    assert sorted((p.relative_to(root), p.is_file() and p.read_bytes())
                  for p in root.rglob("*")) == before


def test_refuses_foreign_directory_and_bad_params(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "Annotations").mkdir()
    with pytest.raises(FileExistsError, match="Annotations"):
        generate(tmp_path / "real", **SMALL)
    (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "voc" / "JPEGImages" / "2007_000032.jpg").write_bytes(b"")
    with pytest.raises(FileExistsError, match="holds no synthetic dataset"):
        ensure(tmp_path / "voc", **SMALL)
    (tmp_path / "voc" / synthetic._PARTIAL).touch()  # even in "our" interrupted tree
    with pytest.raises(FileExistsError, match="2007_000032"):
        ensure(tmp_path / "voc", **SMALL)
    with pytest.raises(ValueError, match="num_classes"):
        generate(tmp_path / "x", num_classes=9)
    with pytest.raises(ValueError, match="label_counts"):
        generate(tmp_path / "x", num_train=10, label_counts=(16,))
    with pytest.raises(TypeError, match="num_trian"):
        ensure(tmp_path / "x", num_trian=5)
    with pytest.raises(ValueError, match="split"):
        render_sample(0, "trainval", 0)


def region_colours(num_images: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB of each (image, class) region, excluding borders -> ([R, 3], classes [R])."""
    feats, classes = [], []
    for i in range(num_images):
        image, label = render_sample(5, "train", i, size=size)
        for cls in np.unique(label):
            if cls in (0, 255):
                continue
            feats.append(image[label == cls].astype(np.float64).mean(0) / 255.0)
            classes.append(int(cls))
    return np.array(feats), np.array(classes)


def nearest_mean_accuracy(feats: np.ndarray, classes: np.ndarray) -> float:
    """Fit class means on even rows, classify odd rows by the nearest mean."""
    fit, held = np.arange(len(feats)) % 2 == 0, np.arange(len(feats)) % 2 == 1
    labels = np.unique(classes)
    means = np.stack([feats[fit & (classes == c)].mean(0) for c in labels])
    dist = ((feats[held][:, None, :] - means[None]) ** 2).sum(-1)
    return float((labels[dist.argmin(1)] == classes[held]).mean())


def colour_leak(feats: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    """(largest class-mean deviation / within-class std, nearest-class-mean accuracy)."""
    labels = np.unique(classes)
    class_means = np.stack([feats[classes == c].mean(0) for c in labels])
    within_std = np.sqrt(np.mean([feats[classes == c].var(0).mean() for c in labels]))
    spread = np.abs(class_means - class_means.mean(0)).max()
    return float(spread / within_std), nearest_mean_accuracy(feats, classes)


def test_every_class_appears_and_colour_carries_no_class_information() -> None:
    feats, classes = region_colours(150)
    assert set(classes.tolist()) == set(range(1, 7))
    counts = np.bincount(classes, minlength=7)[1:]
    assert counts.min() > 0.5 * counts.mean()  # classes drawn uniformly

    ratio, accuracy = colour_leak(feats, classes)
    assert ratio < 0.5 and accuracy < 0.3, (ratio, accuracy)  # chance accuracy is 1/6

    # The same checks flag a class-dependent colour shift of one within-class std (power).
    within_std = np.sqrt(np.mean([feats[classes == c].var(0).mean() for c in range(1, 7)]))
    directions = np.concatenate([np.eye(3), -np.eye(3)])  # [6, 3], one per class
    ratio, accuracy = colour_leak(feats + directions[classes - 1] * within_std, classes)
    assert ratio > 0.5 and accuracy > 0.3, (ratio, accuracy)


def test_cli_main_and_module_entry_point(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--root", str(tmp_path / "cli"), "--num-train", "6", "--num-val", "2"]
    argv += ["--num-test", "2", "--size", "32", "--label-counts", "2,4", "--seed", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cli") in out and "train 6" in out and "elapsed" in out
    assert read_lines(tmp_path / "cli" / "splits" / "4" / "labeled.txt")
    assert main([*argv[:-2], "--seed", "3"]) == 2  # other params on an existing root
    assert "seed" in capsys.readouterr().err

    proc = subprocess.run(
        [sys.executable, "-m", "ctt.data.synthetic", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "val 2" in proc.stdout and "test 2" in proc.stdout


def test_module_has_no_torch_or_ray_dependency() -> None:
    source = Path(synthetic.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(torch|ray|optuna)", source, re.M)
