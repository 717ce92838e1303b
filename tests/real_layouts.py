"""Fixture trees in the exact on-disk layouts of the real datasets, and a tree fingerprint.

- :func:`make_voc`: Pascal VOC 2012 as unpacked from ``VOCtrainval_11-May-2012.tar`` plus the
  SBD ``SegmentationClassAug/`` folder and the split files the SSL literature publishes.
- :func:`make_cityscapes`: ``leftImg8bit/`` + ``gtFine/`` as downloaded (with the ``_color``,
  ``_instanceIds`` and ``_polygons.json`` files that sit beside the label ids), optionally
  with the ``*_labelTrainIds.png`` that cityscapesScripts' ``createTrainIdLabelImgs`` writes.
- :func:`make_half_prepared`: only ``splits/`` and ``ImageSets/`` (the images not yet copied).
- :func:`make_flat_voc`: a tiny VOC tree of solid-colour images and labels known pixel by pixel
  (:func:`flat_label`), for tests that compare values and name files and line numbers.
- :func:`hash_tree`: ``{relpath: sha256}`` of a tree, directories included, so that a file or
  directory created, deleted or changed anywhere under a data root is detected.

Images are small (40-64 px) and every image has its own size, so crops are padded and eval
batches are padded. Everything is drawn from a numpy ``Generator`` seeded by the arguments: the
same call writes byte-identical PNGs. The label tables here are written out independently of
``ctt.data`` (tests compare the two).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "CITYSCAPES_TRAIN_ID",
    "CityscapesTree",
    "VOCTree",
    "VOC_FORMS",
    "flat_label",
    "hash_tree",
    "make_cityscapes",
    "make_flat_voc",
    "make_half_prepared",
    "make_voc",
    "voc_pair",
    "voc_palette",
    "write_flat_image",
    "write_label_png",
]

IGNORE = 255
VOC_CLASSES = 21
# split-file forms of VOC lists: pairs naming SegmentationClass/ (ST++/UniMatch style), pairs
# naming SegmentationClassAug/ (SBD-based lists), or bare ids (ImageSets style)
VOC_FORMS = ("pair_class", "pair_aug", "ids")

# cityscapesScripts helpers/labels.py: label id -> train id of the 19 evaluated classes; every
# other id 0..33 is ignored (255).
CITYSCAPES_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


# --- fingerprint -------------------------------------------------------------------------------

def hash_tree(root: str | os.PathLike[str]) -> dict[str, str]:
    """``{relative path: sha256 hex}`` of every file under ``root``; directories map to
    ``"<dir>"`` (``"."`` is ``root`` itself) and symlinks to ``"<link> target"``.

    A missing ``root`` gives ``{}``, an empty directory ``{".": "<dir>"}``: deleting the root,
    creating or removing an empty directory or a lock file, or rewriting any byte all change
    the result. Symlinks are not followed.
    """
    root = Path(root)
    if root.is_symlink():
        return {".": f"<link> {os.readlink(root)}"}
    if not root.is_dir():
        return {} if not root.exists() else {".": _sha256(root)}
    out = {".": "<dir>"}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames + filenames:
            path = base / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = f"<link> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "<dir>"
            else:
                out[rel] = _sha256(path)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- drawing -----------------------------------------------------------------------------------

def voc_palette() -> list[int]:
    """The 256-colour VOC palette (768 ints): colour ``i`` spreads the bits of ``i`` over the
    high bits of R, G and B in turn (class 1 = (128, 0, 0), 255 = (224, 224, 192))."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def _blob_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random ellipse or rectangle, ``bool [h, w]``, 20-50 % of the side, maybe cut by the
    border (as VOC objects often are)."""
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    ry, rx = rng.uniform(0.2, 0.5) * h / 2 + 2, rng.uniform(0.2, 0.5) * w / 2 + 2
    yy, xx = np.mgrid[0:h, 0:w]
    if rng.random() < 0.5:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)


def _outline(label: np.ndarray) -> np.ndarray:
    """Pixels of an object (label > 0) with a 4-neighbour of another value: VOC's 255 border."""
    padded = np.pad(label, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = np.zeros(label.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[dy:dy + label.shape[0], dx:dx + label.shape[1]] != centre
    return differs & (label > 0)


def _image_for(rng: np.random.Generator, label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """``uint8 [h, w, 3]``: a colour per label value plus noise (so the images differ)."""
    noise = rng.integers(-20, 21, (*label.shape, 3))
    return np.clip(colours[label].astype(np.int64) + noise, 0, 255).astype(np.uint8)


def _save_label(path: Path, label: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8), mode="L")
    if mode == "P":
        im = im.convert("P")  # L -> P keeps the values as palette indices
        im.putpalette(voc_palette())
    im.save(path)


# --- Pascal VOC 2012 (+ SBD) ---------------------------------------------------------------------

@dataclass
class VOCTree:
    """What :func:`make_voc` wrote. ``train_ids`` are in ``SegmentationClass/`` and
    ``SegmentationClassAug/``, ``sbd_ids`` only in ``SegmentationClassAug/``, ``val_ids`` only in
    ``SegmentationClass/``; ``splits`` maps a split name to its (labeled, unlabeled) ids."""

    root: Path
    train_ids: list[str]
    sbd_ids: list[str]
    val_ids: list[str]
    splits: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    forms: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (H, W)


def voc_ids(n: int, start: int = 0) -> list[str]:
    """Plausible VOC ids (``2007_000032`` style), distinct and sorted."""
    return [f"{2007 + (k % 5)}_{32 + 7 * k:06d}" for k in range(start, start + n)]


def make_voc(root: str | os.PathLike[str], *, n_train: int = 8, n_sbd: int = 4, n_val: int = 4,
             splits: Mapping[str, tuple[int, str]] | None = None, invalid_value: int | None = None,
             extras: bool = True, seed: int = 0) -> VOCTree:
    """Write a Pascal VOC 2012 (+ SBD) tree at ``root``.

    Layout::

        JPEGImages/<id>.jpg                     every id, plus two listed nowhere (as the real
                                                17,125-image folder)
        SegmentationClass/<id>.png              train + val ids, "P" mode, VOC palette,
                                                values 0..20 and 255 object outlines
        SegmentationClassAug/<id>.png           train + SBD ids, "L" mode, 0..20, no outlines
        ImageSets/Segmentation/{train,val,trainval}.txt   bare ids (no test.txt: the VOC test
                                                labels are not public)
        splits/<name>/{labeled,unlabeled}.txt   for each entry of ``splits``
        Annotations/, ImageSets/Main/, SegmentationObject/   (``extras``) as in the tarball

    Args:
        splits: split name -> (number of labeled images, form); form is one of
            :data:`VOC_FORMS`. ``pair_class``: ``JPEGImages/x.jpg SegmentationClass/x.png``
            lines, labeled from the train ids; ``pair_aug``: ``... SegmentationClassAug/x.png``
            and ``ids``: bare ids, labeled from the train ids and the first SBD id (train_aug
            lists include SBD images). Unlabeled = the remaining train and SBD ids, same form.
            Default ``{"4": (4, "pair_class")}``.
        invalid_value: if given, a 3x3 patch of every label PNG holds this value (e.g. 40, out
            of range for 21 classes).
        seed: fixes every size, shape and pixel.
    """
    root = Path(root)
    rng = np.random.default_rng([seed, 2012])
    splits = dict(splits if splits is not None else {"4": (4, "pair_class")})
    ids = voc_ids(n_train + n_sbd + n_val + 2)  # the last two: JPEGs listed nowhere
    train_ids, sbd_ids = ids[:n_train], ids[n_train:n_train + n_sbd]
    val_ids = ids[n_train + n_sbd:n_train + n_sbd + n_val]
    tree = VOCTree(root, train_ids, sbd_ids, val_ids)
    colours = rng.integers(0, 256, (256, 3))
    for item_id in ids:
        h, w = (int(v) for v in rng.integers(40, 65, 2))
        tree.sizes[item_id] = (h, w)
        label = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            label[_blob_mask(rng, h, w)] = int(rng.integers(1, VOC_CLASSES))
        image = _image_for(rng, label, colours)
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "JPEGImages" / f"{item_id}.jpg", quality=90)
        if invalid_value is not None:
            label[h // 2:h // 2 + 3, w // 2:w // 2 + 3] = invalid_value
        if item_id in train_ids or item_id in val_ids:
            outlined = label.copy()
            outlined[_outline(label)] = IGNORE
            _save_label(root / "SegmentationClass" / f"{item_id}.png", outlined, "P")
            if extras:  # instance ids: not class ids, must never be read as labels
                _save_label(root / "SegmentationObject" / f"{item_id}.png",
                            (outlined > 0).astype(np.uint8), "P")
        if item_id in train_ids or item_id in sbd_ids:
            _save_label(root / "SegmentationClassAug" / f"{item_id}.png", label, "L")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in train_ids))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in val_ids))
    (sets / "trainval.txt").write_text("".join(f"{i}\n" for i in train_ids + val_ids))
    if extras:
        main = root / "ImageSets" / "Main"
        main.mkdir(parents=True, exist_ok=True)
        (main / "train.txt").write_text("".join(f"{i}\n" for i in train_ids + sbd_ids))
        (root / "Annotations").mkdir(exist_ok=True)
        for item_id in train_ids + sbd_ids + val_ids:
            h, w = tree.sizes[item_id]
            (root / "Annotations" / f"{item_id}.xml").write_text(
                f"<annotation><filename>{item_id}.jpg</filename><size><width>{w}</width>"
                f"<height>{h}</height><depth>3</depth></size><segmented>1</segmented>"
                "</annotation>\n")
    for name, (n_labeled, form) in splits.items():
        if form not in VOC_FORMS:
            raise ValueError(f"unknown split form {form!r}; one of {VOC_FORMS}")
        if form == "pair_class":
            labeled = train_ids[:n_labeled]
        else:
            labeled = train_ids[:n_labeled - 1] + sbd_ids[:1]
        unlabeled = [i for i in train_ids + sbd_ids if i not in labeled]
        _write_voc_split(root / "splits" / name, labeled, unlabeled, form)
        tree.splits[name] = (labeled, unlabeled)
        tree.forms[name] = form
    return tree


def _write_voc_split(folder: Path, labeled: Sequence[str], unlabeled: Sequence[str],
                     form: str) -> None:
    def line(item_id: str) -> str:
        if form == "ids":
            return item_id
        label_dir = "SegmentationClass" if form == "pair_class" else "SegmentationClassAug"
        return f"JPEGImages/{item_id}.jpg {label_dir}/{item_id}.png"

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labeled.txt").write_text("".join(line(i) + "\n" for i in labeled))
    (folder / "unlabeled.txt").write_text("".join(line(i) + "\n" for i in unlabeled))


def make_half_prepared(root: str | os.PathLike[str], *, n_labeled: int = 4) -> Path:
    """A data root caught half-way through preparation: the VOC ``ImageSets/Segmentation``
    lists and ``splits/<n_labeled>/`` (pair form) are there, no image or label folder yet."""
    root = Path(root)
    ids = voc_ids(12)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in ids[:8]))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in ids[8:]))
    _write_voc_split(root / "splits" / str(n_labeled), ids[:n_labeled], ids[n_labeled:8],
                     "pair_class")
    return root


# --- tiny flat VOC trees -------------------------------------------------------------------------

def flat_label(k: int, size: tuple[int, int]) -> np.ndarray:
    """Label ``k`` of a flat tree, ``[H, W]``: class ids ``(pixel index + k) % 21`` (every class
    appears), the top row 255 (an ignore border, as VOC has)."""
    label = (np.arange(size[0] * size[1]).reshape(size) + k) % VOC_CLASSES
    label[0, :] = IGNORE
    return label


def write_flat_image(path: Path, k: int, size: tuple[int, int]) -> None:
    """Image ``k`` of a flat tree: one colour, RGB (10 k, 100, 200), ``size`` = (H, W), JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size[1], size[0]), (10 * k, 100, 200)).save(path, quality=95)


def write_label_png(path: Path, label: np.ndarray, mode: str = "P") -> None:
    """``label`` as a PNG: ``"P"`` (the values as palette indices, VOC palette), ``"L"`` or
    ``"RGB"`` (grey, which a label reader must refuse)."""
    if mode in ("P", "L"):
        _save_label(path, label, mode)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").convert(mode).save(path)


def voc_pair(item_id: str) -> str:
    """A split-file line naming an image and its ``SegmentationClass/`` label."""
    return f"JPEGImages/{item_id}.jpg SegmentationClass/{item_id}.png"


def make_flat_voc(root: str | os.PathLike[str], ids: Sequence[str], *, size: tuple[int, int],
                  val_ids: Sequence[str], labeled: str, unlabeled: Sequence[str],
                  split: str = "2", train_list: bool = True) -> Path:
    """Write a tiny VOC 2012 tree at ``root`` whose every pixel is known; returns ``root``.

    Layout::

        JPEGImages/<id>.jpg                 image k of ``ids``: :func:`write_flat_image`
        SegmentationClass/<id>.png          :func:`flat_label` ``(k, size)``, "P" mode
        ImageSets/Segmentation/val.txt      ``val_ids``
        ImageSets/Segmentation/train.txt    every id (``train_list``)
        splits/<split>/labeled.txt          the text ``labeled`` as given (comments, blank
                                            lines, a leading slash: what published lists hold)
        splits/<split>/unlabeled.txt        a :func:`voc_pair` line per id of ``unlabeled``
    """
    root = Path(root)
    for k, item_id in enumerate(ids):
        write_flat_image(root / "JPEGImages" / f"{item_id}.jpg", k, size)
        write_label_png(root / "SegmentationClass" / f"{item_id}.png", flat_label(k, size))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    if train_list:
        (sets / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in val_ids))
    folder = root / "splits" / split
    folder.mkdir(parents=True)
    (folder / "labeled.txt").write_text(labeled)
    (folder / "unlabeled.txt").write_text("".join(voc_pair(i) + "\n" for i in unlabeled))
    return root


# --- Cityscapes ----------------------------------------------------------------------------------

@dataclass
class CityscapesTree:
    """What :func:`make_cityscapes` wrote: ``stems[split]`` = ``(city, stem)`` in sorted order,
    ``splits`` maps a split name to its (labeled, unlabeled) stems."""

    root: Path
    stems: dict[str, list[tuple[str, str]]]
    splits: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    train_ids: bool = False


CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}


def _cityscapes_label_ids(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Raw label ids ``uint8 [h, w]``: sky / building / road bands, a few objects, and a strip
    holding every id 0..33 (so ignored ids such as 0 unlabeled, 1 ego vehicle, 4 static appear)."""
    label = np.empty((h, w), np.uint8)
    label[: h // 3] = 23  # sky
    label[h // 3: 2 * h // 3] = rng.choice([11, 21])  # building or vegetation
    label[2 * h // 3:] = 7  # road
    label[2 * h // 3:, : w // 5] = 8  # sidewalk
    for _ in range(int(rng.integers(1, 4))):
        label[_blob_mask(rng, h, w)] = rng.choice([24, 25, 26, 27, 28, 31, 32, 33, 17, 20])
    label[-2:] = (np.arange(w) % 34).astype(np.uint8)  # every raw id, ego vehicle strip
    label[:, :1] = 0  # unlabeled
    return label


def make_cityscapes(root: str | os.PathLike[str], *, per_city: int = 3, train_ids: bool = False,
                    splits: Mapping[str, tuple[int, str]] | None = None,
                    unlabeled_pairs: bool = True, extras: bool = True,
                    seed: int = 0) -> CityscapesTree:
    """Write a Cityscapes tree at ``root``.

    Layout (train cities aachen, bochum; val frankfurt; ``per_city`` images each)::

        leftImg8bit/<split>/<city>/<city>_<seq>_000019_leftImg8bit.png
        gtFine/<split>/<city>/<city>_<seq>_000019_gtFine_labelIds.png    raw ids 0..33
        gtFine/<split>/<city>/..._gtFine_labelTrainIds.png                (``train_ids``)
        gtFine/<split>/<city>/..._gtFine_{color.png,instanceIds.png,polygons.json} (``extras``)
        splits/<name>/labeled.txt, unlabeled.txt

    Images are about 1:2 like the real 1024x2048 frames, but each has its own size (H 32-48).

    Args:
        splits: split name -> (number of labeled train images, label kind): the pairs of
            ``labeled.txt`` name ``gtFine_<kind>.png`` with kind ``labelIds`` or
            ``labelTrainIds`` (as UniMatch ships them). Default ``{"4": (4, "labelIds")}``.
        unlabeled_pairs: ``unlabeled.txt`` lines are pairs too (UniMatch); else image paths.
    """
    root = Path(root)
    rng = np.random.default_rng([seed, 2016])
    splits = dict(splits if splits is not None else {"4": (4, "labelIds")})
    lut = np.full(256, IGNORE, np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_ID.items():
        lut[label_id] = train_id
    colours = rng.integers(0, 256, (256, 3))
    stems: dict[str, list[tuple[str, str]]] = {}
    for split, cities in CITIES.items():
        stems[split] = []
        for city in cities:
            for k in range(per_city):
                stem = f"{city}_{k * 7 + 1:06d}_000019"
                stems[split].append((city, stem))
                h = int(rng.integers(32, 49))
                w = 2 * h + int(rng.integers(-4, 5))
                raw = _cityscapes_label_ids(rng, h, w)
                image = _image_for(rng, raw, colours)
                img = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
                img.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(img)
                gt = root / "gtFine" / split / city
                gt.mkdir(parents=True, exist_ok=True)
                Image.fromarray(raw).save(gt / f"{stem}_gtFine_labelIds.png")
                if train_ids:
                    Image.fromarray(lut[raw]).save(gt / f"{stem}_gtFine_labelTrainIds.png")
                if extras:
                    Image.fromarray(colours[raw].astype(np.uint8)).save(
                        gt / f"{stem}_gtFine_color.png")
                    Image.fromarray(raw.astype(np.uint16) * 1000).save(
                        gt / f"{stem}_gtFine_instanceIds.png")
                    (gt / f"{stem}_gtFine_polygons.json").write_text(
                        json.dumps({"imgHeight": h, "imgWidth": w, "objects": []}) + "\n")
    tree = CityscapesTree(root, stems, train_ids=train_ids)
    train = stems["train"]
    for name, (n_labeled, kind) in splits.items():
        if kind not in ("labelIds", "labelTrainIds"):
            raise ValueError(f"unknown label kind {kind!r}")
        if kind == "labelTrainIds" and not train_ids:
            raise ValueError("splits naming labelTrainIds need train_ids=True")

        def pair(city: str, stem: str, kind: str = kind) -> str:
            return (f"leftImg8bit/train/{city}/{stem}_leftImg8bit.png "
                    f"gtFine/train/{city}/{stem}_gtFine_{kind}.png")

        folder = root / "splits" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "labeled.txt").write_text("".join(pair(*cs) + "\n" for cs in train[:n_labeled]))
        rest = train[n_labeled:]
        (folder / "unlabeled.txt").write_text("".join(
            (pair(*cs) if unlabeled_pairs else pair(*cs).split()[0]) + "\n" for cs in rest))
        tree.splits[name] = ([s for _, s in train[:n_labeled]], [s for _, s in rest])
    return tree
