"""The measured cost model of a study, and its ``--dry-run`` printout.

A trial's cost is its iterations times the measured seconds of one ``train_step`` of its
variant on this machine (:func:`estimate_seconds_per_step`: random inputs at the crop size,
every term on); a shared warm-up counts once per seed instead of once per trial. Evaluation,
Ray start-up and pruning are not counted. The same estimate gives a running study its first
time-left figure (:mod:`ctt.tune.progress`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from ctt.config import VARIANTS, CTTConfig, apply_variant

__all__ = ["CostEstimate", "estimate_cost", "estimate_seconds_per_step", "print_dry_run",
           "slots"]

# Timed steps per variant (after one untimed step); the median is used.
TIMED_STEPS = 3


def slots(num_cpus: int | None, cpus_per_trial: float) -> int:
    """Trials that run at once on this machine (``num_cpus`` None: all its cores)."""
    return max(1, int((num_cpus or os.cpu_count() or 1) // cpus_per_trial))


def estimate_seconds_per_step(cfg: CTTConfig, repeats: int = TIMED_STEPS) -> float:
    """Median seconds of ``train_step`` for ``cfg`` on its device, with random inputs at the
    crop size and every term on (contrast forced on, banks full)."""
    import torch

    from ctt.state import TrainState
    from ctt.step import train_step

    torch.set_num_threads(cfg.run.num_threads)
    cfg = cfg.override({"method.warmup_iters": 0})
    state = TrainState(cfg)
    d = cfg.data
    h, w = d.crop_size, d.crop_width or d.crop_size
    gen = torch.Generator().manual_seed(0)
    batch = {"x_l": torch.rand(d.batch_size, 3, h, w, generator=gen),
             "y_l": torch.randint(0, d.num_classes, (d.batch_size, h, w), generator=gen),
             "x_u": torch.rand(d.batch_size_u, 3, h, w, generator=gen)}
    batch = {k: v.to(state.device) for k, v in batch.items()}
    for bank in state.banks:
        feats = torch.nn.functional.normalize(torch.randn(d.num_classes * bank.size,
                                                          bank.dim, generator=gen), dim=1)
        bank.push(feats.to(state.device),
                  torch.arange(d.num_classes).repeat_interleave(bank.size).to(state.device))
        state.contrast_on = True
    train_step(state, batch)
    times = []
    for _ in range(repeats):
        if state.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(state, batch)
        if state.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@dataclass
class CostEstimate:
    """A study's estimated compute: per trial (in order), the shared warm-ups, the slots."""

    step_s: dict[str, float] = field(default_factory=dict)  # seconds per step, per variant
    trial_s: list[float] = field(default_factory=list)
    trial_iters: list[int] = field(default_factory=list)
    warmup_seeds: list[Any] = field(default_factory=list)
    warmup_iters: int = 0
    warmup_s: float = 0.0
    slots: int = 1

    @property
    def total_s(self) -> float:
        return sum(self.trial_s) + self.warmup_s

    @property
    def wall_s(self) -> float:
        return self.total_s / max(self.slots, 1)


def estimate_cost(trials: list[dict[str, Any]], base: CTTConfig, *, slots: int,
                  warmup_fork: bool, forked: int | None = None) -> CostEstimate:
    """Trials x iterations x measured s/step. With ``warmup_fork`` the first ``forked`` trials
    (all when None) start from a shared warm-up, counted once per seed of those trials (two
    students, supervised) instead of once per trial."""
    est = CostEstimate(slots=slots)
    n_forked = len(trials) if forked is None else forked
    est.warmup_seeds = sorted({t["seed"] for t in trials[:n_forked]}) if warmup_fork else []
    for i, t in enumerate(trials):
        warm = base.method.warmup_iters if warmup_fork and i < n_forked else 0
        v = t["variant"]
        if v not in est.step_s:
            est.step_s[v] = estimate_seconds_per_step(apply_variant(base, v)
                                                      if v in VARIANTS else base)
        iters = int(t["optim.iters"])
        est.trial_iters.append(iters)
        est.trial_s.append((iters - warm) * est.step_s[v])
    if est.warmup_seeds and base.method.warmup_iters:
        est.warmup_iters = base.method.warmup_iters
        sup_s = estimate_seconds_per_step(apply_variant(base, "supervised"))
        est.warmup_s = len(est.warmup_seeds) * est.warmup_iters * 2 * sup_s
    return est


def print_dry_run(trials: list[dict[str, Any]], base: CTTConfig, preset: str, *, slots: int,
                  warmup_fork: bool, forked: int | None = None) -> CostEstimate:
    """Print the trial list and its :func:`estimate_cost`; return the estimate."""
    print(f"{len(trials)} trials (preset {preset}, device {base.run.device}):")
    est = estimate_cost(trials, base, slots=slots, warmup_fork=warmup_fork, forked=forked)
    for t, iters, secs in zip(trials, est.trial_iters, est.trial_s):
        v = t["variant"]
        print(f"  {v:14s} seed {t['seed']}: {iters} iters x {est.step_s[v] * 1000:.1f} ms "
              f"= {secs / 60:.1f} min")
    if est.warmup_s:
        print(f"  shared warm-up: {len(est.warmup_seeds)} x {est.warmup_iters} iters "
              f"(2 students) = {est.warmup_s / 60:.1f} min")
    print(f"total compute {est.total_s / 60:.1f} min; about {est.wall_s / 60:.1f} min wall "
          f"on {slots} concurrent slot(s) (plus Ray start-up and evaluation)")
    return est
