"""Loss functions of Cross Teacher Training: pure functions of tensors.

Shapes: ``B`` batch, ``C`` classes, ``H, W`` crop size, ``N`` anchors, ``D`` feature dim,
``Q`` bank slots per class. Every loss returns a 0-dim tensor that is 0 (never NaN) when
there is nothing to average over, and stays connected to its inputs so ``backward()`` works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ctt.data.transforms import IGNORE_INDEX

WEIGHTINGS = ("uniform", "power", "mask")


def _check_ndim(name: str, t: torch.Tensor, ndim: int, shape: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_same_spatial(logits: torch.Tensor, name: str, t: torch.Tensor) -> None:
    b, _, h, w = logits.shape
    if tuple(t.shape) != (b, h, w):
        raise ValueError(
            f"{name} must have shape [B, H, W] = {(b, h, w)} to match logits "
            f"{tuple(logits.shape)}, got {tuple(t.shape)}; resize it (nearest) to the logits"
        )


def supervised_ce(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Cross-entropy averaged over labelled pixels.

    ``L = (1 / |V|) sum_{i in V} -log softmax(logits_i)[y_i]``, ``V = {i : y_i != ignore}``.

    Args:
        logits: ``[B, C, H, W]``.
        labels: ``[B, H, W]`` long, ``ignore_index`` marks unlabelled pixels.

    Returns:
        0-dim tensor; 0 when every pixel is ignored (the reference would give NaN).
    """
    _check_ndim("logits", logits, 4, "[B, C, H, W]")
    _check_same_spatial(logits, "labels", labels)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    n_valid = (labels != ignore_index).sum().clamp(min=1)
    return total / n_valid


def pseudo_label_ce(
    logits: torch.Tensor,
    pseudo: torch.Tensor,
    conf: torch.Tensor,
    *,
    weighting: str,
    tau_p: float,
) -> tuple[torch.Tensor, float]:
    """Confidence-weighted cross-entropy against teacher pseudo-labels (docs/method.md,
    step 3).

    With ``V`` the pixels whose pseudo-label is not 255 (e.g. padding) and
    ``CE_i = -log softmax(logits_i)[yhat_i]``:

    - ``"uniform"`` (reference ClassMix/CTT): ``w = |{i in V : conf_i >= tau_p}| / |V|``, one
      scalar for the whole batch, ``L = w * mean_{i in V} CE_i``.
    - ``"power"`` (reference "threshold" option): ``w_i = conf_i^6``,
      ``L = mean_{i in V} w_i CE_i``.
    - ``"mask"``: ``K = {i in V : conf_i >= tau_p}``, ``L = mean_{i in K} CE_i`` (0 if K empty).

    The reference counts padded pixels in the denominators; we exclude them, which only
    matters when a crop is padded.

    Args:
        logits: ``[B, C, H, W]`` student logits.
        pseudo: ``[B, H, W]`` long pseudo-labels (255 = ignore).
        conf: ``[B, H, W]`` teacher confidence in ``[0, 1]``; treated as a constant.
        weighting: one of ``"uniform"``, ``"power"``, ``"mask"``.
        tau_p: confidence threshold for ``"uniform"`` and ``"mask"``.

    Returns:
        ``(loss, weight)``: 0-dim loss tensor and the mean pixel weight over ``V`` as a
        Python float (the ``pl/weight`` metric; for ``"mask"`` the kept fraction).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    _check_ndim("logits", logits, 4, "[B, C, H, W]")
    _check_same_spatial(logits, "pseudo", pseudo)
    _check_same_spatial(logits, "conf", conf)
    conf = conf.detach()
    ce = F.cross_entropy(logits, pseudo, ignore_index=IGNORE_INDEX, reduction="none")  # [B, H, W]
    valid = pseudo != IGNORE_INDEX
    n_valid = valid.sum().clamp(min=1)
    confident = valid & (conf >= tau_p)
    if weighting == "uniform":
        w = confident.sum().to(ce.dtype) / n_valid
        loss = w * ce.sum() / n_valid
        weight = w
    elif weighting == "power":
        w = torch.where(valid, conf.to(ce.dtype) ** 6, torch.zeros_like(ce))
        loss = (w * ce).sum() / n_valid
        weight = w.sum() / n_valid
    else:
        # ce is already 0 on ignored pixels; zero the unconfident ones with where (not *) so a
        # non-finite CE on a dropped pixel cannot leak into the sum.
        kept = torch.where(confident, ce, torch.zeros_like(ce))
        loss = kept.sum() / confident.sum().clamp(min=1)
        weight = confident.sum() / n_valid
    return loss, float(weight)


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum_{j : mask_j} exp(x_j)`` along ``dim``; ``-inf`` where the mask is all False.

    ``torch.logsumexp`` of an all ``-inf`` row is ``-inf`` too, but its backward computes
    ``exp(-inf - (-inf)) = NaN``; here such rows get a zero gradient instead.

    Args:
        x: any shape; ``mask``: bool, broadcastable to ``x``.

    Returns:
        ``x`` reduced over ``dim`` (the dim is removed).
    """
    mask = mask.expand_as(x)
    any_valid = mask.any(dim)
    filled = x.masked_fill(~mask, float("-inf"))
    # The shift only has to make exp() safe; any constant gives the same value, so detaching it
    # is exact and keeps all-invalid rows (max = -inf) out of the graph.
    shift = filled.amax(dim, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = torch.exp(filled - shift).sum(dim)
    total = torch.where(any_valid, total, torch.ones_like(total))
    out = torch.log(total) + shift.squeeze(dim)
    return torch.where(any_valid, out, torch.full_like(out, float("-inf")))


def subsample_per_class(
    classes: torch.Tensor, max_per_class: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of a random subset with at most ``max_per_class`` rows of each class.

    Draws one random permutation, then keeps, per class, the first ``max_per_class`` rows in
    permutation order (stable sort by class, rank within class). Deterministic for a seeded
    ``generator``.

    Args:
        classes: ``[N]`` long.

    Returns:
        ``[M]`` long indices into ``classes``, ascending, ``M <= N``.
    """
    n = classes.numel()
    device = generator.device if generator is not None else classes.device
    perm = torch.randperm(n, generator=generator, device=device).to(classes.device)
    sorted_cls, order = torch.sort(classes[perm], stable=True)
    perm = perm[order]
    # rank within class = position - first position of that class (left searchsorted)
    first = torch.searchsorted(sorted_cls, sorted_cls)
    rank = torch.arange(n, device=classes.device) - first
    keep = perm[rank < max_per_class]
    return torch.sort(keep).values


def _class_balanced_mean(
    per_anchor: torch.Tensor, anchor_classes: torch.Tensor, weight: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``mean_{c : sum_{a in c} weight_a > 0} (sum_{a in c} weight_a l_a / sum_{a in c} weight_a)``.

    ``weight`` is 0/1 per anchor (dropped/kept). Returns 0 (attached to the graph) when no
    class has a kept anchor.
    """
    zeros = per_anchor.new_zeros(num_classes)
    class_sum = zeros.index_add(0, anchor_classes, per_anchor * weight)
    class_cnt = zeros.detach().index_add(0, anchor_classes, weight)
    present = class_cnt > 0
    class_mean = class_sum / class_cnt.clamp(min=1)
    return (class_mean * present).sum() / present.sum().clamp(min=1)


def _subsample_anchors(
    anchor_classes: torch.Tensor,
    max_anchors: int | None,
    generator: torch.Generator | None,
    *rows: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """``(*rows, anchor_classes)`` restricted to at most ``max_anchors`` random anchors per
    class (every ``[N, ...]`` tensor indexed alike); unchanged when ``max_anchors`` is 0/None."""
    if not max_anchors:
        return (*rows, anchor_classes)
    if max_anchors < 0:
        raise ValueError(
            f"max_anchors must be >= 0 (0 or None = no sub-sampling), got {max_anchors}"
        )
    keep = subsample_per_class(anchor_classes, max_anchors, generator)
    return (*(t[keep] for t in rows), anchor_classes[keep])


def _bank_similarities(
    anchors: torch.Tensor, bank: torch.Tensor, bank_valid: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``s(a, m) = a . m / temperature`` -> ``[N, C, Q]`` in at least float32, ``-inf`` at
    empty slots of classes that have at least one entry.

    Classes with no entry at all keep finite values so that ``torch.logsumexp`` over their
    slots (used to build negatives) has a finite, NaN-free backward; the callers mask those
    classes out afterwards. The mask and the temperature ride along in one ``addmm`` (bias
    ``[1, C*Q]``, temperature folded into the small anchor matrix), so the big ``[N, C*Q]``
    matrix is written once instead of once per elementwise op.
    """
    num_classes, size, dim = bank.shape
    dtype = anchors.dtype
    empty_slot = ~bank_valid & bank_valid.any(1, keepdim=True)  # [C, Q]
    bias = torch.zeros(num_classes * size, dtype=dtype, device=anchors.device)
    bias = bias.masked_fill(empty_slot.flatten(), float("-inf"))
    sim = torch.addmm(bias.unsqueeze(0), anchors / temperature,
                      bank.reshape(num_classes * size, dim).T.to(dtype))  # [N, C*Q]
    # logsumexp/softplus in at least float32: bf16 has 8 mantissa bits, too coarse for
    # differences of similarities / 0.1. (Under autocast addmm returns bf16.)
    work = torch.promote_types(torch.promote_types(dtype, bank.dtype), torch.float32)
    return sim.to(work).view(-1, num_classes, size)


def _negative_lse(sim: torch.Tensor, bank_valid: torch.Tensor,
                  anchor_classes: torch.Tensor) -> torch.Tensor:
    """``lse_{n in valid bank entries of class != anchor class} sim[a, n]`` -> ``[N]``.

    Two-level: the fused ``torch.logsumexp`` over each class's slots (empty slots are already
    ``-inf``), then a masked logsumexp over the other classes that have entries.
    """
    num_classes = bank_valid.shape[0]
    per_class = torch.logsumexp(sim, dim=2)  # [N, C]
    other = torch.arange(num_classes, device=sim.device).unsqueeze(0) != anchor_classes[:, None]
    neg_mask = other & bank_valid.any(1).unsqueeze(0)  # [N, C]
    return masked_logsumexp(per_class, neg_mask, dim=1)  # [N]


def _check_contrast_inputs(anchors, anchor_classes, bank, bank_valid) -> None:
    _check_ndim("anchors", anchors, 2, "[N, D]")
    _check_ndim("bank", bank, 3, "[C, Q, D]")
    if anchor_classes.shape != anchors.shape[:1]:
        raise ValueError(
            f"anchor_classes must have shape [N] = [{anchors.shape[0]}], "
            f"got {tuple(anchor_classes.shape)}"
        )
    if bank.shape[2] != anchors.shape[1]:
        raise ValueError(
            f"feature dims differ: anchors {tuple(anchors.shape)} vs bank {tuple(bank.shape)}"
        )
    if tuple(bank_valid.shape) != tuple(bank.shape[:2]) or bank_valid.dtype != torch.bool:
        raise ValueError(
            f"bank_valid must be a bool tensor of shape [C, Q] = {tuple(bank.shape[:2])}, "
            f"got {bank_valid.dtype} {tuple(bank_valid.shape)}"
        )


def _high_per_anchor(
    anchors: torch.Tensor,
    anchor_classes: torch.Tensor,
    bank: torch.Tensor,
    bank_valid: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean_{p in P_c} softplus(lse_neg(a) - s(a, p))`` -> ``([N], has_pos [N] 0/1)``."""
    sim = _bank_similarities(anchors, bank, bank_valid, temperature)  # [N, C, Q]
    lse_neg = _negative_lse(sim, bank_valid, anchor_classes)  # [N]
    rows = torch.arange(sim.shape[0], device=sim.device)
    pos_valid = bank_valid[anchor_classes]  # [N, Q]
    # Empty slots hold -inf; zero them before subtracting, else "-inf - -inf" for an anchor
    # without negatives would put NaN into the backward even though the slot is discarded.
    pos_sim = torch.where(pos_valid, sim[rows, anchor_classes], 0.0)  # [N, Q]
    per_pos = F.softplus(lse_neg.unsqueeze(1) - pos_sim)
    per_pos = torch.where(pos_valid, per_pos, torch.zeros_like(per_pos))
    n_pos = pos_valid.sum(1)
    per_anchor = per_pos.sum(1) / n_pos.clamp(min=1)
    return per_anchor, (n_pos > 0).to(per_anchor.dtype)


def _low_per_anchor(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    anchor_classes: torch.Tensor,
    bank: torch.Tensor,
    bank_valid: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor]:
    """``softplus(lse_neg(a) - s(a, pos_a))`` -> ``([N],)``."""
    sim = _bank_similarities(anchors, bank, bank_valid, temperature)  # [N, C, Q']
    lse_neg = _negative_lse(sim, bank_valid, anchor_classes)  # [N]
    pos_sim = (anchors * positives.to(anchors.dtype)).sum(1).to(sim.dtype) / temperature
    return (F.softplus(lse_neg - pos_sim),)


# Elements of one [rows, C*Q] similarity block. On CPU a block that stays in cache makes the
# ~10 elementwise passes (logsumexp, softplus and their backward) 2-3x cheaper than streaming
# the whole [N, C*Q] matrix; on GPU blocks only cap the temporaries (see
# benchmarks/bench_contrast.py).
CHUNK_ELEMENTS = {"cpu": 1 << 21}
CHUNK_ELEMENTS_DEFAULT = 1 << 27


def _chunked(fn, row_args: tuple, shared_args: tuple) -> tuple[torch.Tensor, ...]:
    """``fn(*row_args, *shared_args)`` over blocks of anchor rows, outputs concatenated.

    Every block is independent (per-anchor terms), so this equals one call on all rows.
    The autograd graph keeps each block's similarities (``O(N * C * Q)`` in all), but the
    forward and backward temporaries are per block. Recomputing blocks in the backward
    (activation checkpointing) would bound that too, but measured ~1.4x slower on CPU.
    """
    anchors, bank = row_args[0], shared_args[0]
    cols = bank.shape[0] * bank.shape[1]
    budget = CHUNK_ELEMENTS.get(anchors.device.type, CHUNK_ELEMENTS_DEFAULT)
    rows = max(1, budget // max(cols, 1))
    if anchors.shape[0] <= rows:
        return fn(*row_args, *shared_args)
    # split (not slicing in a loop): its backward concatenates the block gradients once
    outs = [fn(*block, *shared_args) for block in zip(*(t.split(rows) for t in row_args))]
    return tuple(torch.cat(parts) for parts in zip(*outs))


# The two public losses repeat their parameter lists on purpose: each signature is the contract
# of its step (docs/method.md, steps 6 and 7), read at the call site; the shared work lives in
# the helpers above.
def high_level_contrast(
    anchors: torch.Tensor,
    anchor_classes: torch.Tensor,
    bank: torch.Tensor,
    bank_valid: torch.Tensor,
    temperature: float,
    *,
    max_anchors: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-positive, class-balanced InfoNCE against a class memory bank (docs/method.md,
    step 6).

    With ``s(x, y) = x . y / temperature`` (features are unit vectors, so cosine / tau),
    ``P_c`` the valid entries of ``bank[c]`` and ``N_c`` the valid entries of every other class::

        L = mean_{c present} mean_{a in c} mean_{p in P_c}
                softplus( lse_{n in N_c} s(a, n) - s(a, p) )

    which equals ``-log(e^{s(a,p)} / (e^{s(a,p)} + sum_{n in N_c} e^{s(a,n)}))``.
    Anchors of a class with no valid positive are dropped and that class is skipped; an anchor
    with no valid negative contributes 0 (softplus(-inf)). No anchor left -> 0, never NaN.

    Args:
        anchors: ``[N, D]`` student features (with grad).
        anchor_classes: ``[N]`` long in ``[0, C)``.
        bank: ``[C, Q, D]`` memory-bank features (any slot order).
        bank_valid: ``[C, Q]`` bool, True where a slot is filled.
        temperature: ``tau_h``.
        max_anchors: keep at most this many random anchors per class (None or 0 = all).
        generator: RNG for the sub-sampling (seeded -> deterministic).

    Returns:
        0-dim tensor in ``anchors.dtype``; computed internally in at least float32.
    """
    _check_contrast_inputs(anchors, anchor_classes, bank, bank_valid)
    anchors, anchor_classes = _subsample_anchors(anchor_classes, max_anchors, generator, anchors)
    per_anchor, has_pos = _chunked(
        _high_per_anchor, (anchors, anchor_classes), (bank, bank_valid, temperature)
    )
    loss = _class_balanced_mean(per_anchor, anchor_classes, has_pos, bank.shape[0])
    return loss.to(anchors.dtype)


def low_level_contrast(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    anchor_classes: torch.Tensor,
    bank: torch.Tensor,
    bank_valid: torch.Tensor,
    temperature: float,
    *,
    max_anchors: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Class-balanced InfoNCE with one given positive per anchor (docs/method.md, step 7).

    With ``s(x, y) = x . y / temperature`` and ``N_c`` the valid bank entries of classes
    other than ``c``::

        L = mean_{c present} mean_{a in c} softplus( lse_{n in N_c} s(a, n) - s(a, pos_a) )

    Unlike ``high_level_contrast`` no class is skipped for lacking bank entries: the positive
    comes from the peer student, not the bank, so the term is defined for every anchor; with
    no negatives it is ``softplus(-inf) = 0``. No anchor -> 0, never NaN.

    Args:
        anchors: ``[N, D]`` student features (with grad).
        positives: ``[N, D]`` peer features at the same pixels (the caller detaches them).
        anchor_classes: ``[N]`` long in ``[0, C)`` (the peer's argmax), selects negatives.
        bank: ``[C, Q', D]``, both teachers' banks concatenated along dim 1.
        bank_valid: ``[C, Q']`` bool.
        temperature: ``tau_l``.
        max_anchors, generator: as in ``high_level_contrast``.

    Returns:
        0-dim tensor in ``anchors.dtype``; computed internally in at least float32.
    """
    _check_contrast_inputs(anchors, anchor_classes, bank, bank_valid)
    if positives.shape != anchors.shape:
        raise ValueError(
            f"positives must match anchors {tuple(anchors.shape)}, got {tuple(positives.shape)}"
        )
    anchors, positives, anchor_classes = _subsample_anchors(
        anchor_classes, max_anchors, generator, anchors, positives)
    (per_anchor,) = _chunked(
        _low_per_anchor, (anchors, positives, anchor_classes), (bank, bank_valid, temperature)
    )
    every = torch.ones_like(per_anchor)
    loss = _class_balanced_mean(per_anchor, anchor_classes, every, bank.shape[0])
    return loss.to(anchors.dtype)
