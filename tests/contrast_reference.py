"""The contrastive losses as a per-class loop: the reference that tests/test_losses.py checks
``ctt.losses.high_level_contrast`` / ``low_level_contrast`` against (float64, values and
gradients), and that benchmarks/bench_contrast.py and gpu_bench.py time them against (the loop
is the shape of the reference code; it is vectorised within a class only).

For an anchor ``a`` with positive ``p`` and negatives ``n`` (every valid bank entry of the other
classes), with ``s(x, y) = x . y / temperature``::

    InfoNCE(a, p) = -log(e^s(a,p) / (e^s(a,p) + sum_n e^s(a,n)))
                  = log(e^s(a,p) + sum_n e^s(a,n)) - s(a,p)

which is 0 when there are no negatives. A class's loss is the mean over its (anchor, positive)
pairs; the loss is the mean over the classes that have pairs (0, with a graph, when none has).
"""

from __future__ import annotations

import torch


def _info_nce(s_pos: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
    """``s_pos [n, P]`` (or ``[n]``) positive and ``s_neg [n, M]`` negative similarities ->
    InfoNCE of every (anchor, positive) pair, same shape as ``s_pos``."""
    if s_neg.shape[1] == 0:
        return s_pos * 0
    lse_neg = torch.logsumexp(s_neg, dim=1)  # [n]
    if s_pos.dim() == 2:
        lse_neg = lse_neg[:, None]
    return torch.logaddexp(s_pos, lse_neg) - s_pos


def _negatives(bank: torch.Tensor, bank_valid: torch.Tensor, c: int) -> torch.Tensor:
    """Every valid entry of the classes other than ``c``: ``[M, D]``."""
    other = torch.arange(bank.shape[0], device=bank.device) != c
    return bank[other][bank_valid[other]]


def _mean_or_zero(per_class: list[torch.Tensor], anchors: torch.Tensor) -> torch.Tensor:
    return torch.stack(per_class).mean() if per_class else anchors.sum() * 0


def loop_high_level(anchors: torch.Tensor, anchor_classes: torch.Tensor, bank: torch.Tensor,
                    bank_valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """High-level contrast: the positives of an anchor of class ``c`` are the valid entries of
    ``bank[c]``; a class without anchors or without positives is left out.

    ``anchors [N, D]``, ``anchor_classes [N]``, ``bank [C, Q, D]``, ``bank_valid [C, Q]``."""
    per_class = []
    for c in range(bank.shape[0]):
        a = anchors[anchor_classes == c]  # [n_c, D]
        pos = bank[c][bank_valid[c]]  # [P, D]
        if a.shape[0] == 0 or pos.shape[0] == 0:
            continue
        neg = _negatives(bank, bank_valid, c)  # [M, D]
        per_class.append(_info_nce(a @ pos.T / temperature, a @ neg.T / temperature).mean())
    return _mean_or_zero(per_class, anchors)


def loop_low_level(anchors: torch.Tensor, positives: torch.Tensor, anchor_classes: torch.Tensor,
                   bank: torch.Tensor, bank_valid: torch.Tensor, temperature: float
                   ) -> torch.Tensor:
    """Low-level contrast: each anchor has its own positive (``positives [N, D]``, row by row);
    a class without anchors is left out.

    ``anchors [N, D]``, ``anchor_classes [N]``, ``bank [C, Q', D]``, ``bank_valid [C, Q']``."""
    per_class = []
    for c in range(bank.shape[0]):
        sel = anchor_classes == c
        a = anchors[sel]  # [n_c, D]
        if a.shape[0] == 0:
            continue
        s_pos = (a * positives[sel]).sum(1) / temperature  # [n_c]
        neg = _negatives(bank, bank_valid, c)  # [M, D]
        per_class.append(_info_nce(s_pos, a @ neg.T / temperature).mean())
    return _mean_or_zero(per_class, anchors)
