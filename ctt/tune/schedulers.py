"""Optuna pruners as a Ray Tune scheduler, and one factory for every scheduler a study may use.

Ray's ``OptunaSearch`` creates its study with ``NopPruner`` and, when a Tune scheduler stops a
trial early, tells Optuna the trial is COMPLETE with its early metric. That misleads TPE (a
half-trained trial looks like a finished bad one), parameter importances and the dashboard.

Here the pruning decision is made by an Optuna pruner on the Optuna trial itself:

- :class:`OptunaPrunerScheduler` reports ``result[metric]`` at ``result[time_attr]`` to the
  Optuna trial, asks the pruner, and on a "prune" tells the study ``TrialState.PRUNED`` (which
  keeps the intermediate values, so curves survive) and returns ``TrialScheduler.STOP``.
- :class:`PruningAwareOptunaSearch` is ``OptunaSearch`` that shares its trial map with the
  scheduler: it reports intermediate values at ``time_attr`` (not ``training_iteration``) and
  does not re-tell a pruned trial COMPLETE when Tune later calls ``on_trial_complete``.
- Without a searcher (grid ablations) the scheduler keeps its own in-memory Optuna study with one
  ``study.ask()`` trial per Tune trial, so pruning works the same way.

Limitation: ASHA (``make_scheduler("asha")``) stops trials without telling the searcher, which
then records them COMPLETE; use the ``optuna-*`` schedulers when the Optuna study matters.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

SCHEDULERS = (
    "optuna-median",
    "optuna-percentile",
    "optuna-sha",
    "optuna-hyperband",
    "asha",
    "none",
)

# Optuna user attribute that links an Optuna trial back to its Tune trial (results, dashboard).
TUNE_TRIAL_ID_ATTR = "tune_trial_id"


class _TrialBook:
    """Bookkeeping shared by the searcher and the scheduler's own study.

    Subclasses provide ``_ot_study`` (an ``optuna.Study``) and ``_ot_trials``
    (Tune trial_id -> ``optuna.Trial``); the names match ``OptunaSearch`` so the searcher's own
    attributes are used directly and are saved/restored with it.
    """

    _ot_study: optuna.Study | None
    _ot_trials: dict[str, optuna.Trial]

    def _init_book(self) -> None:
        # Last step reported per trial: the searcher and the scheduler both see every result, and
        # a trial restarted from a checkpoint repeats steps; Optuna warns on a repeated step.
        self._last_step: dict[str, int] = {}
        self._pruned_trials: set[str] = set()

    @property
    def study(self) -> optuna.Study:
        """The Optuna study holding the trials (raises if the searcher has not built it yet)."""
        if self._ot_study is None:
            raise RuntimeError(
                f"{type(self).__name__} has no Optuna study yet: give it a search space and "
                "metric/mode, or pass it to TuneConfig(search_alg=...) so Tune sets them."
            )
        return self._ot_study

    def optuna_trial(self, trial_id: str) -> optuna.Trial:
        """The Optuna trial for a Tune trial id."""
        try:
            return self._ot_trials[trial_id]
        except KeyError:
            raise KeyError(
                f"Tune trial {trial_id!r} has no Optuna trial: it was not suggested by this "
                f"{type(self).__name__}. Pass the same searcher to TuneConfig(search_alg=...) and "
                "to OptunaPrunerScheduler(searcher=...)."
            ) from None

    def report(self, trial_id: str, value: float, step: int) -> bool:
        """Report ``value`` at ``step`` once; later or repeated steps are skipped.

        Returns whether the value was recorded.
        """
        if trial_id in self._pruned_trials or step <= self._last_step.get(trial_id, -1):
            return False
        self.optuna_trial(trial_id).report(value, step)
        self._last_step[trial_id] = step
        return True

    def is_pruned(self, trial_id: str) -> bool:
        return trial_id in self._pruned_trials

    def prune(self, trial_id: str) -> FrozenTrial:
        """Tell the study that the trial was pruned; Optuna keeps its intermediate values."""
        frozen = self.study.tell(self.optuna_trial(trial_id), state=TrialState.PRUNED)
        self._pruned_trials.add(trial_id)
        return frozen


class PruningAwareOptunaSearch(OptunaSearch, _TrialBook):
    """``OptunaSearch`` whose trials can be pruned by :class:`OptunaPrunerScheduler`.

    Differences from ``OptunaSearch`` (all other arguments are passed through):

    - intermediate values are reported at ``result[time_attr]`` (default ``"step"``, completed
      training iterations) instead of ``training_iteration`` (number of reports), so they line
      up with the pruner's steps and across trials that report at different rates;
    - a trial pruned by the scheduler is already told PRUNED; ``on_trial_complete`` leaves it so
      (Ray's version would tell it COMPLETE with its early metric);
    - every Optuna trial carries the user attribute ``tune_trial_id``.
    """

    def __init__(self, *args: Any, time_attr: str = "step", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._time_attr = time_attr
        self._init_book()

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials:
            return  # Optuna has no intermediate values for multi-objective studies
        value = result.get(self.metric)
        if value is None:
            return  # a report without the metric (e.g. losses between evaluations)
        step = result.get(self._time_attr, result.get("training_iteration"))
        self.report(trial_id, value, int(step))

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id in self._pruned_trials:
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


class _OwnStudy(_TrialBook):
    """The scheduler's own in-memory study when no searcher is used (grid ablations)."""

    def __init__(
        self,
        pruner: optuna.pruners.BasePruner,
        mode: str,
        seed: int,
        study_name: str,
        storage: optuna.storages.BaseStorage | None,
    ) -> None:
        # No parameters are ever suggested; the seeded sampler only keeps the study deterministic.
        self._ot_study = optuna.create_study(
            direction="maximize" if mode == "max" else "minimize",
            sampler=optuna.samplers.RandomSampler(seed=seed),
            pruner=pruner,
            study_name=study_name,
            storage=storage,
            load_if_exists=storage is not None,
        )
        self._ot_trials = {}
        self._finished: set[str] = set()
        self._init_book()

    def optuna_trial(self, trial_id: str) -> optuna.Trial:
        if trial_id not in self._ot_trials:
            ot_trial = self.study.ask()
            ot_trial.set_user_attr(TUNE_TRIAL_ID_ATTR, trial_id)
            self._ot_trials[trial_id] = ot_trial
        return self._ot_trials[trial_id]

    def finish(self, trial_id: str, value: float | None, error: bool) -> None:
        """Tell the final state, mirroring ``OptunaSearch.on_trial_complete``."""
        if trial_id in self._pruned_trials or trial_id in self._finished:
            return
        self._finished.add(trial_id)
        if error:
            state, value = TrialState.FAIL, None
        elif value is None or math.isnan(value):
            # No final metric: keep the curve; Optuna takes the last intermediate as the value.
            state, value = TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
        self.study.tell(self.optuna_trial(trial_id), value, state=state)


class OptunaPrunerScheduler(FIFOScheduler):
    """Ray Tune scheduler that stops the trials an Optuna pruner rejects and records them PRUNED.

    Args:
        pruner: any single-objective Optuna pruner (``MedianPruner``, ``PercentilePruner``,
            ``SuccessiveHalvingPruner``, ``HyperbandPruner``, ...), configured as usual
            (``n_startup_trials``, ``n_warmup_steps``, ``min_resource``, ...). Steps are
            ``result[time_attr]``.
        metric: reported metric the pruner compares (``miou``, percent).
        mode: ``"max"`` or ``"min"``; must match the searcher's study direction.
        time_attr: result key that counts training progress (``step``: completed iterations).
        searcher: the :class:`PruningAwareOptunaSearch` given to ``TuneConfig(search_alg=...)``.
            Its study and trial map are used, and the pruner is installed on its study (Ray
            creates it with ``NopPruner``). ``None``: the scheduler keeps its own study with one
            trial per Tune trial (grid ablations).
        max_t: a result with ``time_attr >= max_t`` is never pruned: the trial has had its full
            budget, so its value is a final one. ``None``: no such guard.
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
        pruner: optuna.pruners.BasePruner,
        *,
        metric: str = "miou",
        mode: str = "max",
        time_attr: str = "step",
        searcher: PruningAwareOptunaSearch | None = None,
        max_t: int | None = None,
        seed: int = 0,
        study_name: str = "ctt-pruner",
        storage: optuna.storages.BaseStorage | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(pruner, optuna.pruners.BasePruner):
            raise TypeError(f"pruner must be an optuna.pruners.BasePruner, got {type(pruner)}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if searcher is not None and not isinstance(searcher, PruningAwareOptunaSearch):
            raise TypeError(
                f"searcher must be a PruningAwareOptunaSearch, got {type(searcher).__name__}: "
                "Ray's OptunaSearch would tell pruned trials COMPLETE."
            )
        self.pruner = pruner
        self._metric = metric
        self._mode = mode
        self._time_attr = time_attr
        self._max_t = max_t
        self._searcher = searcher
        self._own = (
            None if searcher is not None else _OwnStudy(pruner, mode, seed, study_name, storage)
        )
        self.n_pruned = 0

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def study(self) -> optuna.Study:
        """The Optuna study where trials are reported and pruned (the searcher's or our own)."""
        return self._book().study

    def _book(self) -> _TrialBook:
        if self._own is not None:
            return self._own
        book = self._searcher
        study = book.study
        # After Tuner.restore the searcher's study is a fresh unpickled object: re-install.
        if study.pruner is not self.pruner:
            expected = "maximize" if self._mode == "max" else "minimize"
            if study.direction.name.lower() != expected:
                raise ValueError(
                    f"scheduler mode={self._mode!r} but the searcher's study direction is "
                    f"{study.direction.name}: give both the same mode."
                )
            study.pruner = self.pruner
        return book

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
        if book.is_pruned(trial.trial_id):
            return TrialScheduler.STOP
        if not book.report(trial.trial_id, value, step):
            return TrialScheduler.CONTINUE  # a step seen before (restart from a checkpoint)
        if self._max_t is not None and step >= self._max_t:
            return TrialScheduler.CONTINUE
        if not book.optuna_trial(trial.trial_id).should_prune():
            return TrialScheduler.CONTINUE
        book.prune(trial.trial_id)
        self.n_pruned += 1
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        if self._own is not None:
            self._own.finish(trial.trial_id, (result or {}).get(self._metric), error=False)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        if self._own is not None:
            self._own.finish(trial.trial_id, None, error=True)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        if self._own is not None and trial.trial_id in self._own._ot_trials:
            self._own.finish(trial.trial_id, None, error=False)

    def debug_string(self) -> str:
        return (
            f"Using Optuna {type(self.pruner).__name__} on {self._metric!r} ({self._mode}) "
            f"per {self._time_attr!r}: {self.n_pruned} trials pruned."
        )


_PRUNERS = {
    "optuna-median": optuna.pruners.MedianPruner,
    "optuna-percentile": optuna.pruners.PercentilePruner,
    "optuna-sha": optuna.pruners.SuccessiveHalvingPruner,
    "optuna-hyperband": optuna.pruners.HyperbandPruner,
}


def make_scheduler(
    name: str,
    *,
    metric: str = "miou",
    mode: str = "max",
    time_attr: str = "step",
    max_t: int,
    grace_period: int,
    searcher: PruningAwareOptunaSearch | None = None,
    seed: int = 0,
    **kw: Any,
) -> TrialScheduler:
    """Build a scheduler by name (one of :data:`SCHEDULERS`).

    ``grace_period`` (steps a trial always runs) and ``max_t`` (full budget in steps) map to:

    - ``optuna-median`` / ``optuna-percentile``: ``n_warmup_steps=grace_period``; ``kw`` may set
      ``n_startup_trials`` (default 5), ``interval_steps``, ``n_min_trials`` and, for percentile,
      ``percentile`` (default 25.0: keep the top quarter).
    - ``optuna-sha``: ``min_resource=grace_period``; ``kw``: ``reduction_factor`` (default 3),
      ``min_early_stopping_rate``, ``bootstrap_count``.
    - ``optuna-hyperband``: ``min_resource=grace_period``, ``max_resource=max_t``; ``kw``:
      ``reduction_factor`` (default 3), ``bootstrap_count``.
    - ``asha``: Ray's ``ASHAScheduler``; ``kw``: ``reduction_factor`` (default 3), ``brackets``.
      It does not tell the searcher about stopped trials.
    - ``none``: ``FIFOScheduler`` (every trial runs to the end).

    The ``optuna-*`` schedulers share ``searcher`` (a :class:`PruningAwareOptunaSearch`) or,
    without one, keep their own study; they never prune a result at ``step >= max_t``.
    ``seed`` seeds that own study.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if grace_period < 0 or max_t < 1 or grace_period > max_t:
        raise ValueError(f"need 0 <= grace_period <= max_t, got {grace_period=} {max_t=}")
    if name == "none":
        if kw:
            raise TypeError(f"scheduler 'none' takes no options, got {sorted(kw)}")
        return FIFOScheduler()
    if name == "asha":
        return ASHAScheduler(
            time_attr=time_attr,
            metric=metric,
            mode=mode,
            max_t=max_t,
            grace_period=max(grace_period, 1),
            reduction_factor=kw.pop("reduction_factor", 3),
            **kw,
        )
    if name in ("optuna-median", "optuna-percentile"):
        kw.setdefault("n_startup_trials", 5)
        kw.setdefault("n_warmup_steps", grace_period)
        if name == "optuna-percentile":
            kw.setdefault("percentile", 25.0)
    elif name == "optuna-sha":
        kw.setdefault("min_resource", max(grace_period, 1))
        kw.setdefault("reduction_factor", 3)
    else:
        kw.setdefault("min_resource", max(grace_period, 1))
        kw.setdefault("max_resource", max_t)
        kw.setdefault("reduction_factor", 3)
    pruner = _PRUNERS[name](**kw)
    return OptunaPrunerScheduler(
        pruner,
        metric=metric,
        mode=mode,
        time_attr=time_attr,
        searcher=searcher,
        max_t=max_t,
        seed=seed,
    )
