"""Per-class FIFO memory bank of teacher features (docs/method.md, step 5).

One ``MemoryBank`` per teacher; what to push is chosen by the pure function
``select_bank_candidates``; ``bank_ready`` decides when the contrastive terms may start
(the latched flag itself lives in ``TrainState``).
"""

from __future__ import annotations

import torch
from torch import nn

from ctt.data.transforms import IGNORE_INDEX

READY_MODES = ("all_full", "min_fill")


class MemoryBank(nn.Module):
    """``C`` ring buffers of ``Q`` feature vectors each, stored as buffers (so they are in
    ``state_dict`` and move with ``.to(device)``).

    Buffers:
        queue: ``[C, Q, D]`` features; slot ``j`` of class ``c`` is filled iff ``j < count[c]``.
        ptr: ``[C]`` long, the slot the next feature of class ``c`` is written to.
        count: ``[C]`` long, number of filled slots (``<= Q``).

    Slot order is a ring, not chronological: once a class is full its oldest entry sits at
    ``ptr[c]``. Use ``ordered(c)`` for oldest-to-newest. The losses do not depend on order.
    """

    queue: torch.Tensor
    ptr: torch.Tensor
    count: torch.Tensor

    def __init__(self, num_classes: int, size: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if num_classes < 1 or size < 1 or dim < 1:
            raise ValueError(
                f"MemoryBank needs num_classes, size, dim >= 1, got {num_classes}, {size}, {dim}"
            )
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.register_buffer("queue", torch.zeros(num_classes, size, dim, dtype=dtype))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, feats: torch.Tensor, classes: torch.Tensor) -> None:
        """Enqueue rows per class; later rows are newer; the oldest are dropped when full.

        If more than ``Q`` rows of one class arrive in one push, only its last ``Q`` are kept.
        Stored detached, converted to the bank's dtype and device.

        Args:
            feats: ``[N, D]``.
            classes: ``[N]`` long in ``[0, C)``.
        """
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"feats must have shape [N, {self.dim}], got {tuple(feats.shape)}")
        if classes.shape != feats.shape[:1]:
            raise ValueError(
                f"classes must have shape [N] = [{feats.shape[0]}], got {tuple(classes.shape)}"
            )
        n = classes.numel()
        if n == 0:
            return
        device = self.queue.device
        classes = classes.to(device=device, dtype=torch.long)
        if int(classes.min()) < 0 or int(classes.max()) >= self.num_classes:
            raise ValueError(
                f"classes must lie in [0, {self.num_classes}), got values in "
                f"[{int(classes.min())}, {int(classes.max())}]; filter ignore (255) pixels first"
            )
        feats = feats.detach().to(device=device, dtype=self.queue.dtype)

        # rank of each row among the rows of its class in this push (0 = oldest)
        sorted_cls, order = torch.sort(classes, stable=True)
        first = torch.searchsorted(sorted_cls, sorted_cls)
        rank = torch.empty_like(classes)
        rank[order] = torch.arange(n, device=device) - first
        arrived = torch.bincount(classes, minlength=self.num_classes)  # [C]

        # Rows before the last Q of their class would be overwritten within this very push; drop
        # them, because index_put with duplicate indices has no defined winner (CUDA).
        skipped = (arrived - self.size).clamp(min=0)  # [C]
        keep = rank >= skipped[classes]
        slot = (self.ptr[classes] + rank - skipped[classes]) % self.size
        self.queue[classes[keep], slot[keep]] = feats[keep]

        stored = arrived - skipped
        self.ptr.copy_((self.ptr + stored) % self.size)
        self.count.copy_((self.count + stored).clamp(max=self.size))

    def ordered(self, c: int) -> torch.Tensor:
        """Class ``c``'s filled entries, oldest first: ``[count[c], D]``."""
        n = int(self.count[c])
        slots = (int(self.ptr[c]) - n + torch.arange(n, device=self.queue.device)) % self.size
        return self.queue[c, slots]

    @property
    def features(self) -> torch.Tensor:
        """``[C, Q, D]``, the raw queue (ring order; invalid slots hold stale zeros)."""
        return self.queue

    @property
    def valid(self) -> torch.Tensor:
        """``[C, Q]`` bool, True for filled slots."""
        return torch.arange(self.size, device=self.count.device)[None, :] < self.count[:, None]

    @property
    def counts(self) -> torch.Tensor:
        """``[C]`` long, filled slots per class."""
        return self.count

    @property
    def full(self) -> bool:
        """True when every class holds ``Q`` entries."""
        return bool((self.count == self.size).all())

    @property
    def fill(self) -> float:
        """Mean fraction of filled slots over classes, in ``[0, 1]`` (the ``bank/fill`` metric)."""
        return float(self.count.float().mean() / self.size)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, size={self.size}, dim={self.dim}"


@torch.no_grad()
def select_bank_candidates(
    feats: torch.Tensor,
    probs: torch.Tensor,
    labels: torch.Tensor,
    tau_bank: float,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident, correctly predicted labelled pixels to enqueue, at most ``k`` per class.

    A pixel qualifies when ``label != 255``, ``argmax(probs) == label`` and
    ``max(probs) >= tau_bank``. ``probs`` must be softmax probabilities: the reference
    compares raw logits with 0.95 (a bug; docs/method.md#deviations-from-the-reference-code).
    Per class the ``k`` most confident qualify; ties go to the lower flat pixel index
    (``b, y, x`` order).

    Output is grouped by class (ascending) and, within a class, ordered from least to most
    confident, so that after ``MemoryBank.push`` the most confident pixel is the newest (the
    last to be evicted).

    Args:
        feats: ``[B, D, h, w]`` teacher features.
        probs: ``[B, C, h, w]`` teacher softmax probabilities.
        labels: ``[B, h, w]`` long, 255 = ignore (already resized to ``h, w``).
        tau_bank: probability threshold.
        k: maximum number of pixels per class (``>= 1``).

    Returns:
        ``(feats [M, D], classes [M] long)``.
    """
    if feats.dim() != 4 or probs.dim() != 4:
        raise ValueError(
            f"feats [B, D, h, w] and probs [B, C, h, w] must be 4-d, got {tuple(feats.shape)} "
            f"and {tuple(probs.shape)}"
        )
    b, d, h, w = feats.shape
    if probs.shape[0] != b or probs.shape[2:] != feats.shape[2:] or labels.shape != (b, h, w):
        raise ValueError(
            f"shapes disagree: feats {tuple(feats.shape)}, probs {tuple(probs.shape)}, labels "
            f"{tuple(labels.shape)}; resize probs/labels (nearest for labels) to the feature size"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")

    conf, pred = probs.max(1)  # [B, h, w]
    ok = (labels != IGNORE_INDEX) & (pred == labels) & (conf >= tau_bank)
    idx = ok.flatten().nonzero().squeeze(1)  # ascending flat index
    cls = labels.flatten()[idx]
    # Stable sorts compose: confidence descending (ties keep ascending index), then class.
    by_conf = torch.sort(conf.flatten()[idx], descending=True, stable=True).indices
    idx, cls = idx[by_conf], cls[by_conf]
    by_cls = torch.sort(cls, stable=True).indices
    idx, cls = idx[by_cls], cls[by_cls]
    rank = torch.arange(idx.numel(), device=idx.device) - torch.searchsorted(cls, cls)
    top = rank < k
    idx, cls = idx[top], cls[top]
    # Reverse within each class: most confident last. Flip all, then stable-sort by class.
    idx, cls = idx.flip(0), cls.flip(0)
    by_cls = torch.sort(cls, stable=True).indices
    idx, cls = idx[by_cls], cls[by_cls]

    flat_feats = feats.permute(0, 2, 3, 1).reshape(-1, d)  # [B*h*w, D]
    return flat_feats[idx], cls.long()


def bank_ready(banks: list[MemoryBank], mode: str, min_fill: int) -> bool:
    """Whether the contrastive terms may switch on (the caller latches the first True).

    - ``"all_full"`` (reference): every class is full in every bank.
    - ``"min_fill"``: at least one class has entries, and every class that has entries in
      any bank ("seen so far") has at least ``min_fill`` entries in every bank. Classes never
      seen do not block, which helps when a rare class never yields confident pixels.

    Args:
        banks: the teachers' banks (same ``num_classes`` and ``size``).
        mode: ``"all_full"`` or ``"min_fill"``.
        min_fill: entries per seen class for ``"min_fill"``, in ``[1, Q]``.
    """
    if mode not in READY_MODES:
        raise ValueError(f"unknown bank_ready mode {mode!r}; choose one of {READY_MODES}")
    if not banks:
        raise ValueError("bank_ready needs at least one MemoryBank")
    if mode == "all_full":
        return all(bank.full for bank in banks)
    size = banks[0].size
    if not 1 <= min_fill <= size:
        raise ValueError(
            f"method.bank_min_fill must be in [1, bank_size={size}], got {min_fill}"
        )
    counts = torch.stack([bank.counts for bank in banks])  # [K, C]
    seen = (counts > 0).any(0)
    return bool(seen.any()) and bool((counts[:, seen] >= min_fill).all())
