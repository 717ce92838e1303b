"""Optuna pruners as a Ray Tune scheduler, and one factory for every scheduler a study may use.

Ray's ``OptunaSearch`` creates its study with ``NopPruner`` and, when a Tune scheduler stops a
trial early, tells Optuna the trial is COMPLETE with its early metric. That misleads TPE (a
half-trained trial looks like a finished bad one), parameter importances and the dashboard.

Here Optuna's record of every trial is made right, whichever scheduler stops it:

- :class:`PruningAwareOptunaSearch` is ``OptunaSearch`` whose study is created with the pruner
  (``pruner=``, so TPE sees it from the first trial: Hyperband's brackets included). It
  reports intermediate values at ``time_attr`` (``step``, not ``training_iteration``) and tells
  each trial's end once, by these rules (:meth:`_TrialBook.finish`):

  ======================================================  ==========================
  the trial ...                                           Optuna state
  ======================================================  ==========================
  reported ``error`` (NaN loss, config/data/checkpoint),  FAIL, user attr ``error``
  errored in Ray, or ended on a non-finite metric
  ended below ``max_t`` (stopped by any scheduler,        PRUNED (curve kept)
  ASHA included) or without a value
  ran its full budget with a finite metric                COMPLETE, value = its final
                                                          ``metric`` (the ranking value)
  ======================================================  ==========================

- :class:`OptunaPrunerScheduler` reports ``result[metric]`` to the Optuna trial, asks the
  study's pruner, and on a "prune" tells the study PRUNED and returns ``STOP``. With a searcher
  it uses the searcher's study and pruner; without one (grid ablations) it keeps its own
  study with one ``study.ask()`` trial per Tune trial and the same rules.
- :func:`make_scheduler` also wraps ASHA and FIFO so that they share the searcher's book (an
  errored trial's reason reaches Optuna; ASHA's rungs count from the warm-up's end).

Pruning clock: Optuna steps are ``result[time_attr] - step_offset``. A study passes its
supervised warm-up length as ``step_offset``: every trial is identical during the warm-up, so
grace periods, rungs and ``min_resource`` count from its end and no decision falls inside it.
Evaluations inside the warm-up are not reported to Optuna. The study records the offset as
the study user attribute ``step_offset``.

Driver restarts (``Tuner.restore``): Tune restores the searcher from its last snapshot, which
may predate the storage (a trial pruned, failed or finished after it; an Optuna trial asked
after it). The book never re-tells a finished trial: before every report and tell it checks
the storage's state. A restored trial that Optuna holds PRUNED replays to the step it was
pruned at and stops there (its files end where they ended); one it holds FAIL or COMPLETE runs
on without touching Optuna. An Optuna trial left RUNNING that Tune never recorded (asked just
before the kill) is told FAIL with the reason.

The storage may also be behind the snapshot (a journal copy synced before the last asks and
tells, restored on a new head; ``ctt.tune.optuna_storage``): the book keeps each trial's params,
reported values and told end in the snapshot, and :meth:`PruningAwareOptunaSearch.reconcile`
adds back what the storage lacks, so each Tune trial is held exactly once with its state.
``PruningAwareOptunaSearch.restoring_into(storage)`` binds a restore to the storage this driver
opened.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from ctt.tune.curve_pruner import CurvePruner

__all__ = ["ERROR_ATTR", "SCHEDULERS", "STEP_OFFSET_ATTR", "TUNE_TRIAL_ID_ATTR",
           "OptunaPrunerScheduler", "PruningAwareOptunaSearch", "make_pruner",
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

# Optuna user attribute that links an Optuna trial back to its Tune trial (results, dashboard).
TUNE_TRIAL_ID_ATTR = "tune_trial_id"
# Optuna trial user attribute holding why a FAIL trial failed (one line).
ERROR_ATTR = "error"
# Optuna study user attribute: iterations before Optuna's step 0 (the supervised warm-up).
STEP_OFFSET_ATTR = "step_offset"
_MAX_ERROR_CHARS = 2000
ORPHAN_ERROR = ("orphaned: the driver stopped after Optuna asked for this trial and before "
                "Tune saved it; the restored study samples a new trial instead")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _ray_error_message(trial: Any) -> str:
    """One line naming the exception Ray recorded for ``trial`` (its error file's last line)."""
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
        if lines:
            return lines[-1][:_MAX_ERROR_CHARS]
    return "the trial raised (Ray recorded no error text)"


class _TrialBook:
    """What Optuna holds about each Tune trial; shared by the searcher and the scheduler.

    Subclasses provide ``_ot_study`` (an ``optuna.Study``) and ``_ot_trials`` (Tune trial_id ->
    ``optuna.Trial``); the names match ``OptunaSearch`` so the searcher's own attributes are
    used directly and are saved/restored with it.
    """

    _ot_study: optuna.Study | None
    _ot_trials: dict[str, optuna.Trial]

    def _init_book(self, *, metric: str | None, time_attr: str, max_t: int | None,
                   step_offset: int) -> None:
        if step_offset < 0:
            raise ValueError(f"step_offset must be >= 0, got {step_offset}")
        self._book_metric = metric
        self._time_attr = time_attr
        self._max_t = max_t
        self._step_offset = step_offset
        # Last Optuna step reported per trial: the searcher and the scheduler both see every
        # result, and a trial restarted from a checkpoint repeats steps (Optuna warns).
        self._last_step: dict[str, int] = {}
        self._final: dict[str, TrialState] = {}  # trials Optuna holds finished
        self._errors: dict[str, str] = {}  # Ray's error text, noted before the tell
        # What this book knows of each trial, kept with the searcher's snapshot so that a
        # storage restored behind it can be made whole again (PruningAwareOptunaSearch.
        # reconcile): params and distributions, reported values, the end told.
        self._params: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._curves: dict[str, dict[int, float]] = {}
        self._told: dict[str, tuple[TrialState, float | None, str | None]] = {}

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

    def final_state(self, trial_id: str) -> TrialState | None:
        """The trial's state if Optuna holds it finished, else None. Asks the storage when the
        book does not know: after a driver restart the book may be older than the storage."""
        state = self._final.get(trial_id)
        if state is None and trial_id in self._ot_trials:
            ot_trial = self._ot_trials[trial_id]
            stored = self.study._storage.get_trial(ot_trial._trial_id)
            if stored.state.is_finished():
                self._final[trial_id] = state = stored.state
                self._told.setdefault(trial_id, (stored.state, stored.value,
                                                 stored.user_attrs.get(ERROR_ATTR)))
        return state

    def is_pruned(self, trial_id: str) -> bool:
        return self.final_state(trial_id) == TrialState.PRUNED

    def recorded_step(self, trial_id: str) -> int | None:
        """The last step (``time_attr`` units) Optuna holds for the trial, or None."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return None
        values = self.study._storage.get_trial(ot_trial._trial_id).intermediate_values
        return max(values) + self._step_offset if values else None

    def report(self, trial_id: str, value: float, step: int) -> bool:
        """Report ``value`` at ``step`` (Optuna step ``step - step_offset``) once. Skipped: a
        trial Optuna holds finished, steps inside the warm-up, repeated or earlier steps,
        non-finite values. Returns whether the value was recorded."""
        ot_step = int(step) - self._step_offset
        if (ot_step < 0 or not _finite(value) or ot_step <= self._last_step.get(trial_id, -1)
                or self.final_state(trial_id) is not None):
            return False
        self.optuna_trial(trial_id).report(float(value), ot_step)
        self._last_step[trial_id] = ot_step
        self._curves.setdefault(trial_id, {})[ot_step] = float(value)
        return True

    def note_error(self, trial_id: str, message: str) -> None:
        """Remember why Ray failed the trial, for the FAIL told next (Tune calls the
        scheduler's ``on_trial_error`` before the searcher's ``on_trial_complete``)."""
        self._errors[trial_id] = message

    def tell(self, trial_id: str, state: TrialState, value: float | None = None,
             error: str | None = None) -> bool:
        """Tell the trial's end once; never a trial Optuna holds finished. Returns whether it
        was told."""
        if self.final_state(trial_id) is not None:
            return False
        ot_trial = self.optuna_trial(trial_id)
        if error is not None:
            ot_trial.set_user_attr(ERROR_ATTR, error[:_MAX_ERROR_CHARS])
        value = value if state == TrialState.COMPLETE else None
        self.study.tell(ot_trial, value, state=state)
        self._final[trial_id] = state
        self._told[trial_id] = (state, value, None if error is None
                                else error[:_MAX_ERROR_CHARS])
        return True

    def prune(self, trial_id: str) -> FrozenTrial:
        """Tell the study that the trial was pruned; Optuna keeps its intermediate values."""
        self.tell(trial_id, TrialState.PRUNED)
        ot_trial = self.optuna_trial(trial_id)
        return self.study._storage.get_trial(ot_trial._trial_id)

    def finish(self, trial_id: str, result: dict | None, error: bool = False
               ) -> TrialState | None:
        """Tell the end of a trial from its last result (module docstring's table). Returns
        the state told, or None when Optuna already held the trial finished."""
        if self.final_state(trial_id) is not None:
            return None
        result = result or {}
        metric = self._book_metric
        value = result.get(metric) if metric else None
        step = result.get(self._time_attr)
        reason = self._errors.pop(trial_id, None)
        if error:
            reason = reason or "the trial raised (Ray recorded no error text)"
        elif result.get("error"):
            reason = str(result["error"])
        elif value is not None and not _finite(value):
            reason = f"non-finite final {metric} ({value})"
        if reason is not None:
            self.tell(trial_id, TrialState.FAIL, error=reason)
            return TrialState.FAIL
        if value is not None and step is not None:
            self.report(trial_id, value, int(step))  # ASHA's stop step reaches no searcher
        full = self._max_t is None or (step is not None and int(step) >= self._max_t)
        if value is None or not full:
            self.tell(trial_id, TrialState.PRUNED)
            return TrialState.PRUNED
        self.tell(trial_id, TrialState.COMPLETE, float(value))
        return TrialState.COMPLETE


class PruningAwareOptunaSearch(OptunaSearch, _TrialBook):
    """``OptunaSearch`` whose Optuna record is right under pruning, errors and restarts.

    Args (all others are ``OptunaSearch``'s):
        pruner: the Optuna pruner, given to the study when it is created (``None``: Optuna's
            ``NopPruner``, as in Ray). :class:`OptunaPrunerScheduler` uses it.
        time_attr: result key of training progress (``step``: completed iterations).
        max_t: the full budget in ``time_attr`` units; a trial that ends below it without an
            error is PRUNED (any scheduler stopped it). ``None``: never inferred.
        step_offset: ``time_attr`` value of Optuna's step 0 (the warm-up length).

    Every Optuna trial carries the user attribute ``tune_trial_id``.
    """

    def __init__(self, *args: Any, pruner: optuna.pruners.BasePruner | None = None,
                 time_attr: str = "step", max_t: int | None = None, step_offset: int = 0,
                 **kwargs: Any) -> None:
        if pruner is not None and not isinstance(pruner, optuna.pruners.BasePruner):
            raise TypeError(f"pruner must be an optuna.pruners.BasePruner, got {type(pruner)}")
        # Set before OptunaSearch.__init__, which creates the study when given a space.
        self._pruner = pruner
        self._init_book(metric=None, time_attr=time_attr, max_t=max_t, step_offset=step_offset)
        super().__init__(*args, **kwargs)

    @property
    def pruner(self) -> optuna.pruners.BasePruner | None:
        """The study's pruner (the one given, before the study exists)."""
        if self._ot_study is not None and not isinstance(self._ot_study.pruner,
                                                         optuna.pruners.NopPruner):
            return self._ot_study.pruner
        return self._pruner

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        # OptunaSearch hard-codes NopPruner in create_study; the study is ours from here on,
        # before any trial is asked, so the sampler sees the pruner from the first trial.
        if self._pruner is not None:
            self._ot_study.pruner = self._pruner
        if self._step_offset:
            self._ot_study.set_user_attr(STEP_OFFSET_ATTR, self._step_offset)

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr(TUNE_TRIAL_ID_ATTR, trial_id)
        self._params[trial_id] = (dict(ot_trial.params), dict(ot_trial.distributions))
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
        if isinstance(self.metric, list):
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._completed_trials.add(trial_id)
        self._book_metric = self.metric
        self.finish(trial_id, result, error=error)

    @classmethod
    @contextlib.contextmanager
    def restoring_into(cls, storage: optuna.storages.BaseStorage) -> Iterator[None]:
        """Within the block, :meth:`restore` binds the restored study to ``storage`` instead
        of the storage pickled with the snapshot: the one this driver opened (on a new head the
        journal's path may differ, a database URL is reopened)."""
        old, cls._restore_storage = cls._restore_storage, storage
        try:
            yield
        finally:
            cls._restore_storage = old

    _restore_storage: optuna.storages.BaseStorage | None = None

    def restore(self, checkpoint_path: str) -> None:
        """Restore the saved searcher, then reconcile it with the storage (a driver restart)."""
        super().restore(checkpoint_path)
        for name in ("_final", "_errors", "_last_step", "_params", "_curves", "_told"):
            if not hasattr(self, name):
                setattr(self, name, {})
        if self._ot_study is not None:
            done = self.reconcile(PruningAwareOptunaSearch._restore_storage)
            if any(done.values()):
                logging.getLogger(__name__).warning(
                    "Optuna's storage disagreed with the restored Tune experiment; trials "
                    "added from the snapshot: %s, ends told: %s, orphans failed: %s",
                    done["added"] or "none", done["told"] or "none", done["orphans"] or "none")

    def reconcile(self, storage: optuna.storages.BaseStorage | None = None
                  ) -> dict[str, list[Any]]:
        """Make the Optuna study (in ``storage``, default the study's own) hold each Tune trial
        of this searcher exactly once, after a restore whose snapshot and storage disagree.

        The snapshot (this book) is what Tune restored: its trials are the ones Tune will
        resume or keep. The storage may be behind it (a journal copy synced before the last
        asks or tells) or ahead of it (asks, reports and tells after the snapshot):

        - a trial the storage lacks is added again from the book: its params and
          distributions, reported values, the end it was told (RUNNING if none), ``tune_trial_id``
          (and ``error``) attributes;
        - a trial the storage holds RUNNING gets the values it lacks and, if the book told its
          end, that end;
        - a trial the storage holds finished stays as it is (the module docstring: never told
          again);
        - an Optuna trial RUNNING that no trial of the book holds is told FAIL
          (:meth:`fail_orphans`); a finished one is kept (a trial that ran after the snapshot).

        Returns ``{"added": [...], "told": [...], "orphans": [...]}`` (Tune trial ids, Optuna
        numbers for orphans)."""
        old = self.study
        study = optuna.create_study(
            storage=storage if storage is not None else old._storage,
            study_name=old.study_name, sampler=old.sampler, pruner=old.pruner,
            # from the mode, not old.directions: the old storage may not hold the study
            directions=["minimize" if m == "min" else "maximize"
                        for m in (self._mode if isinstance(self._mode, list) else [self._mode])],
            load_if_exists=True)
        if study._study_id != old._study_id:
            _forget_study(study.sampler)
        if self._step_offset and STEP_OFFSET_ATTR not in study.user_attrs:
            study.set_user_attr(STEP_OFFSET_ATTR, self._step_offset)
        stored: dict[str, FrozenTrial] = {}
        for ft in study.get_trials(deepcopy=False):
            tid = ft.user_attrs.get(TUNE_TRIAL_ID_ATTR)
            if tid is not None:
                stored.setdefault(tid, ft)
        added, told = [], []
        for tid in list(self._ot_trials):
            ft = stored.get(tid)
            if ft is None:
                ft = self._add_from_book(study, tid)
                added.append(tid)
            elif not ft.state.is_finished():
                for step, value in sorted(self._curves.get(tid, {}).items()):
                    if step not in ft.intermediate_values:
                        study._storage.set_trial_intermediate_value(ft._trial_id, step, value)
                if tid in self._told:
                    state, value, error = self._told[tid]
                    if error is not None:
                        study._storage.set_trial_user_attr(ft._trial_id, ERROR_ATTR, error)
                    study.tell(ft.number, value, state=state)
                    told.append(tid)
                ft = study._storage.get_trial(ft._trial_id)
            self._ot_trials[tid] = optuna.Trial(study, ft._trial_id)
            if ft.state.is_finished():
                self._final[tid] = ft.state
            else:
                self._final.pop(tid, None)
            if ft.intermediate_values:  # steps the storage holds are not reported again
                self._last_step[tid] = max(self._last_step.get(tid, -1),
                                           max(ft.intermediate_values))
        self._ot_study = study
        self._storage = study._storage
        return {"added": added, "told": told, "orphans": self.fail_orphans()}

    def _add_from_book(self, study: optuna.Study, tid: str) -> FrozenTrial:
        """Add the Tune trial ``tid`` to ``study`` as this book knows it (see reconcile)."""
        params, distributions = self._params.get(tid, ({}, {}))
        state, value, error = self._told.get(tid, (TrialState.RUNNING, None, None))
        curve = dict(self._curves.get(tid, {}))
        if state == TrialState.PRUNED and curve:
            value = curve[max(curve)]  # as study.tell records a pruned trial
        elif state != TrialState.COMPLETE:
            value = None
        attrs = {TUNE_TRIAL_ID_ATTR: tid, **({ERROR_ATTR: error} if error is not None else {})}
        frozen = optuna.trial.create_trial(
            state=state, value=value, params=params, distributions=distributions,
            user_attrs=attrs, intermediate_values=curve)
        trial_id = study._storage.create_new_trial(study._study_id, template_trial=frozen)
        return study._storage.get_trial(trial_id)

    def fail_orphans(self) -> list[int]:
        """Tell FAIL every RUNNING Optuna trial that no Tune trial of this searcher holds
        (asked after the last snapshot before a driver kill: Tune will never run it).
        Returns their numbers."""
        known = {t._trial_id for t in self._ot_trials.values()}
        orphans = [ft for ft in self.study.get_trials(deepcopy=False,
                                                     states=(TrialState.RUNNING,))
                   if ft._trial_id not in known]
        for ft in orphans:
            self.study._storage.set_trial_user_attr(ft._trial_id, ERROR_ATTR, ORPHAN_ERROR)
            self.study.tell(ft.number, state=TrialState.FAIL)
        return [ft.number for ft in orphans]


class _OwnStudy(_TrialBook):
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


def _forget_study(sampler: optuna.samplers.BaseSampler) -> None:
    """Clear the sampler's cached search spaces, which are bound to the id of the study they
    were computed on (Optuna raises when one sees another study): the restored study may have
    another id in its new storage."""
    from optuna.search_space import IntersectionSearchSpace

    for name, value in list(vars(sampler).items()):
        if isinstance(value, IntersectionSearchSpace):
            setattr(sampler, name, IntersectionSearchSpace(
                include_pruned=getattr(value, "_include_pruned", False)))


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
            self._searcher.note_error(trial.trial_id, _ray_error_message(trial))


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

    def _book(self) -> _TrialBook:
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
            self._own.note_error(trial.trial_id, _ray_error_message(trial))
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
