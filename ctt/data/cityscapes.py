"""Cityscapes reader: ``leftImg8bit/`` images with ``gtFine/`` labels mapped to the 19 train ids.

Layout (as downloaded)::

    <root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png        (raw ids 0..33)
    <root>/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png   (optional, from
                                                                   cityscapesScripts)

``*_labelIds.png`` are mapped to train ids with :data:`LABEL_ID_TO_TRAIN_ID` (every id outside
the 19 evaluated classes -> 255); ``*_labelTrainIds.png`` and any other label file are used
as stored. Split files use the VOC formats of :mod:`ctt.data.voc` (pairs relative to the root,
as UniMatch ships ``splits/cityscapes/*/labeled.txt``, or a lone image path).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ctt.data.transforms import IGNORE_INDEX
from ctt.data.voc import (
    SegmentationDataset,
    Source,
    Transform,
    check_root,
    listed_at,
    read_split_lines,
    resolve_split_file,
)
from ctt.errors import DataError, MissingDataError

NUM_CLASSES = 19
NUM_LABEL_IDS = 34  # raw ids 0..33; -1 (license plate) never appears in the PNGs

# The official table (cityscapesscripts/helpers/labels.py): label id -> train id for the 19
# evaluated classes: road, sidewalk, building, wall, fence, pole, traffic light, traffic sign,
# vegetation, terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle.
_EVALUATED_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
LABEL_ID_TO_TRAIN_ID[list(_EVALUATED_IDS)] = np.arange(NUM_CLASSES, dtype=np.uint8)

_IMAGE_SUFFIX = "_leftImg8bit.png"


def _label_for_image(root: Path, image_rel: str, source: Source = None) -> Path:
    """``leftImg8bit/<s>/<c>/<n>_leftImg8bit.png`` -> its gtFine label (train ids preferred)."""
    parts = Path(image_rel).parts
    if not image_rel.endswith(_IMAGE_SUFFIX) or "leftImg8bit" not in parts:
        raise DataError(
            f"cannot derive a label path from image path '{image_rel}'{listed_at(source)}: "
            f"expected leftImg8bit/<split>/<city>/<name>{_IMAGE_SUFFIX}, or list the label "
            "after the image on the same line"
        )
    i = parts.index("leftImg8bit")
    stem = parts[-1][: -len(_IMAGE_SUFFIX)]
    folder = root.joinpath(*parts[:i], "gtFine", *parts[i + 1 : -1])
    train_ids = folder / f"{stem}_gtFine_labelTrainIds.png"
    return train_ids if train_ids.is_file() else folder / f"{stem}_gtFine_labelIds.png"


class CityscapesDataset(SegmentationDataset):
    """Cityscapes fine-annotation items ``(image [3,H,W] float in [0,1], label [H,W] int64)``.

    Args:
        root: directory holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``train``/``val``/``test`` (walks ``leftImg8bit/<split>/*/``, sorted), a split
            file name under the root (``splits/<n>/labeled``, ``splits/<n>/unlabeled``) or a
            path to a split file.
        transform: paired transform ``t(image, label, generator)``, applied after ``resize``.
        labeled: ``False`` -> labels are neither read nor required; labels are all 255.
        validate: ``True`` checks every file exists now; ``False`` defers; ``"full"`` also
            reads every label (values and sizes).
        resize: ``(H, W)`` every item is resized to before the transform (image bilinear,
            label nearest); the reference trains and evaluates at ``(512, 1024)``.
        seed: seeds the per-item augmentation generators (with epoch and index).
        cache_bytes: decoded items kept in memory, before ``resize`` (see
            :class:`~ctt.data.voc.SegmentationDataset`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | os.PathLike,
        *,
        transform: Transform | None = None,
        labeled: bool = True,
        validate: bool | str = True,
        resize: tuple[int, int] | None = None,
        seed: int = 0,
        cache_bytes: int | None = None,
    ) -> None:
        root_path = check_root(
            root,
            "Cityscapes",
            "pass --data-root <directory holding leftImg8bit/ and gtFine/>",
        )
        self.root = root_path
        folder = root_path / "leftImg8bit" / os.fspath(split)
        files: list[tuple[Path, Path | None]] = []
        sources: list[Source] = []
        if os.fspath(split) in ("train", "val", "test") and folder.is_dir():
            self.split_file = None
            for image in sorted(folder.glob(f"*/*{_IMAGE_SUFFIX}")):
                rel = image.relative_to(root_path).as_posix()
                files.append((image, _label_for_image(root_path, rel) if labeled else None))
                sources.append(None)
            if not files:
                raise MissingDataError(
                    f"no images matching {folder}/<city>/*{_IMAGE_SUFFIX}; is '{root_path}' a "
                    "Cityscapes root?"
                )
        else:
            self.split_file = resolve_split_file(root_path, split, [folder])
            for number, tokens in read_split_lines(self.split_file):
                image = root_path / tokens[0]
                label = None
                if labeled:
                    label = (
                        root_path / tokens[1]
                        if len(tokens) == 2
                        else _label_for_image(root_path, tokens[0], (self.split_file, number))
                    )
                files.append((image, label))
                sources.append((self.split_file, number))
        super().__init__(
            files, sources, num_classes=NUM_CLASSES, transform=transform, labeled=labeled,
            seed=seed, resize=resize, cache_bytes=cache_bytes,
        )
        self.ids = [image.name.removesuffix(_IMAGE_SUFFIX) for image, _ in files]
        self.validate(validate)

    def map_label(self, raw: np.ndarray, path: Path, source: Source) -> np.ndarray:
        """``*_labelIds.png``: raw ids (checked < 34) -> train ids; others checked as train ids."""
        if not path.name.endswith("_labelIds.png"):
            return super().map_label(raw, path, source)
        bad = np.unique(raw[(raw < 0) | (raw >= NUM_LABEL_IDS)])
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:10])
            raise DataError(
                f"label file {path}{listed_at(source)} has values [{shown}] outside the Cityscapes "
                f"label ids [0, {NUM_LABEL_IDS}): a *_labelIds.png must hold raw label ids (not "
                "the *_color.png or *_instanceIds.png beside it)"
            )
        return LABEL_ID_TO_TRAIN_ID[raw]
