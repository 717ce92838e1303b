"""Pascal VOC 2012 (+ SBD) reader with the split-file formats the SSL literature ships.

Split files (one item per line, blank lines and ``#`` comments skipped):

- pairs ``image_path label_path`` relative to the root, as UniMatch/U2PL/CorrMatch publish them
  (``JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png``; a leading ``/`` is
  tolerated);
- bare ids ``2007_000032`` -> ``JPEGImages/<id>.jpg`` and ``<label_dir>/<id>.png``;
- a single image path ``JPEGImages/<id>.jpg`` (some unlabeled lists) -> as a bare id.

Checks happen where they are cheap: root, split file and the existence of every listed file at
construction (``validate=True``); label values and image/label sizes when an item is read
(``validate="full"`` reads every item up front). Every error names the culprit file, and for
listed files the split file and line that named it. They are :class:`ctt.errors.DataError`
(a ``ValueError``) or :class:`ctt.errors.MissingDataError` (a ``FileNotFoundError``), so entry
points print them as one line; an unreadable image (truncated, not an image) is a DataError
naming the image and its split line, not PIL's bare ``OSError``.

:class:`SegmentationDataset` holds what VOC and Cityscapes share (``ctt.data.cityscapes``
subclasses it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ctt.data.transforms import IGNORE_INDEX, item_generator, resize_pair
from ctt.errors import DataError, MissingDataError

Transform = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Source = tuple[Path, int] | None  # (split file, 1-based line number) that listed an item

_LABEL_MODES = ("P", "L", "I", "I;16")
DEFAULT_CACHE_MB = 256


def check_root(root: str | os.PathLike, what: str, hint: str) -> Path:
    """Return ``root`` as a Path, or raise naming it and saying how to point at real data."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise MissingDataError(
            f"{what} data root '{path}' does not exist or is not a directory; {hint}"
        )
    return path


def resolve_split_file(
    root: Path, split: str | os.PathLike, extra: Sequence[Path] = ()
) -> Path:
    """Find the split file that ``split`` names.

    Tried in order: ``split`` itself if absolute; ``root/split``; ``root/split.txt``; the
    ``extra`` candidates (e.g. ``ImageSets/Segmentation/<split>.txt``);
    ``root/splits/split(.txt)``; ``split(.txt)`` relative to the working directory.
    """
    text = os.fspath(split)
    given = Path(text).expanduser()
    if given.is_absolute():
        candidates = [given, Path(text + ".txt")]
    else:
        candidates = [root / text, root / (text + ".txt"), *extra]
        candidates += [root / "splits" / text, root / "splits" / (text + ".txt")]
        candidates += [given, Path(text + ".txt")]
    for c in candidates:
        if c.is_file():
            return c
    tried = list(dict.fromkeys(str(c) for c in candidates))
    # one line: the likeliest places, then how many more were tried
    shown = ", ".join(tried[:3]) + (f" and {len(tried) - 3} more" if len(tried) > 3 else "")
    raise MissingDataError(
        f"split '{text}' not found under root '{root}' (tried {shown}): pass a split name "
        "(train, val, test, splits/<n>/labeled, splits/<n>/unlabeled) or a path to a split file"
    )


def read_split_lines(path: Path) -> list[tuple[int, list[str]]]:
    """``(line_number, tokens)`` for each non-empty, non-comment line; leading ``/`` removed."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read split file {path} ({e.strerror or e}): check that it is "
                        "a readable file") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"split file {path}, line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}): "
            "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    rows = []
    first_at: dict[str, int] = {}
    # universal newlines, as text-mode open() reads them (line numbers match an editor's)
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"),
                                  start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tokens = [t.lstrip("/") for t in line.split()]
        if len(tokens) > 2:
            raise DataError(
                f"split file {path}, line {number}: expected 'image_path label_path' or an id, "
                f"got {line[:120]!r}: fix or remove the line"
            )
        if tokens[0] in first_at:
            # a repeated item would be drawn twice as often, and evaluated twice
            raise DataError(
                f"split file {path}, line {number} lists {tokens[0]} again (first on line "
                f"{first_at[tokens[0]]}): list each item once")
        first_at[tokens[0]] = number
        rows.append((number, tokens))
    if not rows:
        raise DataError(f"split file {path} lists no items: add one item per line "
                        "('image_path label_path' or an id) or choose another split")
    return rows


def listed_at(source: Source) -> str:
    """`` (listed in <split file>, line <n>)`` for error messages; empty for walked trees."""
    return "" if source is None else f" (listed in {source[0]}, line {source[1]})"


def _unreadable(what: str, path: Path, err: OSError, source: Source) -> DataError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "truncat" in reason.lower():  # PIL says "image file is truncated" or "Truncated File Read"
        reason = f"truncated file ({reason})"
    return DataError(f"cannot read {what} {path}{listed_at(source)}: {reason}; replace the file "
                     "(copy or download it again) or remove its line from the split file")


def decode_image(path: Path, source: Source = None) -> np.ndarray:
    """RGB image file -> a writable uint8 array ``[H, W, 3]`` (what :func:`read_image` scales).

    A missing file raises :class:`MissingDataError`, an undecodable or truncated one
    :class:`DataError`; both name ``path`` and the split line ``source`` that listed it."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    except FileNotFoundError as e:
        raise MissingDataError(f"missing file {path}{listed_at(source)}") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated, unidentified, corrupt
        raise _unreadable("image", path, e, source) from e
    return array.copy()


def image_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> a new float32 ``[3, H, W]`` in ``[0, 1]`` (``array`` untouched)."""
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def read_image(path: Path, source: Source = None) -> torch.Tensor:
    """RGB image file -> float32 ``[3, H, W]`` in ``[0, 1]``; errors as :func:`decode_image`."""
    return image_tensor(decode_image(path, source))


def read_label(path: Path, source: Source = None) -> np.ndarray:
    """Label PNG -> integer array ``[H, W]`` of class indices, as stored (no mapping).

    Palette ("P") PNGs give their palette indices, which are the class ids in VOC; a colour
    ("RGB") rendering of a label is refused because its colours are not class ids. Errors name
    ``path`` and the split line ``source`` that listed it.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in _LABEL_MODES:
                raise DataError(
                    f"label file {path}{listed_at(source)} has image mode {im.mode!r}, not class "
                    "indices: use the dataset's index PNGs, palette ('P') or grayscale ('L') "
                    "(VOC SegmentationClass/, SBD SegmentationClassAug/, Cityscapes "
                    "*_labelIds.png / *_labelTrainIds.png), not colour renderings"
                )
            return np.array(im)
    except FileNotFoundError as e:
        raise MissingDataError(f"missing file {path}{listed_at(source)}") from e
    except (OSError, SyntaxError) as e:  # PIL: truncated, unidentified, corrupt
        raise _unreadable("label file", path, e, source) from e


def default_cache_bytes() -> int:
    """Per-dataset budget of decoded items kept in memory: ``$CTT_DATA_CACHE_MB`` MiB, default
    256 (the four tiny synthetic splits take 10 MiB; a full VOC train set would not fit and is
    cached only up to the budget). 0 turns the cache off."""
    text = os.environ.get("CTT_DATA_CACHE_MB", "").strip()
    try:
        mib = float(text) if text else DEFAULT_CACHE_MB
    except ValueError:
        raise DataError(f"CTT_DATA_CACHE_MB={text!r} is not a number of MiB: set it to e.g. "
                        f"{DEFAULT_CACHE_MB} (0 turns the decoded-image cache off)") from None
    return max(0, int(mib * 2**20))


class SegmentationDataset(Dataset):
    """Base: a list of ``(image, label | None)`` files -> ``(image [3,H,W], label [H,W])`` items.

    Items: image float32 ``[3, H, W]`` in ``[0, 1]``, label int64 ``[H, W]`` with values in
    ``[0, num_classes) ∪ {255}``; unlabeled datasets give an all-255 label of the image's size.

    Determinism: the transform draws from :func:`item_generator` ``(seed, epoch, index)``.
    Call :meth:`set_epoch` before each epoch (workers that are re-created per epoch see it),
    or index with ``(index, epoch)`` tuples, e.g. from a sampler, which also works with
    ``persistent_workers=True``.

    Decoding once: each item's decoded image (uint8) and checked label are kept in memory the
    first time it is read, up to ``cache_bytes`` per dataset (per process: each DataLoader
    worker has its own); items read after the budget is full are decoded on every read. Items
    are rebuilt from the kept arrays exactly as from the files, so a cached read is
    bit-identical to an uncached one. Nothing is written anywhere (the data root stays
    read-only). ``cache_bytes=None`` takes :func:`default_cache_bytes`; 0 turns it off.
    """

    def __init__(
        self,
        files: list[tuple[Path, Path | None]],
        sources: list[Source],
        *,
        num_classes: int,
        transform: Transform | None,
        labeled: bool,
        seed: int,
        resize: tuple[int, int] | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        self.files = files
        self.ids = [image.stem for image, _ in files]
        self._sources = sources
        self.num_classes = int(num_classes)
        self.transform = transform
        self.labeled = labeled
        self.seed = int(seed)
        self.epoch = 0
        self.resize = None if resize is None else (int(resize[0]), int(resize[1]))
        self.cache_bytes = default_cache_bytes() if cache_bytes is None else int(cache_bytes)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._cache_used = 0
        self.decodes = 0  # files decoded so far (cache misses), for tests and benchmarks

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` for plain integer indices."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def check_files_exist(self) -> None:
        """Raise on the first listed file that does not exist, naming its split line."""
        for (image, label), source in zip(self.files, self._sources, strict=True):
            for path in (image, label):
                if path is not None and not path.is_file():
                    raise MissingDataError(f"missing file {path}{listed_at(source)}: restore "
                                           "it or remove its line from the split file")

    def check_all(self) -> None:
        """Read every item's label and sizes (slow on big sets; ``validate="full"``)."""
        for index in range(len(self)):
            self._load(index)

    def validate(self, level: bool | str) -> None:
        """The readers' ``validate`` argument: ``True`` checks that every listed file exists,
        ``"full"`` also reads every item, ``False`` leaves both to loading."""
        if level not in (True, False, "full"):
            raise ValueError(f"validate must be True, False or 'full', got {level!r}")
        if level:
            self.check_files_exist()
        if level == "full":
            self.check_all()

    def map_label(self, raw: np.ndarray, path: Path, source: Source) -> np.ndarray:
        """Stored label values -> class ids; checks they lie in ``[0, C) ∪ {255}``."""
        bad = np.unique(raw[(raw < 0) | ((raw >= self.num_classes) & (raw != IGNORE_INDEX))])
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
            raise DataError(
                f"label file {path}{listed_at(source)} has values [{shown}] outside "
                f"[0, {self.num_classes}) and the ignore value {IGNORE_INDEX}: check "
                "data.num_classes and that the file holds class ids"
            )
        return raw

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Item ``index`` as stored: image uint8 ``[H, W, 3]``, checked class ids ``[H, W]``
        (``None`` when unlabeled); from the cache when it holds them."""
        hit = self._cache.get(index)
        if hit is not None:
            return hit
        image_path, label_path = self.files[index]
        source = self._sources[index]
        image = decode_image(image_path, source)
        mapped = None
        if self.labeled:
            assert label_path is not None
            raw = read_label(label_path, source)
            if raw.shape != image.shape[:2]:
                raise DataError(
                    f"size mismatch: image {image_path} is {image.shape[:2]} (H, W) but "
                    f"label {label_path} is {raw.shape}{listed_at(source)}: an image and its "
                    "label must have the same size; check the pair"
                )
            mapped = self.map_label(raw, label_path, source)
        self.decodes += 1
        size = image.nbytes + (0 if mapped is None else mapped.nbytes)
        if self._cache_used + size <= self.cache_bytes:
            self._cache[index] = (image, mapped)
            self._cache_used += size
        return image, mapped

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        array, mapped = self._decode(index)
        image = image_tensor(array)  # new tensors: the cached arrays are never modified
        if mapped is None:
            label = torch.full(image.shape[1:], IGNORE_INDEX, dtype=torch.int64)
        else:
            label = torch.from_numpy(mapped.astype(np.int64))
        if self.resize is not None:
            image, resized = resize_pair(image, label, self.resize)
            assert resized is not None
            label = resized
        return image, label

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``key`` is an index, or ``(index, epoch)`` to fix the augmentation epoch."""
        index, epoch = key if isinstance(key, (tuple, list)) else (key, self.epoch)
        index, epoch = int(index), int(epoch)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        image, label = self._load(index)
        if self.transform is not None:
            image, label = self.transform(image, label, item_generator(self.seed, epoch, index))
        return image, label


class VOCDataset(SegmentationDataset):
    """Pascal VOC 2012 / SBD segmentation items from a split file (see module docstring).

    Args:
        root: the ``VOC2012`` directory (holding ``JPEGImages/``, ``SegmentationClass/``...).
        split: ``train``/``val``/``test`` (``ImageSets/Segmentation/<split>.txt``),
            ``splits/<n>/labeled`` or ``splits/<n>/unlabeled``, or a path to a split file.
        num_classes: classes including background (21 for VOC).
        transform: paired transform ``t(image, label, generator)`` (``ctt.data.transforms``).
        labeled: ``False`` -> labels are not read (nor required); items carry an all-255 label.
        label_dir: directory under ``root`` holding label PNGs. ``None``: bare ids use
            ``SegmentationClassAug/`` when the id's file is there, else ``SegmentationClass/``,
            and pair lines are used as written. When given, it is used for bare ids and also
            replaces the directory of pair lines' label paths (so UniMatch's files, which say
            ``SegmentationClass/``, work with an SBD ``SegmentationClassAug/`` folder).
        validate: ``True`` checks every listed file exists now; ``False`` defers missing-file
            errors to loading; ``"full"`` also reads every label now (values and sizes).
        seed: seeds the per-item augmentation generators (with epoch and index).
        cache_bytes: decoded items kept in memory (see :class:`SegmentationDataset`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | os.PathLike,
        *,
        num_classes: int = 21,
        transform: Transform | None = None,
        labeled: bool = True,
        label_dir: str | None = None,
        validate: bool | str = True,
        seed: int = 0,
        cache_bytes: int | None = None,
    ) -> None:
        root_path = check_root(
            root,
            "VOC",
            "pass --data-root <path to VOC2012 (JPEGImages/, SegmentationClass/)> or use the "
            "synthetic dataset (data.dataset=synthetic), which is generated on first use",
        )
        self.root = root_path
        self.split_file = resolve_split_file(
            root_path, split, [root_path / "ImageSets" / "Segmentation" / f"{split}.txt"]
        )
        files, sources = [], []
        for number, tokens in read_split_lines(self.split_file):
            image, label = self._paths(tokens, labeled, label_dir)
            files.append((image, label))
            sources.append((self.split_file, number))
        super().__init__(
            files, sources, num_classes=num_classes, transform=transform, labeled=labeled,
            seed=seed, cache_bytes=cache_bytes,
        )
        self.validate(validate)

    def _paths(
        self, tokens: list[str], labeled: bool, label_dir: str | None
    ) -> tuple[Path, Path | None]:
        root = self.root
        if len(tokens) == 2:
            image = root / tokens[0]
            if not labeled:
                return image, None
            if label_dir is None:
                return image, root / tokens[1]
            return image, root / label_dir / Path(tokens[1]).name
        token = tokens[0]
        # a lone image path (some unlabeled lists) stands for its id
        item_id = Path(token).stem if token.lower().endswith((".jpg", ".jpeg", ".png")) else token
        image = root / token if item_id != token else root / "JPEGImages" / f"{item_id}.jpg"
        if not labeled:
            return image, None
        if label_dir is not None:
            return image, root / label_dir / f"{item_id}.png"
        aug = root / "SegmentationClassAug" / f"{item_id}.png"
        return image, aug if aug.is_file() else root / "SegmentationClass" / f"{item_id}.png"
