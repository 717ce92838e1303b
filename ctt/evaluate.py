"""Single-scale evaluation: confusion matrix over the whole set (bincount), IoU, mIoU in %."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctt.data.transforms import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`pred`, `target` integer tensors of the same shape `[N, ...]` -> `[C, C]` int64,
    rows = target class, columns = predicted class; pixels with `target == ignore_index` are
    skipped. Any other value outside `[0, C)` in either tensor is an error."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"pred values must lie in [0, {num_classes}), got "
                         f"[{int(pred.min())}, {int(pred.max())}]")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target values must lie in [0, {num_classes}) or equal ignore_index="
                         f"{ignore_index}, got [{int(target.min())}, {int(target.max())}]")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def miou(cm: torch.Tensor) -> tuple[float, list[float]]:
    """`cm [C, C]` -> (mIoU, per-class IoU), in percent. Classes absent from both ground truth
    and prediction are NaN in the list and left out of the mean; no class present -> 0.0."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    iou = torch.where(union > 0, 100.0 * inter / union.clamp(min=1), torch.nan)
    present = union > 0
    mean = float(iou[present].mean()) if present.any() else 0.0
    return mean, [float(v) for v in iou]


def _same_size_groups(batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images [n, 3, h, w], labels [n, h, w])`` per distinct item size of ``batch``, padding
    cropped off. Batches without ``sizes`` (plain tuples) are one group as they are."""
    images, labels = batch[0], batch[1]
    sizes = getattr(batch, "sizes", None)
    if sizes is None:
        return [(images, labels)]
    groups = []
    for h, w in dict.fromkeys(tuple(int(v) for v in s) for s in sizes):  # first-seen order
        idx = ((sizes[:, 0] == h) & (sizes[:, 1] == w)).nonzero().flatten()
        groups.append((images[idx, :, :h, :w], labels[idx, :h, :w]))
    return groups


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int,
             device: str | torch.device = "cpu", ignore_index: int = IGNORE_INDEX) -> dict:
    """Run `model` over `loader` (batches `(images [B, 3, H, W], labels [B, H, W], ...)`).

    Batches from :func:`ctt.data.transforms.eval_collate` carry each item's size: their padding
    is cropped off and items of equal size run together, so every prediction is that of the
    image alone, whatever else shares its batch (padding would otherwise reach the prediction
    through border convolutions and the global pooling of the DeepLab heads). Other batches
    run as they are. Logits are upsampled bilinearly (align_corners=True) to the label size
    and argmaxed; the confusion matrix is accumulated over the whole set, ignoring
    `ignore_index` pixels. The model runs in eval mode and gets its previous mode back
    afterwards. Returns `{"miou": float, "per_class": list[float], "pixel_acc": float,
    "confusion": [C, C]}` (percentages; pixel_acc is 0.0 when no pixel is labelled).
    """
    return evaluate_many([model], loader, num_classes, device, ignore_index)[0]


@torch.no_grad()
def evaluate_many(models: Sequence[nn.Module], loader: Iterable, num_classes: int,
                  device: str | torch.device = "cpu", ignore_index: int = IGNORE_INDEX
                  ) -> list[dict]:
    """:func:`evaluate` of each of `models` in one pass over `loader`: every batch is loaded
    (and its images decoded) once and run through each model in turn. Each model sees the
    same inputs as in a pass of its own, so its result is identical to :func:`evaluate`'s.
    Returns one result dict per model, in order."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    cms = [torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
           for _ in models]
    try:
        for batch in loader:
            for images, labels in _same_size_groups(batch):
                images, labels = images.to(device), labels.to(device)
                for model, cm in zip(models, cms, strict=True):
                    out = model(images)
                    logits = out[0] if isinstance(out, (tuple, list)) else out  # [n, C, h, w]
                    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                                           align_corners=True)
                    cm += confusion_matrix(logits.argmax(1), labels, num_classes, ignore_index)
    finally:
        for m, was_training in zip(models, modes, strict=True):
            m.train(was_training)
    return [_summary(cm.cpu()) for cm in cms]


def _summary(cm: torch.Tensor) -> dict:
    total = int(cm.sum())
    mean, per_class = miou(cm)
    pixel_acc = 100.0 * int(cm.diag().sum()) / total if total else 0.0
    return {"miou": mean, "per_class": per_class, "pixel_acc": pixel_acc, "confusion": cm}
