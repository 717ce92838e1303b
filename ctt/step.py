"""One Cross Teacher Training iteration, top to bottom (method.md "One training iteration").

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
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ctt.augment import strong_augment
from ctt.config import CTTConfig
from ctt.ema import ema_update
from ctt.losses import high_level_contrast, low_level_contrast, pseudo_label_ce, supervised_ce
from ctt.memory_bank import bank_ready, select_bank_candidates
from ctt.state import TrainState, derive_seed

PEER = (1, 0)
IGNORE = 255
ROLE_STUDENT, ROLE_LABEL, ROLE_BANK = 0, 1, 2

__all__ = ["PEER", "NonFiniteLossError", "train_step"]


class NonFiniteLossError(FloatingPointError):
    """A loss term is NaN/inf; raised before any parameter, teacher or bank is touched."""

    def __init__(self, step: int, term: str, value: float):
        super().__init__(f"non-finite {term} = {value} at step {step}; nothing was updated. "
                         "Lower optim.lr or check the data (see metrics.jsonl for the trend).")
        self.step, self.term, self.value = step, term, value


@contextlib.contextmanager
def _own_rng(state: TrainState, role: int, k: int) -> Iterator[None]:
    devices = [state.device] if state.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(state.cfg.run.seed, 4, state.step, role, k))
        yield


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
    lab, high = y_f != IGNORE, conf_f >= tau_high_conf
    anchors = torch.cat([_pixels(feats[:B], lab), _pixels(feats[B:], high)])
    return anchors, torch.cat([y_f[lab], yhat_f[high]])


def low_level_anchors(out: tuple[torch.Tensor, torch.Tensor],
                      peer: tuple[torch.Tensor, torch.Tensor], conf: torch.Tensor,
                      tau_high_conf: float, low_gate: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _student_forward(state: TrainState, k: int, x_l: torch.Tensor, x_s: torch.Tensor | None,
                     mode: str, amp: contextlib.AbstractContextManager
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Student ``k`` on ``x_l [B, 3, H, W]`` and the strong view ``x_s [B_u, 3, H, W]`` (None
    in warm-up). ``mode="separate"`` (reference) runs two forwards, so BatchNorm normalises
    each set with its own batch statistics; ``"joint"`` runs one on ``[x_l; x_s]`` (the two
    sets share statistics). Both forwards draw from the one seeded RNG context, so
    either mode is deterministic. Returns ``(logits, feats)`` with the labeled rows first."""
    student = state.students[k]
    with amp, _own_rng(state, ROLE_STUDENT, k):
        if x_s is None:
            return student(x_l)
        if mode == "joint":
            return student(torch.cat([x_l, x_s]))
        out_l, out_s = student(x_l), student(x_s)
        return torch.cat([out_l[0], out_s[0]]), torch.cat([out_l[1], out_s[1]])


class _Rollback:
    """What the forwards change before the NaN guard runs: BN statistics (students, and
    train-mode teachers) and the augmentation RNG. Restored when a term is non-finite, so the
    error's "nothing was updated" holds and the state stays resumable in memory."""

    def __init__(self, state: TrainState):
        self.state = state
        self.buffers = [b.clone() for b in self._buffers()]
        self.aug_rng = state.generator.get_state()

    def _buffers(self) -> list[torch.Tensor]:
        return [b for net in (*self.state.students, *self.state.teachers) for b in net.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in zip(self._buffers(), self.buffers, strict=True):
            live.copy_(saved)
        self.state.generator.set_state(self.aug_rng)


def train_step(state: TrainState, batch: dict[str, torch.Tensor],
               cfg: CTTConfig | None = None) -> dict[str, float]:
    """Run one iteration in place on ``state``; return the metrics of architecture.md.

    Args:
        state: the run's :class:`TrainState` (``state.step`` is the 0-based iteration ``t``).
        batch: ``x_l [B,3,H,W]``, ``y_l [B,H,W]`` and, once the unsupervised terms are on,
            ``x_u [B_u,3,H,W]``; all on ``state.device``.
        cfg: defaults to ``state.cfg``.
    """
    cfg = cfg or state.cfg
    m = cfg.method
    t = state.step
    x_l, y_l = batch["x_l"], batch["y_l"]
    B, H, W = y_l.shape
    pairs = len(state.students)
    semi = m.unsup != "none" and t >= m.warmup_iters
    if semi and "x_u" not in batch:
        raise ValueError(f"step {t}: method.unsup={m.unsup!r} needs an unlabeled batch 'x_u'")
    amp = torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=cfg.run.amp == "bf16")
    lr = state.set_lr()
    rollback = _Rollback(state)
    for s in state.students:
        s.train()

    # 1-2. Pseudo-labels from each teacher on the clean view (once each), then strong views.
    src = [PEER[k] if m.unsup == "cross" else k for k in range(pairs)]  # whose labels S_k learns
    views: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x_s, mixed p_t of teacher src[k])
    if semi:
        x_u = batch["x_u"]
        p_t = []
        for k, teacher in enumerate(state.teachers):
            with torch.no_grad(), amp, _own_rng(state, ROLE_LABEL, k):
                p_t.append(torch.softmax(_up(teacher(x_u)[0].float(), (H, W)), dim=1))
        if m.shared_aug:  # one mask for both students; ClassMix classes from the mean map
            aug = strong_augment(x_u, p_t, mix=m.mix, generator=state.generator,
                                 color=m.strong_color, jitter_blur_per=m.jitter_blur_per)
            views = [(aug.images, aug.probs[src[k]]) for k in range(pairs)]
        else:  # reference: own mask per student, classes from the teacher it learns from
            for k in range(pairs):
                aug = strong_augment(x_u, [p_t[src[k]]], mix=m.mix, generator=state.generator,
                                     color=m.strong_color, jitter_blur_per=m.jitter_blur_per)
                views.append((aug.images, aug.probs[0]))

    # 3. Each student on [labeled; strong view]: logits [B(+B_u), C, h, w], feats [B(+B_u), D,
    # h, w]; labeled rows first whether it ran one forward (joint) or two (separate).
    outs = [_student_forward(state, k, x_l, views[k][0] if semi else None,
                             m.student_forward, amp) for k in range(pairs)]

    # 4-8. Losses per student.
    names = ("loss/total", "loss/sup", "loss/unsup", "loss/hc", "loss/lc", "pl/weight",
             "n/anchors_hc", "n/anchors_lc")
    acc = dict.fromkeys(names, 0.0)
    total = x_l.new_zeros(())
    banks = list(state.banks)
    use_contrast = semi and state.contrast_on
    for k in range(pairs):
        logits, feats = outs[k]
        terms = {"loss/sup": supervised_ce(_up(logits[:B].float(), (H, W)), y_l)}
        loss_k = terms["loss/sup"]
        if semi:
            conf, yhat = views[k][1].max(dim=1)  # [B_u, H, W]
            terms["loss/unsup"], acc_w = pseudo_label_ce(
                _up(logits[B:].float(), (H, W)), yhat, conf, weighting=m.weighting, tau_p=m.tau_p)
            acc["pl/weight"] += acc_w / pairs
            loss_k = loss_k + m.lambda_u * terms["loss/unsup"]
        if use_contrast:
            max_anchors = m.max_anchors or None
            if m.lambda_h > 0:  # 6. labeled pixels + confident unlabeled pixels vs own bank
                anchors, classes = high_level_anchors(feats, y_l, conf, yhat, m.tau_high_conf)
                terms["loss/hc"] = high_level_contrast(
                    anchors, classes, banks[k].features, banks[k].valid, m.tau_h,
                    max_anchors=max_anchors, generator=state.generator)
                acc["n/anchors_hc"] += float(classes.numel())
                loss_k = loss_k + m.lambda_h * terms["loss/hc"]
            if m.lambda_l > 0 and pairs == 2:  # 7. unconfident pixels vs the peer student
                anchors, positives, classes = low_level_anchors(
                    outs[k], outs[PEER[k]], conf, m.tau_high_conf, m.low_gate)
                terms["loss/lc"] = low_level_contrast(
                    anchors, positives, classes,
                    torch.cat([b.features for b in banks], dim=1),
                    torch.cat([b.valid for b in banks], dim=1), m.tau_l,
                    max_anchors=max_anchors, generator=state.generator)
                acc["n/anchors_lc"] += float(classes.numel())
                loss_k = loss_k + m.lambda_l * terms["loss/lc"]
        terms["loss/total"] = loss_k
        for name, value in terms.items():  # NaN guard before anything is updated
            v = float(value.detach())
            if not math.isfinite(v):
                rollback.restore()
                raise NonFiniteLossError(t, f"{name} (student {k})", v)
            acc[name] += v / pairs
        total = total + loss_k

    # Both students step together: their graphs are independent (peer features detached).
    for opt in state.optimizers:
        opt.zero_grad(set_to_none=True)
    total.backward()
    for opt in state.optimizers:
        opt.step()

    # 9. EMA, then 5. bank update from each teacher on the labeled batch (second role).
    for k, teacher in enumerate(state.teachers):
        ema_update(teacher, state.students[k], t, m.ema_decay, buffers=m.ema_buffers)
    for k, bank in enumerate(banks):
        with torch.no_grad(), amp, _own_rng(state, ROLE_BANK, k):
            logits_t, feats_t = state.teachers[k](x_l)
        size = logits_t.shape[-2:]
        top_k = max(int(2 * m.bank_size / max(state.num_labeled, 1)), B)
        bank.push(*select_bank_candidates(feats_t.float(), torch.softmax(logits_t.float(), 1),
                                          _down(y_l, size), m.tau_bank, top_k))
    if banks and not state.contrast_on:
        state.contrast_on = bank_ready(banks, m.bank_ready, m.bank_min_fill)

    state.step += 1
    acc.update({"bank/fill": sum(b.fill for b in banks) / len(banks) if banks else 0.0,
                "contrast_on": float(state.contrast_on), "lr": lr, "step": state.step})
    return acc
