"""Paired geometric transforms for segmentation: one draw moves image and label together.

Every transform is a callable ``t(image, label, generator=None) -> (image, label)`` on

- ``image``: float tensor ``[3, H, W]`` (any range; datasets give ``[0, 1]``),
- ``label``: int64 tensor ``[H, W]`` of class ids, ``255`` = ignore.

Images are resampled bilinearly; labels are *always* resampled with nearest neighbour so a
label never holds a value that was not in it before (or the ignore index, from padding).

Determinism
-----------
All randomness comes from the ``torch.Generator`` passed in (the global torch RNG when
``None``). The datasets (``ctt.data.voc``, ``ctt.data.cityscapes``) build a fresh generator
for every item with :func:`item_generator` ``(seed, epoch, index)``, so an augmented item
depends only on those three numbers - not on the DataLoader worker that loads it, the
number of workers, or what that worker loaded before. Workers never share RNG state, and
there is no ``worker_init_fn`` to get right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# The label value of pixels without a class (VOC's object borders, Cityscapes' void classes,
# padding, unlabeled images): the one definition, which losses, banks and evaluation import.
IGNORE_INDEX = 255

PairTransform = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch RNG for one dataset item, a pure function of ``(seed, epoch, index)``.

    ``SeedSequence`` hashes the triple, so neighbouring items/epochs get unrelated streams
    (a plain ``seed + index`` would make item ``i`` of epoch ``e+1`` equal item ``i+1``...).
    """
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {(seed, epoch, index)}")
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator | None, high: int) -> int:
    """Uniform integer in ``[0, high]`` (inclusive)."""
    return int(torch.randint(high + 1, (), generator=generator).item())


def _check_pair(image: torch.Tensor, label: torch.Tensor) -> None:
    if image.dim() != 3 or label.dim() != 2 or image.shape[1:] != label.shape:
        raise ValueError(
            f"expected image [C, H, W] and label [H, W] of the same H, W; "
            f"got image {tuple(image.shape)} and label {tuple(label.shape)}"
        )


def resize_pair(
    image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize ``image [C, H, W]`` bilinearly and ``label [H, W]`` by nearest neighbour to ``size``.

    Both use pixel-centre alignment (``align_corners=False`` / ``"nearest-exact"``) so the
    label pixel chosen is the one whose centre is nearest the image sample point.
    """
    h, w = size
    if image.shape[-2:] == (h, w):
        return image, label
    image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    if label is not None:
        # float32 holds every id exactly; nearest only copies values, never blends them
        lab = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest-exact")
        label = lab[0, 0].to(torch.int64)
    return image, label


class RandomScale:
    """Scale both sides by one factor ``s ~ U(min_scale, max_scale)``; sizes rounded to ints."""

    def __init__(self, min_scale: float, max_scale: float) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, label)
        s = _uniform(generator, self.min_scale, self.max_scale)
        h, w = label.shape
        size = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
        image, label = resize_pair(image, label, size)
        return image, label

    def __repr__(self) -> str:
        return f"RandomScale({self.min_scale}, {self.max_scale})"


class RandomCrop:
    """Random ``height x width`` window; smaller inputs are first padded at the bottom/right
    with 0 (image) and ``ignore_index`` (label), so padding never counts as a class."""

    def __init__(self, height: int, width: int | None = None, ignore_index: int = IGNORE_INDEX):
        width = height if width is None else width
        if height <= 0 or width <= 0:
            raise ValueError(f"crop size must be positive, got {height}x{width}")
        self.height, self.width, self.ignore_index = int(height), int(width), ignore_index

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, label)
        h, w = label.shape
        pad_h, pad_w = max(self.height - h, 0), max(self.width - w, 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
            h, w = label.shape
        top = _randint(generator, h - self.height)
        left = _randint(generator, w - self.width)
        rows, cols = slice(top, top + self.height), slice(left, left + self.width)
        return image[:, rows, cols], label[rows, cols]

    def __repr__(self) -> str:
        return f"RandomCrop({self.height}, {self.width}, ignore_index={self.ignore_index})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, label)
        # always draw, so the stream consumed does not depend on p
        if torch.rand((), generator=generator).item() < self.p:
            image, label = image.flip(-1), label.flip(-1)
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[PairTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for t in self.transforms:
            image, label = t(image, label, generator)
        return image, label

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def train_transform(
    crop_size: int,
    crop_width: int = 0,
    scale: tuple[float, float] = (0.5, 1.6),
    flip: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> Compose:
    """Training augmentation: random scale, random ``crop_size x (crop_width or crop_size)``
    crop (padded with ignore), optional horizontal flip. ``scale=(1, 1)`` skips scaling."""
    steps: list[PairTransform] = []
    if tuple(scale) != (1.0, 1.0):
        steps.append(RandomScale(*scale))
    steps.append(RandomCrop(crop_size, crop_width or crop_size, ignore_index))
    if flip:
        steps.append(RandomHorizontalFlip(0.5))
    return Compose(steps)


def pad_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]], ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate items of different sizes by padding at the bottom/right to the largest H, W.

    Images ``[3, H_i, W_i]`` are padded with 0 and labels ``[H_i, W_i]`` with
    ``ignore_index``; returns ``images [B, 3, H, W]`` and ``labels [B, H, W]``. Training crops
    all have the crop size, so nothing is padded there. A network fed padded images would see
    the padding (border convolutions, global pooling), so evaluation uses
    :func:`eval_collate`, which records the sizes so that the padding can be cropped off.
    """
    if len(batch) == 0:
        raise ValueError("pad_collate got an empty batch")
    height = max(int(lab.shape[-2]) for _, lab in batch)
    width = max(int(lab.shape[-1]) for _, lab in batch)
    first_img, first_lab = batch[0]
    images = first_img.new_zeros((len(batch), first_img.shape[0], height, width))
    labels = first_lab.new_full((len(batch), height, width), ignore_index)
    for i, (img, lab) in enumerate(batch):
        _check_pair(img, lab)
        h, w = lab.shape
        images[i, :, :h, :w] = img
        labels[i, :h, :w] = lab
    return images, labels


class EvalBatch(NamedTuple):
    """A padded evaluation batch that remembers each item's own size.

    images: ``[B, 3, H, W]`` padded as :func:`pad_collate` pads them.
    labels: ``[B, H, W]`` padded with ``ignore_index``.
    sizes: ``[B, 2]`` int64, item ``i``'s unpadded ``(H_i, W_i)``: an evaluator crops
        ``images[i, :, :H_i, :W_i]`` and runs items of equal size together, so a prediction
        never sees padding (convolutions at the border, global pooling) and does not depend
        on which images share its batch.
    """

    images: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor


def eval_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]], ignore_index: int = IGNORE_INDEX
) -> EvalBatch:
    """:func:`pad_collate` plus each item's size, for :func:`ctt.evaluate.evaluate`."""
    images, labels = pad_collate(batch, ignore_index)
    sizes = torch.tensor([tuple(lab.shape[-2:]) for _, lab in batch], dtype=torch.int64)
    return EvalBatch(images, labels, sizes.view(-1, 2))

