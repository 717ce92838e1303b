"""Mean-teacher EMA (docs/method.md, step 9) with fused ``torch._foreach`` ops.

``T <- a * T + (1 - a) * S`` with ``a = min(1 - 1 / (t + 1), decay)`` and ``t`` the 0-based
iteration, so the teacher equals the student after the first step and the average reaches its
nominal decay after ``1 / (1 - decay) - 1`` steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

EMA_BUFFER_MODES = ("copy", "params_only")
TEACHER_MODES = ("eval", "train")


def ema_coefficient(step: int, decay: float) -> float:
    """``a = min(1 - 1 / (step + 1), decay)``; ``step`` is the 0-based iteration."""
    if step < 0:
        raise ValueError(f"EMA step must be >= 0 (0-based iteration), got {step}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update(
    teacher: nn.Module, student: nn.Module, step: int, decay: float, buffers: str = "copy"
) -> float:
    """Move the teacher's parameters towards the student's, in place.

    Args:
        teacher: EMA copy of ``student`` (see :func:`make_teacher`); its parameters must not
            require grad. Its train/eval mode is left as it is.
        student: the trained network, same architecture as ``teacher``.
        step: 0-based iteration index ``t``.
        decay: ``method.ema_decay``.
        buffers: ``"copy"`` copies every buffer (BN running statistics, ``num_batches_tracked``)
            from the student, which an eval-mode teacher needs; ``"params_only"`` leaves the
            teacher's buffers untouched (the reference code).

    Returns:
        The coefficient ``a`` that was used.
    """
    if buffers not in EMA_BUFFER_MODES:
        raise ValueError(f"unknown ema buffers mode {buffers!r}; choose one of {EMA_BUFFER_MODES}")
    a = ema_coefficient(step, decay)

    t_named = list(teacher.named_parameters())
    s_named = list(student.named_parameters())
    if [n for n, _ in t_named] != [n for n, _ in s_named]:
        raise ValueError(
            "teacher and student have different parameter names; build the teacher with "
            "ctt.ema.make_teacher(student)"
        )
    grad_names = [n for n, p in t_named if p.requires_grad]
    if grad_names:
        raise ValueError(
            f"teacher parameter {grad_names[0]!r} requires grad; teachers are never trained "
            "(use ctt.ema.make_teacher or teacher.requires_grad_(False))"
        )
    t_params = [p for _, p in t_named]
    s_params = [p.detach() for _, p in s_named]
    if t_params:
        # mul_ then add_ computes exactly a*T + (1-a)*S (lerp would round differently).
        torch._foreach_mul_(t_params, a)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - a)

    if buffers == "copy":
        t_bufs = list(teacher.named_buffers())
        s_bufs = list(student.named_buffers())
        if [n for n, _ in t_bufs] != [n for n, _ in s_bufs]:
            raise ValueError("teacher and student have different buffer names; cannot copy")
        for (_, tb), (_, sb) in zip(t_bufs, s_bufs, strict=True):
            tb.copy_(sb)
    return a


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` in eval mode (the teacher at step 0)."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def set_teacher_mode(teacher: nn.Module, mode: str) -> nn.Module:
    """Put the teacher in ``"eval"`` mode (ours) or ``"train"`` mode (the reference labels with
    BN batch statistics and dropout on). Returns the teacher."""
    if mode not in TEACHER_MODES:
        raise ValueError(f"unknown teacher mode {mode!r}; choose one of {TEACHER_MODES}")
    teacher.train(mode == "train")
    return teacher
