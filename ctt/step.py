"""One Cross Teacher Training iteration, top to bottom (docs/method.md, steps 1-9).

:func:`train_step` runs five phases, public functions that ``benchmarks/bench_step.py`` times
one by one: :func:`label_and_augment`, :func:`student_forwards`, :func:`student_losses` (and the
NaN guard), :func:`optimise_students`, :func:`update_teachers_and_banks`.

Names: ``x_l, y_l`` labeled images/labels, ``x_u`` clean unlabeled images, ``x_s`` the strong
(mixed, jittered, blurred) view, ``p_t`` teacher probabilities, ``conf, yhat`` mixed pseudo-label
confidence and class. ``k`` indexes pairs; ``PEER[k]`` is the other pair. Every term is switched
by the config (``method.*``); variants are configs, never code paths of their own.

Randomness: the augmentation draws from ``state.generator``; each network forward that can use
the global RNG (dropout) runs under a seed derived from ``(run.seed, step, role, k)``, so
student ``k``'s trajectory does not depend on whether a peer exists. That makes a supervised
warm-up identical across variants (studies fork from one checkpoint) and keeps the paired
design honest.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ctt.augment import strong_augment
from ctt.config import CTTConfig
from ctt.data.transforms import IGNORE_INDEX
from ctt.ema import ema_update
from ctt.losses import high_level_contrast, low_level_contrast, pseudo_label_ce, supervised_ce
from ctt.memory_bank import bank_ready, select_bank_candidates
from ctt.metric_names import STEP_TERMS
from ctt.state import SEED_STEP, TrainState, derive_seed

PEER = (1, 0)
ROLE_STUDENT, ROLE_LABEL, ROLE_BANK = 0, 1, 2

__all__ = ["PEER", "NonFiniteLossError", "StrongView", "high_level_anchors",
           "label_and_augment", "low_level_anchors", "optimise_students", "student_forwards",
           "student_losses", "train_step", "update_teachers_and_banks"]

Outputs = tuple[torch.Tensor, torch.Tensor]  # a student's (logits [N, C, h, w], feats [N, D, h, w])


class NonFiniteLossError(FloatingPointError):
    """A loss term is NaN/inf; raised before any parameter, teacher or bank is touched."""

    def __init__(self, step: int, term: str, value: float):
        super().__init__(f"non-finite {term} = {value} at step {step}; nothing was updated. "
                         "Lower optim.lr or check the data (see metrics.jsonl for the trend).")
        self.step, self.term, self.value = step, term, value


class StrongView(NamedTuple):
    """What one student learns from on the unlabeled batch."""
    x_s: torch.Tensor  # [B_u, 3, H, W] strong view
    p_t: torch.Tensor  # [B_u, C, H, W] probabilities of the teacher it learns from, mixed alike


@contextlib.contextmanager
def _own_rng(state: TrainState, role: int, k: int) -> Iterator[None]:
    devices = [state.device] if state.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(state.cfg.run.seed, SEED_STEP, state.step, role, k))
        yield


def _amp(state: TrainState, cfg: CTTConfig) -> contextlib.AbstractContextManager:
    return torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=cfg.run.amp == "bf16")


def _up(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def _down(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of ``[B, H, W]`` maps (labels, confidences) to feature size."""
    return F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0].to(t.dtype)


def _pixels(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, D, h, w]`` features at ``mask [B, h, w]`` -> ``[N, D]``."""
    return feats.permute(0, 2, 3, 1)[mask]


def high_level_anchors(feats: torch.Tensor, y_l: torch.Tensor, conf: torch.Tensor,
                       yhat: torch.Tensor, tau_high_conf: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6 anchors: labeled pixels (class = label) and confident strong-view pixels (class =
    pseudo-label). ``feats [B+B_u, D, h, w]`` of one student on ``[x_l; x_s]``; ``y_l [B, H, W]``,
    ``conf, yhat [B_u, H, W]``. Returns ``anchors [N, D]``, ``classes [N]``."""
    B = y_l.shape[0]
    size = feats.shape[-2:]
    y_f, conf_f, yhat_f = _down(y_l, size), _down(conf, size), _down(yhat, size)
    lab, high = y_f != IGNORE_INDEX, conf_f >= tau_high_conf
    anchors = torch.cat([_pixels(feats[:B], lab), _pixels(feats[B:], high)])
    return anchors, torch.cat([y_f[lab], yhat_f[high]])


def low_level_anchors(out: Outputs, peer: Outputs, conf: torch.Tensor, tau_high_conf: float,
                      low_gate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 7 anchors: unconfident strong-view pixels of one student, the peer student's feature
    at the same pixel as positive (detached) and the peer's argmax as class. ``out``/``peer``
    are ``(logits, feats)`` on ``[x_l; x_s]``; ``conf [B_u, H, W]``. Returns ``anchors [N, D]``,
    ``positives [N, D]``, ``classes [N]``."""
    B = out[0].shape[0] - conf.shape[0]
    logits, feats = out[0][B:], out[1][B:]
    peer_logits, peer_feats = peer[0][B:].detach(), peer[1][B:].detach()
    peer_conf, peer_cls = torch.softmax(peer_logits.float(), dim=1).max(dim=1)
    low = _down(conf, feats.shape[-2:]) < tau_high_conf
    if low_gate:  # reference DeepLab-v3+ script: only where the peer knows better
        own_conf = torch.softmax(logits.detach().float(), dim=1).amax(dim=1)
        low &= (peer_conf > own_conf) & (peer_conf >= tau_high_conf)
    return _pixels(feats, low), _pixels(peer_feats, low), peer_cls[low]


def _rollback_point(state: TrainState) -> Callable[[], None]:
    """A function that restores what the forwards change before the NaN guard runs: BN
    statistics (students, train-mode teachers) and the augmentation RNG. Called when a term is
    non-finite, so the error's "nothing was updated" holds and the state stays resumable."""
    nets = (*state.students, *state.teachers)
    saved = [b.clone() for net in nets for b in net.buffers()]
    aug_rng = state.generator.get_state()

    @torch.no_grad()
    def restore() -> None:
        for live, old in zip((b for net in nets for b in net.buffers()), saved, strict=True):
            live.copy_(old)
        state.generator.set_state(aug_rng)
    return restore


# --- the phases of one step -------------------------------------------------------------------

def label_and_augment(state: TrainState, cfg: CTTConfig, batch: dict[str, torch.Tensor]
                      ) -> list[StrongView]:
    """Steps 1-2: pseudo-labels from each teacher on the clean view (once each), then strong
    views. One :class:`StrongView` per student; ``[]`` (no ``x_u`` needed) while the
    unsupervised terms are off (``method.unsup="none"`` or the supervised warm-up)."""
    m = cfg.method
    if m.unsup == "none" or state.step < m.warmup_iters:
        return []
    if "x_u" not in batch:
        raise ValueError(f"step {state.step}: method.unsup={m.unsup!r} needs unlabeled 'x_u'")
    x_u, (H, W), pairs = batch["x_u"], batch["y_l"].shape[-2:], len(state.students)
    src = [PEER[k] if m.unsup == "cross" else k for k in range(pairs)]  # whose labels S_k learns
    p_t = []
    for k, teacher in enumerate(state.teachers):
        with torch.no_grad(), _amp(state, cfg), _own_rng(state, ROLE_LABEL, k):
            p_t.append(torch.softmax(_up(teacher(x_u)[0].float(), (H, W)), dim=1))
    aug_args = {"mix": m.mix, "generator": state.generator, "color": m.strong_color,
                "jitter_blur_per": m.jitter_blur_per}
    if m.shared_aug:  # one mask for both students; ClassMix classes from the mean map
        aug = strong_augment(x_u, p_t, **aug_args)
        return [StrongView(aug.images, aug.probs[src[k]]) for k in range(pairs)]
    views = []  # reference: own mask per student, classes from the teacher it learns from
    for k in range(pairs):
        aug = strong_augment(x_u, [p_t[src[k]]], **aug_args)
        views.append(StrongView(aug.images, aug.probs[0]))
    return views


def student_forwards(state: TrainState, cfg: CTTConfig, batch: dict[str, torch.Tensor],
                     views: list[StrongView]) -> list[Outputs]:
    """Step 3: each student (train mode) on ``x_l`` and its ``x_s`` (``x_l`` alone without
    views). ``method.student_forward="separate"`` (reference) runs two forwards, so BatchNorm
    normalises each set with its own batch statistics; ``"joint"`` runs one on ``[x_l; x_s]``.
    One seeded RNG context per student, so either mode is deterministic. Returns per student
    ``(logits [B(+B_u), C, h, w], feats [B(+B_u), D, h, w])``, labeled rows first."""
    x_l = batch["x_l"]
    outs = []
    for k, student in enumerate(state.students):
        student.train()  # evaluation leaves it in eval mode
        with _amp(state, cfg), _own_rng(state, ROLE_STUDENT, k):
            if not views:
                outs.append(student(x_l))
            elif cfg.method.student_forward == "joint":
                outs.append(student(torch.cat([x_l, views[k].x_s])))
            else:
                out_l, out_s = student(x_l), student(views[k].x_s)
                outs.append((torch.cat([out_l[0], out_s[0]]), torch.cat([out_l[1], out_s[1]])))
    return outs


def student_losses(state: TrainState, cfg: CTTConfig, batch: dict[str, torch.Tensor],
                   views: list[StrongView], outs: list[Outputs]
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Steps 4-8 per student: supervised CE, pseudo-label CE and, once the banks are ready, the
    high-level (own bank) and low-level (peer student) contrasts. Returns ``(total, metrics)``:
    the students' summed weighted losses (0-dim, with graph) and the terms averaged over
    students. Raises :class:`NonFiniteLossError` naming the first non-finite term, before
    anything but BatchNorm statistics and the augmentation RNG moved (train_step restores)."""
    m = cfg.method
    x_l, y_l = batch["x_l"], batch["y_l"]
    B, H, W = y_l.shape
    pairs = len(outs)
    acc = dict.fromkeys(STEP_TERMS, 0.0)
    total = x_l.new_zeros(())
    banks = list(state.banks)
    use_contrast = bool(views) and state.contrast_on
    max_anchors = m.max_anchors or None
    for k in range(pairs):
        logits, feats = outs[k]
        terms = {"loss/sup": supervised_ce(_up(logits[:B].float(), (H, W)), y_l)}
        loss_k = terms["loss/sup"]
        if views:
            conf, yhat = views[k].p_t.max(dim=1)  # [B_u, H, W]
            terms["loss/unsup"], acc_w = pseudo_label_ce(
                _up(logits[B:].float(), (H, W)), yhat, conf, weighting=m.weighting, tau_p=m.tau_p)
            acc["pl/weight"] += acc_w / pairs
            loss_k = loss_k + m.lambda_u * terms["loss/unsup"]
        if use_contrast and m.lambda_h > 0:  # 6. labeled + confident pixels vs own bank
            anchors, classes = high_level_anchors(feats, y_l, conf, yhat, m.tau_high_conf)
            terms["loss/hc"] = high_level_contrast(
                anchors, classes, banks[k].features, banks[k].valid, m.tau_h,
                max_anchors=max_anchors, generator=state.generator)
            acc["n/anchors_hc"] += float(classes.numel())
            loss_k = loss_k + m.lambda_h * terms["loss/hc"]
        if use_contrast and m.lambda_l > 0 and pairs == 2:  # 7. unconfident pixels vs peer
            anchors, positives, classes = low_level_anchors(
                outs[k], outs[PEER[k]], conf, m.tau_high_conf, m.low_gate)
            terms["loss/lc"] = low_level_contrast(
                anchors, positives, classes, torch.cat([b.features for b in banks], dim=1),
                torch.cat([b.valid for b in banks], dim=1), m.tau_l,
                max_anchors=max_anchors, generator=state.generator)
            acc["n/anchors_lc"] += float(classes.numel())
            loss_k = loss_k + m.lambda_l * terms["loss/lc"]
        terms["loss/total"] = loss_k
        for name, value in terms.items():  # NaN guard before anything is updated
            v = float(value.detach())
            if not math.isfinite(v):
                raise NonFiniteLossError(state.step, f"{name} (student {k})", v)
            acc[name] += v / pairs
        total = total + loss_k
    return total, acc


def optimise_students(state: TrainState, total: torch.Tensor) -> float:
    """This step's poly learning rate, one backward of ``total`` (the students' graphs are
    independent: peer features are detached), one step of each optimiser. Returns the rate."""
    lr = state.set_lr()
    for opt in state.optimizers:
        opt.zero_grad(set_to_none=True)
    total.backward()
    for opt in state.optimizers:
        opt.step()
    return lr


def update_teachers_and_banks(state: TrainState, cfg: CTTConfig,
                              batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Step 9, EMA; then step 5, each updated teacher's confident, correct labeled pixels into
    its bank (teacher forward on ``x_l``) and the contrast latch. Returns ``bank/fill`` and
    ``contrast_on``."""
    m = cfg.method
    x_l, y_l = batch["x_l"], batch["y_l"]
    for k, teacher in enumerate(state.teachers):
        ema_update(teacher, state.students[k], state.step, m.ema_decay, buffers=m.ema_buffers)
    banks = list(state.banks)
    for k, bank in enumerate(banks):
        with torch.no_grad(), _amp(state, cfg), _own_rng(state, ROLE_BANK, k):
            logits_t, feats_t = state.teachers[k](x_l)
        size = logits_t.shape[-2:]
        top_k = max(int(2 * m.bank_size / max(state.num_labeled, 1)), y_l.shape[0])
        bank.push(*select_bank_candidates(feats_t.float(), torch.softmax(logits_t.float(), 1),
                                          _down(y_l, size), m.tau_bank, top_k))
    if banks and not state.contrast_on:
        state.contrast_on = bank_ready(banks, m.bank_ready, m.bank_min_fill)
    return {"bank/fill": sum(b.fill for b in banks) / len(banks) if banks else 0.0,
            "contrast_on": float(state.contrast_on)}


def train_step(state: TrainState, batch: dict[str, torch.Tensor],
               cfg: CTTConfig | None = None) -> dict[str, float]:
    """Run iteration ``t = state.step`` in place on ``state``; return the metrics of
    docs/method.md#metric-names (``ctt.metric_names.STEP_TERMS``, ``bank/fill``,
    ``contrast_on``, ``lr``, ``step``). ``batch``: ``x_l [B,3,H,W]``, ``y_l [B,H,W]`` and, once
    the unsupervised terms are on, ``x_u [B_u,3,H,W]``, on ``state.device``. ``cfg`` defaults
    to ``state.cfg``."""
    cfg = cfg or state.cfg
    rollback = _rollback_point(state)
    views = label_and_augment(state, cfg, batch)
    outs = student_forwards(state, cfg, batch, views)
    try:
        total, metrics = student_losses(state, cfg, batch, views, outs)
    except NonFiniteLossError:
        rollback()
        raise
    lr = optimise_students(state, total)
    metrics.update(update_teachers_and_banks(state, cfg, batch))
    state.step += 1
    metrics.update({"lr": lr, "step": state.step})
    return metrics
