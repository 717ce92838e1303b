"""Optuna's record of a sweep made right: the searcher and its trial bookkeeping.

Ray's ``OptunaSearch`` creates its study with ``NopPruner`` and, when a Tune scheduler stops a
trial early, tells Optuna the trial is COMPLETE with its early metric. That misleads TPE (a
half-trained trial looks like a finished bad one), parameter importances and the dashboard.

:class:`PruningAwareOptunaSearch` is ``OptunaSearch`` whose study is created with the pruner
(``pruner=``, so TPE sees it from the first trial: Hyperband's brackets included). It reports
intermediate values at ``time_attr`` (``step``, not ``training_iteration``) and tells each
trial's end once, by these rules (:meth:`TrialBook.finish`):

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

The schedulers that prune (:mod:`ctt.tune.schedulers`) tell their decisions through the same
book, so whichever scheduler stops a trial, Optuna holds it once with the right state.

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
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ctt.tune.layout import finite
from ctt.tune.trial_errors import NO_ERROR_TEXT

__all__ = ["ERROR_ATTR", "MAX_ERROR_CHARS", "ORPHAN_ERROR", "STEP_OFFSET_ATTR",
           "TUNE_TRIAL_ID_ATTR", "PruningAwareOptunaSearch", "TrialBook"]

# Optuna user attribute that links an Optuna trial back to its Tune trial (results, dashboard).
TUNE_TRIAL_ID_ATTR = "tune_trial_id"
# Optuna trial user attribute holding why a FAIL trial failed (one line).
ERROR_ATTR = "error"
# Optuna study user attribute: iterations before Optuna's step 0 (the supervised warm-up).
STEP_OFFSET_ATTR = "step_offset"
# Longest error text kept in an Optuna user attribute.
MAX_ERROR_CHARS = 2000
ORPHAN_ERROR = ("orphaned: the driver stopped after Optuna asked for this trial and before "
                "Tune saved it; the restored study samples a new trial instead")



class TrialBook:
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
        if (ot_step < 0 or finite(value) is None or ot_step <= self._last_step.get(trial_id, -1)
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
            ot_trial.set_user_attr(ERROR_ATTR, error[:MAX_ERROR_CHARS])
        value = value if state == TrialState.COMPLETE else None
        self.study.tell(ot_trial, value, state=state)
        self._final[trial_id] = state
        self._told[trial_id] = (state, value, None if error is None
                                else error[:MAX_ERROR_CHARS])
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
            reason = reason or NO_ERROR_TEXT
        elif result.get("error"):
            reason = str(result["error"])
        elif value is not None and finite(value) is None:
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


class PruningAwareOptunaSearch(OptunaSearch, TrialBook):
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
                 budget: Any = None, **kwargs: Any) -> None:
        if pruner is not None and not isinstance(pruner, optuna.pruners.BasePruner):
            raise TypeError(f"pruner must be an optuna.pruners.BasePruner, got {type(pruner)}")
        # Set before OptunaSearch.__init__, which creates the study when given a space.
        self._pruner = pruner
        self._budget = budget  # a ctt.tune.adaptive.ComputeBudget: no trial past --budget
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
        budget = getattr(self, "_budget", None)
        if budget is not None and trial_id not in budget.live:
            admitted = budget.admit(trial_id)
            if admitted is None:
                return None
            if admitted is False:
                return Searcher.FINISHED
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
        budget = getattr(self, "_budget", None)
        if budget is not None:
            budget.ended(trial_id, result)
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



def _forget_study(sampler: optuna.samplers.BaseSampler) -> None:
    """Clear the sampler's cached search spaces, which are bound to the id of the study they
    were computed on (Optuna raises when one sees another study): the restored study may have
    another id in its new storage."""
    from optuna.search_space import IntersectionSearchSpace

    for name, value in list(vars(sampler).items()):
        if isinstance(value, IntersectionSearchSpace):
            setattr(sampler, name, IntersectionSearchSpace(
                include_pruned=getattr(value, "_include_pruned", False)))

