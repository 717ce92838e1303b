"""Where a running study is: one start line, then a compact progress line instead of Ray's
status table (``--verbose`` brings Ray's table back).

    study voc_ablation: 21 trials + 3 shared warm-ups in /home/me/studies_out/voc_ablation;
        estimated compute 40 min, about 20 min wall on 2 slots
    [ 4:30] trials 3 done, 2 running, 16 pending | compute 21% | about 16 min left |
        best miou 33.12 (ctt, seed 0)

(each one line on the terminal).

Progress is counted in work, not trials: each trial's iterations weighted by the cost of one
of its iterations (:func:`ctt.tune.grid.relative_cost`, the unit the grid orders trials by).
A trial that ended (finished, pruned or failed) counts as its work done; a running one by its
reported step. Time left is the work left over the rate measured since this run started
(so a ``--resume`` does not count the work of earlier runs as its own speed) and, before the
first measurement, over the dry run's estimate (:mod:`ctt.tune.dry_run`).

Shared warm-up trials count in the work (they take real time) but not in the trial counts
and not in the best value: they are not results.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ray.tune import ProgressReporter

from ctt.tune.grid import WARMUP_VARIANT, relative_cost

__all__ = ["PROGRESS_EVERY_S", "StudyProgress", "format_minutes", "start_line", "study_reporter",
           "trial_work"]

# Seconds between two progress lines.
PROGRESS_EVERY_S = 30.0
# The measured rate is trusted once this much of the run has passed with work done.
MIN_MEASURED_S = 20.0
ENDED = ("TERMINATED", "ERROR")


def format_minutes(seconds: float) -> str:
    """``"45 s"`` below a minute, ``"12 min"`` below ten hours (one decimal below ten
    minutes), else ``"13.5 h"``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 10:
        return f"{minutes:.1f} min"
    if minutes < 600:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:2d}:{secs:02d}"


def trial_work(config: dict[str, Any], step: int | None = None) -> float:
    """Work of a trial (flat config) in cost units: its iterations x :func:`relative_cost`;
    with ``step``, only the work up to that reported step. A warm-up trial runs the
    supervised phase of two students to ``_until``; a trial that forks one starts at the
    warm-up's end."""
    iters = int(config.get("optim.iters", 0))
    start = 0
    if config.get("variant") == WARMUP_VARIANT:
        iters = int(config.get("_until") or config.get("method.warmup_iters", 0))
        config = {**config, "method.unsup": "none"}
    elif config.get("_fork_from"):
        start = int(config.get("method.warmup_iters", 0))
    end = iters if step is None else min(max(int(step), start), iters)
    return relative_cost(config) * max(end - start, 0)


def start_line(name: str, study_dir: str, trials: int, warmups: int = 0,
               estimate_s: float | None = None, slots: int = 1) -> str:
    """The line a study prints when it starts: where it writes, how many trials, and the
    dry run's estimate when there is one."""
    warm = f" + {warmups} shared warm-up{'s' if warmups != 1 else ''}" if warmups else ""
    text = f"study {name}: {trials} trials{warm} in {study_dir}"
    if estimate_s is None:
        return text + "; time left shown once trials report"
    return (f"{text}; estimated compute {format_minutes(estimate_s)}, about "
            f"{format_minutes(estimate_s / max(slots, 1))} wall on {slots} slot"
            f"{'s' if slots != 1 else ''}")


class StudyProgress(ProgressReporter):
    """Tune's progress reporter for a study: one line every ``every_s`` seconds and at the end.

    Args:
        total: trials the study will run (a sweep's trials exist only once sampled: the ones
            not sampled yet count with the work of a typical trial).
        estimate_s: the dry run's compute estimate of the whole study in seconds (all slots
            together), or None.
        slots: trials that run at once (turns compute into wall time).
        metric: the value whose best so far is shown.
        every_s: seconds between lines.
        stream: where lines go (stdout).
        clock: the time source (tests pass a fake one).
    """

    def __init__(self, *, total: int, estimate_s: float | None = None, slots: int = 1,
                 metric: str = "miou", every_s: float = PROGRESS_EVERY_S,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.estimate_s, self.slots = total, estimate_s, max(slots, 1)
        self.metric, self.every_s = metric, every_s
        self.stream, self.clock = stream, clock
        self._started: float | None = None
        self._work_at_start: float | None = None
        self._last: float | None = None
        self._best: tuple[float, str] | None = None

    # Tune's reporter API (classic output engine)
    def setup(self, *args: Any, **kwargs: Any) -> None:
        """Tune calls this when a fit starts: each fit (a restored one too) counts its own
        elapsed time and rate."""
        self._started = self._last = self._work_at_start = None

    def should_report(self, trials: Sequence[Any], done: bool = False) -> bool:
        now = self.clock()
        if self._started is None:
            self._start(trials, now)
            self._last = now
        if done:
            return True
        return now - (self._last or now) >= self.every_s

    def report(self, trials: Sequence[Any], done: bool, *sys_info: Any) -> None:
        self._last = self.clock()
        print(self.line(trials), file=self.stream or sys.stdout, flush=True)

    # the line itself
    def line(self, trials: Sequence[Any]) -> str:
        """The progress line for Tune's ``trials`` now."""
        now = self.clock()
        if self._started is None:
            self._start(trials, now)
        results = _results(trials)
        counts = {s: sum(t.status == s for t in results) for s in ("RUNNING", *ENDED)}
        ended = counts["TERMINATED"] + counts["ERROR"]
        pending = max(self.total - ended - counts["RUNNING"], 0)
        failed = f" ({counts['ERROR']} failed)" if counts["ERROR"] else ""
        parts = [f"[{_clock(now - self._started)}] trials {ended} done{failed}, "
                 f"{counts['RUNNING']} running, {pending} pending"]
        done_work, all_work = self._work(trials, results)
        if all_work > 0:
            parts.append(f"compute {100 * done_work / all_work:.0f}%")
            left = self._seconds_left(now, done_work, all_work)
            if left is not None:
                parts.append(f"about {format_minutes(left)} left")
        self._update_best(results)
        if self._best is not None:
            parts.append(f"best {self.metric} {self._best[0]:.2f} ({self._best[1]})")
        return " | ".join(parts)

    def _start(self, trials: Sequence[Any], now: float) -> None:
        """This fit's clock and the work already done when it started (a resumed study's)."""
        self._started = now
        self._work_at_start = self._work(trials, _results(trials))[0]

    def _work(self, trials: Sequence[Any], results: Sequence[Any]) -> tuple[float, float]:
        """(work done, work of the whole study) in cost units."""
        done = planned = 0.0
        typical = []
        for t in trials:
            config = _config(t)
            full = trial_work(config)
            if t.status in ENDED:  # pruned or failed trials end early: what they ran is all
                full = trial_work(config, _step(t) if t.status == "TERMINATED" else None)
                done += full
            else:  # pending trials have reported no step yet
                done += trial_work(config, _step(t) or 0)
            planned += full
            if config.get("variant") != WARMUP_VARIANT:
                typical.append(trial_work(config))
        unsampled = max(self.total - len(results), 0)
        if unsampled and typical:
            planned += unsampled * max(typical)
        return done, planned

    def _seconds_left(self, now: float, done: float, planned: float) -> float | None:
        elapsed = now - (self._started or now)
        measured = done - (self._work_at_start or 0.0)
        if elapsed >= MIN_MEASURED_S and measured > 0:
            return (planned - done) * elapsed / measured
        if self.estimate_s is not None and planned > 0:
            return (planned - done) / planned * self.estimate_s / self.slots
        return None

    def _update_best(self, results: Sequence[Any]) -> None:
        for t in results:
            value = (getattr(t, "last_result", None) or {}).get(self.metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                if self._best is None or value > self._best[0]:
                    config = _config(t)
                    self._best = (float(value),
                                  f"{config.get('variant')}, seed {config.get('seed')}")


def _results(trials: Sequence[Any]) -> list[Any]:
    """The trials that are results (not shared warm-ups)."""
    return [t for t in trials if _config(t).get("variant") != WARMUP_VARIANT]


def _config(trial: Any) -> dict[str, Any]:
    return dict(getattr(trial, "config", None) or {})


def _step(trial: Any) -> int | None:
    step = (getattr(trial, "last_result", None) or {}).get("step")
    return int(step) if isinstance(step, (int, float)) and math.isfinite(step) else None


def study_reporter(opts: Any, study_dir: str, *, trials: list[dict[str, Any]],
                   warmup_fork: bool, warmups: int = 0, total: int | None = None,
                   forked: int | None = None, swept: Sequence[str] = (), metric: str = "miou",
                   what: str = "") -> ProgressReporter:
    """Print a study's start line and return what reports its progress to the terminal:
    :class:`StudyProgress`, or Ray's status table with ``--verbose`` (``opts``: the study's
    :class:`~ctt.tune.runtime.StudyOptions`). ``trials`` are the flat configs the dry run
    would list (``forked`` of them fork a shared warm-up when ``warmup_fork``); ``total`` the
    study's trial count (default: ``len(trials)``); ``what`` names a phase after the main one
    (a sweep's confirmation runs). The compute estimate is measured only where the trials
    run: on this machine's CPU (not on a cluster, not on a GPU)."""
    from ctt.tune.dry_run import estimate_cost, slots
    from ctt.tune.experiment import ray_status_table

    n_slots = slots(opts.num_cpus, opts.cpus_per_trial)
    estimate = None
    if opts.address is None and opts.gpus_per_trial == 0 and trials:
        estimate = estimate_cost(trials, opts.base, slots=n_slots, warmup_fork=warmup_fork,
                                 forked=forked).total_s
    name = f"{opts.name} {what}" if what else opts.name
    print(start_line(name, study_dir, total or len(trials), warmups, estimate, n_slots),
          flush=True)
    if opts.verbose > 1:
        return ray_status_table(list(swept))
    return StudyProgress(total=total or len(trials), estimate_s=estimate, slots=n_slots,
                         metric=metric, every_s=opts.progress_every)
