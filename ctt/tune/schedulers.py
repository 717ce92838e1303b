"""Optuna pruners as a Ray Tune scheduler, and one factory for every scheduler a study may use.

- :class:`OptunaPrunerScheduler` reports ``result[metric]`` to the Optuna trial, asks the
  study's pruner, and on a "prune" tells the study PRUNED and returns ``STOP``. With a searcher
  (:class:`~ctt.tune.optuna_search.PruningAwareOptunaSearch`) it uses the searcher's study and
  pruner; without one (grid ablations) it keeps its own study with one ``study.ask()`` trial
  per Tune trial and the same rules.
- :func:`make_scheduler` also wraps ASHA and FIFO so that they share the searcher's book (an
  errored trial's reason reaches Optuna; ASHA's rungs count from the warm-up's end).
- :func:`make_pruner` builds the Optuna pruner of each name in :data:`SCHEDULERS`.

The pruning clock (Optuna step = ``result[time_attr] - step_offset``) and the rules that decide
each trial's Optuna state are :mod:`ctt.tune.optuna_search`'s.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from ctt.tune.curve_pruner import CurvePruner
from ctt.tune.optuna_search import (
    STEP_OFFSET_ATTR,
    TUNE_TRIAL_ID_ATTR,
    PruningAwareOptunaSearch,
    TrialBook,
)
from ctt.tune.trial_errors import ray_trial_error

__all__ = ["DEFAULT_SCHEDULER", "SCHEDULERS", "OptunaPrunerScheduler", "make_pruner",
           "make_scheduler"]

SCHEDULERS = (
    "optuna-median",
    "optuna-percentile",
    "optuna-sha",
    "optuna-hyperband",
    "optuna-curve",
    "asha",
    "none",
)


class _OwnStudy(TrialBook):
    """The scheduler's own study when no searcher is used (grid ablations)."""

    def __init__(self, pruner: optuna.pruners.BasePruner, *, metric: str, mode: str,
                 time_attr: str, max_t: int | None, step_offset: int, seed: int,
                 study_name: str, storage: optuna.storages.BaseStorage | None) -> None:
        self._init_book(metric=metric, time_attr=time_attr, max_t=max_t,
                        step_offset=step_offset)
        # No parameters are ever suggested; the seeded sampler only keeps the study deterministic.
        self._ot_study = optuna.create_study(
            direction="maximize" if mode == "max" else "minimize",
            sampler=optuna.samplers.RandomSampler(seed=seed),
            pruner=pruner,
            study_name=study_name,
            storage=storage,
            load_if_exists=storage is not None,
        )
        if step_offset:
            self._ot_study.set_user_attr(STEP_OFFSET_ATTR, step_offset)
        self._ot_trials = {}

    def optuna_trial(self, trial_id: str) -> optuna.Trial:
        if trial_id not in self._ot_trials:
            ot_trial = self.study.ask()
            ot_trial.set_user_attr(TUNE_TRIAL_ID_ATTR, trial_id)
            self._ot_trials[trial_id] = ot_trial
        return self._ot_trials[trial_id]



def _check_searcher(searcher: Any) -> None:
    if not isinstance(searcher, PruningAwareOptunaSearch):
        raise TypeError(
            f"searcher must be a PruningAwareOptunaSearch, got {type(searcher).__name__}: "
            "Ray's OptunaSearch would tell pruned trials COMPLETE."
        )


class _NotesErrors:
    """Passes the reason Ray gives for a failed trial to the searcher's book, which tells the
    FAIL right after (Ray calls the scheduler first)."""

    _searcher: PruningAwareOptunaSearch | None

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_error(tune_controller, trial)  # type: ignore[misc]
        if self._searcher is not None:
            self._searcher.note_error(trial.trial_id, ray_trial_error(trial)[0])


class OptunaPrunerScheduler(_NotesErrors, FIFOScheduler):
    """Ray Tune scheduler that stops the trials an Optuna pruner rejects and records them PRUNED.

    Args:
        pruner: any single-objective Optuna pruner (``MedianPruner``, ``PercentilePruner``,
            ``SuccessiveHalvingPruner``, ``HyperbandPruner``, ...), configured as usual on the
            pruning clock (Optuna step = ``result[time_attr] - step_offset``). With a
            ``searcher``: leave it ``None`` (the searcher's pruner is used) or pass that one.
        metric: reported metric the pruner compares (``miou``, percent).
        mode: ``"max"`` or ``"min"``; must match the searcher's study direction.
        time_attr: result key that counts training progress (``step``: completed iterations).
        searcher: the :class:`PruningAwareOptunaSearch` given to ``TuneConfig(search_alg=...)``,
            created with ``pruner=``: its study, pruner and trial map are used. ``None``: the
            scheduler keeps its own study with one trial per Tune trial (grid ablations).
        max_t: a result with ``time_attr >= max_t`` is never pruned (the trial has had its full
            budget); with a searcher it must equal the searcher's. ``None``: no such guard.
        step_offset: ``time_attr`` value of Optuna's step 0 (the warm-up length); with a
            searcher it must equal the searcher's.
        seed: seed of the own study's (unused) sampler.
        study_name, storage: name and Optuna storage of the own study (in memory by default).

    Trials are stopped, not paused, so this works with function trainables and ``reuse_actors``.
    State lives in the searcher (saved with the experiment); the own study is not restored by
    ``Tuner.restore``.
    """

    # Buffered results would let a trial train past the step at which it should have stopped.
    _supports_buffered_results = False

    def __init__(
        self,
        pruner: optuna.pruners.BasePruner | None = None,
        *,
        metric: str = "miou",
        mode: str = "max",
        time_attr: str = "step",
        searcher: PruningAwareOptunaSearch | None = None,
        max_t: int | None = None,
        step_offset: int = 0,
        seed: int = 0,
        study_name: str = "ctt-pruner",
        storage: optuna.storages.BaseStorage | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if searcher is not None:
            _check_searcher(searcher)
            if searcher.pruner is None:
                raise TypeError(
                    "the searcher's study has no pruner: create it with "
                    "PruningAwareOptunaSearch(pruner=...) (the pruner must be the study's from "
                    "its creation, make_pruner builds one)")
            if pruner is not None and pruner is not searcher.pruner:
                raise ValueError("pruner differs from the searcher's: pass pruner=None to use "
                                 "the pruner the searcher's study was created with")
            if (max_t, step_offset, time_attr) != (searcher._max_t, searcher._step_offset,
                                                   searcher._time_attr):
                raise ValueError(
                    f"scheduler and searcher disagree on the pruning clock: max_t/step_offset/"
                    f"time_attr {(max_t, step_offset, time_attr)} vs "
                    f"{(searcher._max_t, searcher._step_offset, searcher._time_attr)}")
            pruner = searcher.pruner
        elif not isinstance(pruner, optuna.pruners.BasePruner):
            raise TypeError(f"pruner must be an optuna.pruners.BasePruner, got {type(pruner)}")
        self.pruner = pruner
        self._metric = metric
        self._mode = mode
        self._time_attr = time_attr
        self._max_t = max_t
        self._step_offset = step_offset
        self._searcher = searcher
        self._own = None if searcher is not None else _OwnStudy(
            pruner, metric=metric, mode=mode, time_attr=time_attr, max_t=max_t,
            step_offset=step_offset, seed=seed, study_name=study_name, storage=storage)
        self.n_pruned = 0

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def study(self) -> optuna.Study:
        """The Optuna study where trials are reported and pruned (the searcher's or our own)."""
        return self._book().study

    def _book(self) -> TrialBook:
        if self._own is not None:
            return self._own
        study = self._searcher.study
        expected = "maximize" if self._mode == "max" else "minimize"
        if study.direction.name.lower() != expected:
            raise ValueError(
                f"scheduler mode={self._mode!r} but the searcher's study direction is "
                f"{study.direction.name}: give both the same mode."
            )
        return self._searcher

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # Unlike Ray's schedulers, agree when TuneConfig repeats our own metric and mode, so a
        # study can also set them there (ResultGrid.get_best_result uses them).
        return (metric is None or metric == self._metric) and (mode is None or mode == self._mode)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        value = result.get(self._metric)
        if value is None or result.get("done"):
            # No evaluation in this report, or the trial's final (duplicate) result.
            return TrialScheduler.CONTINUE
        if self._time_attr not in result:
            raise KeyError(
                f"trial {trial.trial_id} reported {self._metric!r} without {self._time_attr!r} "
                f"(the scheduler's time_attr); report both, e.g. tune.report({{"
                f"'{self._time_attr}': it, '{self._metric}': value}})."
            )
        step = int(result[self._time_attr])
        book = self._book()
        state = book.final_state(trial.trial_id)
        if state is not None:
            # Optuna holds the trial finished: a driver restart restored an older Tune state.
            # A pruned trial replays to the step it was pruned at (its files end there again),
            # then stops; a failed or complete one runs on. Optuna is never told again.
            if state == TrialState.PRUNED and step >= (book.recorded_step(trial.trial_id) or 0):
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE
        if not book.report(trial.trial_id, value, step):
            return TrialScheduler.CONTINUE  # warm-up, or a step seen before (restart)
        if self._max_t is not None and step >= self._max_t:
            return TrialScheduler.CONTINUE
        if not book.optuna_trial(trial.trial_id).should_prune():
            return TrialScheduler.CONTINUE
        book.prune(trial.trial_id)
        self.n_pruned += 1
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        if self._own is not None:
            self._own.finish(trial.trial_id, result)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_error(tune_controller, trial)
        if self._own is not None:
            self._own.note_error(trial.trial_id, ray_trial_error(trial)[0])
            self._own.finish(trial.trial_id, None, error=True)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        if self._own is not None and trial.trial_id in self._own._ot_trials:
            self._own.finish(trial.trial_id, None)

    def debug_string(self) -> str:
        return (
            f"Using Optuna {type(self.pruner).__name__} on {self._metric!r} ({self._mode}) "
            f"per {self._time_attr!r}: {self.n_pruned} trials pruned."
        )


class _LinkedFIFO(_NotesErrors, FIFOScheduler):
    """``FIFOScheduler`` (every trial runs to the end) that passes error reasons to the book."""

    def __init__(self, searcher: PruningAwareOptunaSearch | None) -> None:
        super().__init__()
        self._searcher = searcher


class _WarmupASHA(_NotesErrors, ASHAScheduler):
    """Ray's ``ASHAScheduler`` on the pruning clock: it sees ``time_attr - step_offset``, so
    its rungs count from the warm-up's end, and results inside the warm-up are not its
    concern. Stopped trials reach the searcher's book, which records them PRUNED (they end
    below ``max_t``)."""

    def __init__(self, *, searcher: PruningAwareOptunaSearch | None, step_offset: int,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._searcher = searcher
        self._step_offset = step_offset

    def _shifted(self, result: dict) -> dict | None:
        if self._time_attr not in result:
            return result
        shifted = int(result[self._time_attr]) - self._step_offset
        return None if shifted < 0 else {**result, self._time_attr: shifted}

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        shifted = self._shifted(result)
        if shifted is None:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, shifted)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        shifted = self._shifted(result)
        if shifted is None:
            self.on_trial_remove(tune_controller, trial)
            return
        super().on_trial_complete(tune_controller, trial, shifted)


_PRUNERS = {
    "optuna-median": optuna.pruners.MedianPruner,
    "optuna-percentile": optuna.pruners.PercentilePruner,
    "optuna-sha": optuna.pruners.SuccessiveHalvingPruner,
    "optuna-hyperband": optuna.pruners.HyperbandPruner,
    "optuna-curve": CurvePruner,
}


def _check_clock(max_t: int, grace_period: int, step_offset: int) -> None:
    if step_offset < 0 or max_t < 1 or step_offset >= max_t:
        raise ValueError(f"need 0 <= step_offset < max_t, got {step_offset=} {max_t=}")
    if grace_period < 0 or grace_period > max_t - step_offset:
        raise ValueError(f"need 0 <= grace_period <= max_t - step_offset, got {grace_period=} "
                         f"{max_t=} {step_offset=}")


# The sweeps' default pruner (``optuna-curve``) with the setting chosen on the replay of
# recorded curves (benchmarks/replay_pruning.py, 24 configs x 3 seeds x 20 orders, tiny):
# prune when the forecast's optimistic bound falls below the best value any other trial had
# reached by the same step (margin 0), from 3 post-warm-up points, at least 0.5 mIoU of
# scatter assumed around the fit. 40.5 % of the unpruned compute at 2 slots, median / p90
# regret 0.00 / 0.92 mIoU (44.3 %, 0.00 / 0.32 at 8); the median rule it replaced: 51.2 %,
# 0.96 / 2.37.
CURVE_DEFAULTS: dict[str, Any] = {"margin": 0.0, "reference": "step", "n_min_points": 3,
                                  "noise": 0.5}
DEFAULT_SCHEDULER = "optuna-curve"


def make_pruner(name: str, *, max_t: int, grace_period: int, step_offset: int = 0,
                **kw: Any) -> optuna.pruners.BasePruner | None:
    """The Optuna pruner of scheduler ``name`` (None for ``asha`` and ``none``), on the pruning
    clock: ``grace_period`` steps after ``step_offset``, budget ``max_t - step_offset``.

    - ``optuna-median`` / ``optuna-percentile``: ``n_warmup_steps=grace_period``; ``kw`` may set
      ``n_startup_trials`` (default 5), ``interval_steps``, ``n_min_trials`` and, for percentile,
      ``percentile`` (default 25.0: keep the top quarter).
    - ``optuna-sha``: ``min_resource=grace_period``; ``kw``: ``reduction_factor`` (default 3),
      ``min_early_stopping_rate``, ``bootstrap_count``.
    - ``optuna-hyperband``: ``min_resource=grace_period``, ``max_resource=max_t -
      step_offset``; ``kw``: ``reduction_factor`` (default 3), ``bootstrap_count``.
    - ``optuna-curve`` (:class:`ctt.tune.curve_pruner.CurvePruner`, forecasts each trial's
      final value from its post-warm-up curve): ``n_warmup_steps=grace_period``,
      ``max_resource=max_t - step_offset``; ``kw``: ``margin``, ``reference``
      (``complete``/``step``), ``n_min_points``, ``n_startup_trials``, ``z``, ``tau``,
      ``noise``, ``top_k``, with :data:`CURVE_DEFAULTS` where not given (``top_k`` 1; the
      sweeps keep it and fill their confirmation from pruned trials instead).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    _check_clock(max_t, grace_period, step_offset)
    if name not in _PRUNERS:
        if kw:
            raise TypeError(f"scheduler {name!r} has no Optuna pruner; got options {sorted(kw)}")
        return None
    if name in ("optuna-median", "optuna-percentile"):
        kw.setdefault("n_startup_trials", 5)
        kw.setdefault("n_warmup_steps", grace_period)
        if name == "optuna-percentile":
            kw.setdefault("percentile", 25.0)
    elif name == "optuna-curve":
        kw = {**CURVE_DEFAULTS, **kw}
        kw.setdefault("n_warmup_steps", grace_period)
        kw.setdefault("max_resource", max_t - step_offset)
    elif name == "optuna-sha":
        kw.setdefault("min_resource", max(grace_period, 1))
        kw.setdefault("reduction_factor", 3)
    else:
        kw.setdefault("min_resource", max(grace_period, 1))
        kw.setdefault("max_resource", max_t - step_offset)
        kw.setdefault("reduction_factor", 3)
    return _PRUNERS[name](**kw)


def make_scheduler(
    name: str,
    *,
    metric: str = "miou",
    mode: str = "max",
    time_attr: str = "step",
    max_t: int,
    grace_period: int,
    step_offset: int = 0,
    searcher: PruningAwareOptunaSearch | None = None,
    seed: int = 0,
    **kw: Any,
) -> TrialScheduler:
    """Build a scheduler by name (one of :data:`SCHEDULERS`).

    ``max_t`` is the full budget in ``time_attr`` units; ``step_offset`` (the supervised
    warm-up) is where the pruning clock starts; ``grace_period`` counts from there. So the
    first decision can fall at ``step_offset + grace_period``, never inside the warm-up.

    - ``optuna-*``: :class:`OptunaPrunerScheduler`. Without ``searcher`` the pruner is built
      here (:func:`make_pruner`, ``kw`` are its options) in the scheduler's own study; with a
      ``searcher`` its pruner is used (create it with ``pruner=make_pruner(...)``; ``kw`` is
      refused) and must be of this kind. Never prunes a result at ``step >= max_t``.
    - ``asha``: Ray's ``ASHAScheduler`` on the pruning clock (``grace_period``, ``max_t -
      step_offset``); ``kw``: ``reduction_factor`` (default 3), ``brackets``. With a searcher
      the trials it stops are recorded PRUNED by the searcher's rule (ended below ``max_t``).
    - ``none``: FIFO (every trial runs to the end).

    With a ``searcher`` every kind passes Ray's error reason for a failed trial to Optuna.
    ``seed`` seeds the own study.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    _check_clock(max_t, grace_period, step_offset)
    if searcher is not None:
        _check_searcher(searcher)
    if name == "none":
        if kw:
            raise TypeError(f"scheduler 'none' takes no options, got {sorted(kw)}")
        return _LinkedFIFO(searcher)
    if name == "asha":
        return _WarmupASHA(
            searcher=searcher,
            step_offset=step_offset,
            time_attr=time_attr,
            metric=metric,
            mode=mode,
            max_t=max_t - step_offset,
            grace_period=max(grace_period, 1),
            reduction_factor=kw.pop("reduction_factor", 3),
            **kw,
        )
    if searcher is not None:
        if kw:
            raise TypeError(f"pruner options {sorted(kw)} belong to make_pruner(...), whose "
                            "pruner the searcher's study is created with")
        if searcher.pruner is not None and not isinstance(searcher.pruner, _PRUNERS[name]):
            raise ValueError(f"scheduler {name!r} needs a {_PRUNERS[name].__name__}; the "
                             f"searcher's study has {type(searcher.pruner).__name__}")
        pruner = None
    else:
        pruner = make_pruner(name, max_t=max_t, grace_period=grace_period,
                             step_offset=step_offset, **kw)
    return OptunaPrunerScheduler(
        pruner,
        metric=metric,
        mode=mode,
        time_attr=time_attr,
        searcher=searcher,
        max_t=max_t,
        step_offset=step_offset,
        seed=seed,
    )
