"""Datasets from a config, and resumable, deterministic batch streams.

A :class:`BatchStream` serves an endless sequence of batches: epoch ``e`` visits the items in
a permutation that is a pure function of ``(seed, e)``, and every item's augmentation is a pure
function of ``(seed, epoch, index)`` (see :mod:`ctt.data.transforms`). The whole position is
one integer, the number of items consumed, so a checkpoint stores it and a resumed run sees
exactly the batches the uninterrupted run would have seen, with or without worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ctt.config import CTTConfig
from ctt.data.transforms import eval_collate, pad_collate, train_transform
from ctt.errors import DataRootError

__all__ = ["BatchStream", "build_datasets", "dataset_root", "detect_layout", "eval_loader"]

# Separate seed streams so the labeled and unlabeled orders are unrelated.
STREAM_LABELED, STREAM_UNLABELED = 0, 1


def _stream_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream, 0xC77]).generate_state(1)[0])


def _epoch_keys(n: int, seed: int, start: int, batch_size: int,
                cache: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """``(index, epoch)`` of items ``start .. start+batch_size-1`` of the endless stream; epoch
    ``e`` is the permutation seeded by ``(seed, e)``. ``cache`` keeps the latest permutation."""
    keys = []
    for i in range(start, start + batch_size):
        epoch, pos = divmod(i, n)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        keys.append((int(cache[epoch][pos]), epoch))
    return keys


def _key_batches(n: int, seed: int, batch_size: int, start: int
                 ) -> Iterator[list[tuple[int, int]]]:
    # A free function, not a method: a generator holding ``self`` would make a reference cycle
    # (stream -> DataLoader iterator -> sampler -> stream) that keeps worker processes alive
    # until a garbage collection, or stalls interpreter exit for seconds.
    cache: dict[int, np.ndarray] = {}
    while True:
        yield _epoch_keys(n, seed, start, batch_size, cache)
        start += batch_size


class BatchStream:
    """Endless batches of ``batch_size`` items from ``dataset``; position = items consumed.

    Args:
        dataset: map-style dataset accepting ``(index, epoch)`` keys (our readers do).
        batch_size: items per batch; batches run across epoch boundaries (no dropped tail,
            so a 16-image labeled set works with batch 8 or 10 alike).
        seed: fixes the per-epoch permutations.
        num_workers: DataLoader worker processes (0 = load in this process).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, num_workers: int = 0):
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("BatchStream got an empty dataset")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.consumed = 0
        self._n = len(dataset)  # type: ignore[arg-type]
        self._perm_cache: dict[int, np.ndarray] = {}
        self._iter: Iterator | None = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(images [B,3,H,W], labels [B,H,W])``."""
        if self.num_workers == 0:
            keys = _epoch_keys(self._n, self.seed, self.consumed, self.batch_size,
                               self._perm_cache)
            batch = pad_collate([self.dataset[k] for k in keys])
        else:
            if self._iter is None:
                keys = _key_batches(self._n, self.seed, self.batch_size, self.consumed)
                loader = DataLoader(self.dataset, batch_sampler=keys,
                                    num_workers=self.num_workers, collate_fn=pad_collate,
                                    persistent_workers=True)
                self._iter = iter(loader)
            batch = next(self._iter)
        self.consumed += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])
        self.close()  # workers restart at the restored position

    def close(self) -> None:
        """Stop the worker processes (if any); the next :meth:`next` starts new ones."""
        self._iter = None


# Which preset reads each layout, for "found X; use Y" messages.
_FITS = {"synthetic": "--preset tiny (data.dataset=synthetic)",
         "voc": "--preset voc-r101 or voc-r101-v3plus (data.dataset=voc)",
         "cityscapes": "--preset cityscapes-r101 (data.dataset=cityscapes)"}
_NEEDS = {"synthetic": "a synthetic dataset written by `python -m ctt.data.synthetic --root DIR`",
          "voc": "a Pascal VOC 2012 root (JPEGImages/ and SegmentationClass/ or "
                 "SegmentationClassAug/)",
          "cityscapes": "a Cityscapes root (leftImg8bit/ and gtFine/)"}


def detect_layout(root: Path) -> str | None:
    """``"synthetic"``, ``"voc"`` or ``"cityscapes"`` by the directories ``root`` holds, else
    ``None``. Looks only at names (cheap, read-only); the readers check the files themselves."""
    from ctt.data import synthetic

    if (root / synthetic.MARKER).is_file():
        return "synthetic"
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if (root / "JPEGImages").is_dir() and any(
            (root / d).is_dir() for d in ("SegmentationClass", "SegmentationClassAug")):
        return "voc"
    return None


def _layout_hint(root: Path, found: str | None) -> str:
    if found is not None:
        return f"it holds a {found} dataset; use {_FITS[found]}"
    inner = [p.name for p in (root / "VOC2012", root / "VOCdevkit") if p.is_dir()]
    if inner:
        return f"it holds no dataset itself; did you mean {root / inner[0]}?"
    entries = sorted(p.name for p in root.iterdir())[:6] if root.is_dir() else []
    return ("it holds no known dataset layout (found: " + (", ".join(entries) or "nothing")
            + ")")


def dataset_root(cfg: CTTConfig) -> Path:
    """The data root of ``cfg``, checked against ``data.dataset``; never written to.

    ``data.root=none`` is allowed only for the synthetic set, which is then generated once into
    the cache (``~/.cache/ctt``, or ``$CTT_CACHE``). A given root must exist and hold the
    layout of ``data.dataset``; a synthetic set is generated into a directory of your choice
    only by ``python -m ctt.data.synthetic --root DIR``. Raises :class:`DataRootError` naming
    the root, the layout found and the preset that fits it.
    """
    d = cfg.data
    if d.root == "none":
        if d.dataset == "synthetic":
            from ctt.data import synthetic

            return Path(synthetic.ensure(None, num_classes=d.num_classes))
        raise DataRootError(
            f"data.dataset={d.dataset!r} needs its dataset: pass --data-root DIR (or --set "
            f"data.root=DIR) pointing at {_NEEDS[d.dataset]}")
    root = Path(d.root).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataRootError(f"data root {root} {what}; pass --data-root pointing at "
                            f"{_NEEDS[d.dataset]}")
    found = detect_layout(root)
    if found != d.dataset:
        raise DataRootError(f"data root {root} is not {_NEEDS[d.dataset]}: "
                            f"{_layout_hint(root, found)}")
    if found == "synthetic":
        from ctt.data import synthetic

        # Any size/split of a generated set is used as is, but the class count must match: a
        # mismatch would only surface as a label-range error inside a trial.
        have = synthetic.read_marker(root).get("params", {}).get("num_classes")
        if have != d.num_classes:
            raise DataRootError(f"synthetic dataset {root} has num_classes={have}, but "
                                f"data.num_classes={d.num_classes}; set "
                                f"data.num_classes={have} or use another data root")
    return root


def _split_path(root: Path, name: str, part: str) -> str:
    p = Path(name)
    if p.is_absolute() or (root / p).is_dir():
        return str(p / f"{part}.txt")
    return f"splits/{name}/{part}"


def _make(cfg: CTTConfig, root: Path, split: str, *, labeled: bool, transform=None,
          seed: int = 0) -> Dataset:
    d = cfg.data
    if d.dataset == "cityscapes":
        from ctt.data.cityscapes import CityscapesDataset

        # The reference resizes every Cityscapes image to 512x1024 before cropping/evaluating.
        resize = (d.eval_size, d.eval_size * 2) if d.eval_size else None
        return CityscapesDataset(root, split, transform=transform, labeled=labeled, seed=seed,
                                 resize=resize)
    from ctt.data.voc import VOCDataset

    label_dir = None if d.label_dir == "auto" else d.label_dir
    return VOCDataset(root, split, num_classes=d.num_classes, transform=transform,
                      labeled=labeled, label_dir=label_dir, seed=seed)


def build_datasets(cfg: CTTConfig, root: Path | None = None, *,
                   need_unlabeled: bool = True) -> dict[str, Dataset]:
    """``{"labeled", "unlabeled"?, "val", "test"?}`` datasets for ``cfg`` (train ones augmented).

    ``need_unlabeled=False`` skips the unlabeled split (supervised runs; ``splits/all`` has
    no unlabeled part)."""
    root = dataset_root(cfg) if root is None else root
    d = cfg.data
    tf = train_transform(d.crop_size, d.crop_width, (d.scale_min, d.scale_max), d.flip)
    out = {
        "labeled": _make(cfg, root, _split_path(root, d.labeled_split, "labeled"),
                         labeled=True, transform=tf,
                         seed=_stream_seed(cfg.run.seed, STREAM_LABELED)),
        "val": _make(cfg, root, d.val_split, labeled=True),
    }
    if need_unlabeled:
        out["unlabeled"] = _make(cfg, root, _split_path(root, d.labeled_split, "unlabeled"),
                                 labeled=False, transform=tf,
                                 seed=_stream_seed(cfg.run.seed, STREAM_UNLABELED))
    if d.test_split != "none":
        out["test"] = _make(cfg, root, d.test_split, labeled=True)
    return out


def eval_loader(dataset: Dataset, batch_size: int = 16, num_workers: int = 0) -> DataLoader:
    """Whole-image evaluation batches (:class:`~ctt.data.transforms.EvalBatch`: padded, with
    each image's size, so :func:`ctt.evaluate.evaluate` runs every image without padding)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=eval_collate)
