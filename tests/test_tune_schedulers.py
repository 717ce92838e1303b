"""Tests for ctt/tune/schedulers.py and ctt/tune/optuna_search.py: Optuna pruners as a Tune
scheduler, PRUNED bookkeeping."""

import os
import pickle
import warnings
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from helpers import tune_snapshot
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from ctt.tune.curve_pruner import CurvePruner
from ctt.tune.optuna_search import (
    ERROR_ATTR,
    ORPHAN_ERROR,
    STEP_OFFSET_ATTR,
    TUNE_TRIAL_ID_ATTR,
    PruningAwareOptunaSearch,
)
from ctt.tune.schedulers import SCHEDULERS, OptunaPrunerScheduler, make_pruner, make_scheduler

os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
optuna.logging.set_verbosity(optuna.logging.WARNING)

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


def _trial(trial_id: str) -> SimpleNamespace:
    # The scheduler only reads trial_id from Tune's Trial.
    return SimpleNamespace(trial_id=trial_id)


def _run(sched, trial_id, steps, values, searcher=None):
    """Drive one trial the way TuneController does; returns the last step it ran."""
    t = _trial(trial_id)
    result = {}
    for i, (step, value) in enumerate(zip(steps, values)):
        result = {"step": int(step), "miou": float(value), "training_iteration": i + 1}
        decision = sched.on_trial_result(None, t, result)
        if decision == STOP:
            break
        if searcher is not None:  # Tune skips the searcher when the scheduler said STOP
            searcher.on_trial_result(trial_id, result)
    sched.on_trial_complete(None, t, result)
    if searcher is not None:
        searcher.on_trial_complete(trial_id, result=result)
    return result["step"]


def _state_of(study, trial_id):
    (ft,) = [t for t in study.trials if t.user_attrs.get(TUNE_TRIAL_ID_ATTR) == trial_id]
    return ft


# --- unit tests: scheduler logic without Ray actors -------------------------------------------


def _reference_median_stop(completed, curve, steps, warmup, max_t):
    """First step where the trial's best-so-far is below the median of the completed trials'
    values at that step (MedianPruner, maximise), or None; never at ``step >= max_t`` (the
    trial had its full budget). Plain loops, float64."""
    best = -np.inf
    for j, step in enumerate(steps):
        best = max(best, float(curve[j]))
        if step < warmup or step >= max_t:
            continue
        at_step = sorted(float(c[j]) for c in completed)
        n = len(at_step)
        median = at_step[n // 2] if n % 2 else 0.5 * (at_step[n // 2 - 1] + at_step[n // 2])
        if best < median:
            return step
    return None


@pytest.mark.parametrize("seed", range(6))
def test_median_stop_step_matches_reference(seed):
    rng = np.random.default_rng(seed)
    steps = np.arange(2, 22, 2)  # evaluated every 2 iterations: the pruner must use `step`
    n_completed = 3
    curves = [rng.uniform(0, 100) * np.linspace(0.2, 1, len(steps)) + rng.normal(0, 8, len(steps))
              for _ in range(n_completed + 1)]
    sched = make_scheduler("optuna-median", max_t=int(steps[-1]), grace_period=4,
                           n_startup_trials=n_completed)
    for k in range(n_completed):
        assert _run(sched, f"c{k}", steps, curves[k]) == steps[-1]  # startup trials never pruned
    last = _run(sched, "x", steps, curves[-1])
    expected = _reference_median_stop(curves[:n_completed], curves[-1], steps, warmup=4,
                                      max_t=steps[-1])
    assert last == (steps[-1] if expected is None else expected)
    ft = _state_of(sched.study, "x")
    assert ft.state == (TrialState.COMPLETE if expected is None else TrialState.PRUNED)
    # the curve up to the stop is kept (optuna-dashboard plots it)
    n_seen = list(steps).index(last) + 1
    assert ft.intermediate_values == pytest.approx(
        {int(s): float(v) for s, v in zip(steps[:n_seen], curves[-1][:n_seen])})


def test_no_pruning_before_startup_and_warmup_and_at_max_t():
    steps = range(1, 11)
    curve_a = [50.0] * 9 + [100.0]
    curve_c = [60.0] * 10  # only below the median at step 10 == max_t
    sched = make_scheduler("optuna-median", max_t=10, grace_period=3, n_startup_trials=1)
    # the first trial is a startup trial: never pruned however bad
    assert _run(sched, "a", steps, curve_a) == 10
    # a bad trial runs through warmup (steps 1, 2) and is stopped at step 3
    assert _run(sched, "b", steps, [1.0] * 10) == 3
    # a trial that is only bad at max_t has had its full budget: not pruned
    assert _run(sched, "c", steps, curve_c) == 10
    states = {t.user_attrs[TUNE_TRIAL_ID_ATTR]: t.state for t in sched.study.trials}
    assert states == {"a": TrialState.COMPLETE, "b": TrialState.PRUNED, "c": TrialState.COMPLETE}
    assert sched.n_pruned == 1
    assert _state_of(sched.study, "c").value == 60.0
    # control: without the max_t guard the same trial is pruned at its last step
    unguarded = OptunaPrunerScheduler(optuna.pruners.MedianPruner(1, n_warmup_steps=3))
    _run(unguarded, "a", steps, curve_a)
    assert _run(unguarded, "c", steps, curve_c) == 10
    assert _state_of(unguarded.study, "c").state == TrialState.PRUNED


def test_repeated_steps_and_final_duplicate_result_are_ignored_quietly():
    sched = make_scheduler("optuna-median", max_t=10, grace_period=0, n_startup_trials=1)
    _run(sched, "a", [1, 2, 3], [50.0, 50.0, 50.0])
    t = _trial("b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a step is reported twice
        assert sched.on_trial_result(None, t, {"step": 1, "miou": 60.0}) == CONTINUE
        assert sched.on_trial_result(None, t, {"step": 2, "miou": 60.0}) == CONTINUE
        # restart from a checkpoint at step 1: step 2 comes again, now with a bad value
        assert sched.on_trial_result(None, t, {"step": 2, "miou": 0.0}) == CONTINUE
        # the trial's last result comes again with done=True when it returns
        done = {"step": 2, "miou": 60.0, "done": True}
        assert sched.on_trial_result(None, t, done) == CONTINUE
        # a report without the metric (losses between evaluations)
        assert sched.on_trial_result(None, t, {"step": 3, "loss": 1.0}) == CONTINUE
    assert _state_of(sched.study, "b").intermediate_values == {1: 60.0, 2: 60.0}


def test_own_study_records_errors_and_removed_trials():
    sched = make_scheduler("optuna-median", max_t=10, grace_period=0)
    sched.on_trial_result(None, _trial("err"), {"step": 1, "miou": 5.0})
    sched.on_trial_error(None, _trial("err"))
    sched.on_trial_result(None, _trial("gone"), {"step": 1, "miou": 5.0})
    sched.on_trial_remove(None, _trial("gone"))
    sched.on_trial_remove(None, _trial("never_ran"))  # no Optuna trial is created for it
    sched.on_trial_result(None, _trial("nan"), {"step": 1, "miou": 5.0})
    sched.on_trial_complete(None, _trial("nan"), {"step": 10, "miou": float("nan")})
    sched.on_trial_result(None, _trial("nanloss"), {"step": 1, "miou": 5.0})
    sched.on_trial_complete(None, _trial("nanloss"), {"step": 4, "error": "non-finite loss"})
    states = {t.user_attrs[TUNE_TRIAL_ID_ATTR]: t.state for t in sched.study.trials}
    assert states == {"err": TrialState.FAIL, "gone": TrialState.PRUNED, "nan": TrialState.FAIL,
                      "nanloss": TrialState.FAIL}
    assert _state_of(sched.study, "gone").value == 5.0  # Optuna keeps the last intermediate
    errors = {k: _state_of(sched.study, k).user_attrs[ERROR_ATTR]
              for k in ("err", "nan", "nanloss")}
    assert errors == {"err": "the trial raised (Ray recorded no error text)",
                      "nan": "non-finite final miou (nan)", "nanloss": "non-finite loss"}


def test_missing_time_attr_names_the_key():
    sched = make_scheduler("optuna-median", max_t=10, grace_period=0)
    with pytest.raises(KeyError, match="'step'"):
        sched.on_trial_result(None, _trial("a"), {"miou": 1.0, "training_iteration": 1})


def test_min_mode_prunes_the_high_trial():
    sched = make_scheduler("optuna-median", metric="loss", mode="min", max_t=5, grace_period=1,
                           n_startup_trials=1)
    _run_loss = [{"step": s, "loss": 1.0} for s in range(1, 6)]
    for r in _run_loss:
        sched.on_trial_result(None, _trial("a"), r)
    sched.on_trial_complete(None, _trial("a"), _run_loss[-1])
    assert sched.on_trial_result(None, _trial("b"), {"step": 1, "loss": 0.5}) == CONTINUE
    assert sched.on_trial_result(None, _trial("b"), {"step": 2, "loss": 0.4}) == CONTINUE
    assert sched.on_trial_result(None, _trial("c"), {"step": 1, "loss": 9.0}) == STOP


@pytest.mark.parametrize("order", ["increasing", "decreasing"])
def test_successive_halving_prunes_at_rungs(order):
    # SHA with min_resource=1, reduction_factor=3: rungs at steps 1, 3, 9. A new trial is promoted
    # past a rung iff it is in the top third of all trials that reached it (at least the best).
    sched = make_scheduler("optuna-sha", max_t=9, grace_period=1, reduction_factor=3)
    qualities = np.linspace(0.2, 0.9, 6)
    if order == "decreasing":
        qualities = qualities[::-1]
    steps = range(1, 10)
    last = [_run(sched, f"t{k}", steps, [100 * q * s / 9 for s in steps])
            for k, q in enumerate(qualities)]
    if order == "increasing":
        assert last == [9] * 6  # every new trial is the best so far
    else:
        assert last == [9] + [1] * 5  # every later trial loses at the first rung
    n_pruned = sum(t.state == TrialState.PRUNED for t in sched.study.trials)
    assert n_pruned == sched.n_pruned == last.count(1)


def test_hyperband_through_ask_report_should_prune():
    # HyperbandPruner picks a bracket per trial (hash of study name and trial number) and runs
    # SuccessiveHalvingPruner in it; this checks that works on study.ask() trials.
    sched = make_scheduler("optuna-hyperband", max_t=27, grace_period=1, reduction_factor=3)
    pruner = sched.pruner
    steps = range(1, 28)
    last = {}
    for k, q in enumerate(np.linspace(0.9, 0.1, 12)):  # decreasing: later trials lose
        last[f"t{k}"] = _run(sched, f"t{k}", steps, [100 * q * s / 27 for s in steps])
    study = sched.study
    assert pruner._n_brackets == 4  # floor(log3(27 / 1)) + 1
    first_in_bracket, n_pruned = set(), 0
    for ft in study.trials:
        tid = ft.user_attrs[TUNE_TRIAL_ID_ATTR]
        bracket = pruner._get_bracket_id(study, ft)
        first_rung = 3**bracket
        if bracket in first_in_bracket and first_rung < 27:
            # worse than the bracket's first trial: stopped at the bracket's first rung
            assert ft.state == TrialState.PRUNED
            assert last[tid] == max(ft.intermediate_values) == first_rung
            n_pruned += 1
        else:  # the bracket's best, or a bracket whose first rung is max_t (never pruned)
            assert ft.state == TrialState.COMPLETE and last[tid] == 27
        first_in_bracket.add(bracket)
    assert sched.n_pruned == n_pruned >= 3


def _searcher(points, seed=0, pruner=None, max_t=None, step_offset=0, **kw):
    space = {"q": FloatDistribution(0.0, 1.0), "noise": FloatDistribution(0.0, 1.0)}
    return PruningAwareOptunaSearch(space=space, metric="miou", mode="max",
                                    points_to_evaluate=points, seed=seed, pruner=pruner,
                                    max_t=max_t, step_offset=step_offset, **kw)


def test_searcher_mode_records_pruned_and_complete_and_importance_works():
    points = [{"q": q, "noise": n} for q, n in
              [(0.9, 0.1), (0.7, 0.8), (0.5, 0.3), (0.05, 0.5), (0.8, 0.9), (0.1, 0.2)]]
    pruner = make_pruner("optuna-median", max_t=10, grace_period=2, n_startup_trials=2)
    searcher = _searcher(points, pruner=pruner, max_t=10)
    sched = make_scheduler("optuna-median", max_t=10, grace_period=2, searcher=searcher)
    assert sched.study is searcher._ot_study and sched.study.pruner is sched.pruner is pruner
    steps = range(1, 11)
    last = {}
    for k in range(len(points)):
        config = searcher.suggest(f"t{k}")
        last[f"t{k}"] = _run(sched, f"t{k}", steps, [100 * config["q"] * s / 10 for s in steps],
                             searcher=searcher)
    study = searcher._ot_study
    for tid, step in last.items():
        ft = _state_of(study, tid)
        if step < 10:
            assert ft.state == TrialState.PRUNED
            assert ft.value == pytest.approx(100 * ft.params["q"] * step / 10)
            assert sorted(ft.intermediate_values) == list(range(1, step + 1))
        else:
            assert ft.state == TrialState.COMPLETE
            assert ft.value == pytest.approx(100 * ft.params["q"])
    assert last["t3"] == 2 and last["t5"] == 2  # q = 0.05, 0.1: clearly bad
    assert last["t0"] == last["t1"] == last["t4"] == 10
    importances = optuna.importance.get_param_importances(study)
    assert set(importances) == {"q", "noise"}
    # the searcher was told the pruned trials finished: no second tell, no warning
    assert searcher._completed_trials == set(last)


def test_searcher_alone_reports_at_time_attr():
    # With ASHA or no scheduler the searcher reports the curve itself, keyed by `step`
    # (iterations), not by `training_iteration` (number of reports).
    searcher = _searcher([{"q": 0.5, "noise": 0.5}])
    searcher.suggest("a")
    for i in range(1, 4):
        searcher.on_trial_result("a", {"step": 10 * i, "miou": float(i), "training_iteration": i})
    searcher.on_trial_result("a", {"step": 30, "loss": 1.0, "training_iteration": 4})
    searcher.on_trial_complete("a", result={"step": 30, "miou": 3.0, "training_iteration": 4})
    ft = searcher._ot_study.trials[0]
    assert ft.intermediate_values == {10: 1.0, 20: 2.0, 30: 3.0}
    assert (ft.state, ft.value) == (TrialState.COMPLETE, 3.0)
    assert ft.user_attrs[TUNE_TRIAL_ID_ATTR] == "a"


def test_rays_optuna_search_tells_stopped_trials_complete():
    """Canary for the Ray behaviour this module works around: if it fails, Ray fixed it."""
    searcher = OptunaSearch(space={"q": FloatDistribution(0, 1)}, metric="miou", mode="max",
                            points_to_evaluate=[{"q": 0.5}])
    searcher.suggest("a")
    searcher.on_trial_result("a", {"miou": 3.0, "training_iteration": 1})
    searcher.on_trial_complete("a", result={"miou": 3.0, "training_iteration": 1})
    assert searcher._ot_study.trials[0].state == TrialState.COMPLETE


def test_scheduler_rejects_plain_optuna_search_and_mode_mismatch():
    plain = OptunaSearch(space={"q": FloatDistribution(0, 1)}, metric="miou", mode="max")
    with pytest.raises(TypeError, match="PruningAwareOptunaSearch"):
        OptunaPrunerScheduler(optuna.pruners.MedianPruner(), searcher=plain)
    searcher = PruningAwareOptunaSearch(space={"q": FloatDistribution(0, 1)}, metric="miou",
                                        mode="min", pruner=optuna.pruners.MedianPruner())
    sched = OptunaPrunerScheduler(mode="max", searcher=searcher)
    with pytest.raises(ValueError, match="direction"):
        _ = sched.study
    with pytest.raises(ValueError, match="mode"):
        OptunaPrunerScheduler(optuna.pruners.MedianPruner(), mode="maximize")


def test_set_search_properties_agrees_only_with_own_metric_and_mode():
    sched = make_scheduler("optuna-median", max_t=10, grace_period=1)
    assert sched.set_search_properties(None, None)
    assert sched.set_search_properties("miou", "max")
    assert not sched.set_search_properties("loss", "max")
    assert not sched.set_search_properties("miou", "min")


def test_pickle_keeps_the_shared_searcher():
    # Tuner pickles its TuneConfig (searcher and scheduler together) for Tuner.restore.
    searcher = _searcher([{"q": 0.5, "noise": 0.5}],
                         pruner=make_pruner("optuna-median", max_t=10, grace_period=1),
                         max_t=10)
    sched = make_scheduler("optuna-median", max_t=10, grace_period=1, searcher=searcher)
    searcher.suggest("a")
    sched.on_trial_result(None, _trial("a"), {"step": 1, "miou": 5.0})
    s2, sched2 = pickle.loads(pickle.dumps((searcher, sched)))
    assert sched2._searcher is s2
    assert sched2.on_trial_result(None, _trial("a"), {"step": 2, "miou": 6.0}) == CONTINUE
    assert s2._ot_study.trials[0].intermediate_values == {1: 5.0, 2: 6.0}
    own = pickle.loads(pickle.dumps(make_scheduler("optuna-hyperband", max_t=9, grace_period=1)))
    assert own.on_trial_result(None, _trial("a"), {"step": 1, "miou": 5.0}) == CONTINUE


def test_make_scheduler_types_and_options():
    kinds = {
        "optuna-median": optuna.pruners.MedianPruner,
        "optuna-percentile": optuna.pruners.PercentilePruner,
        "optuna-sha": optuna.pruners.SuccessiveHalvingPruner,
        "optuna-hyperband": optuna.pruners.HyperbandPruner,
        "optuna-curve": CurvePruner,
    }
    assert set(SCHEDULERS) == set(kinds) | {"asha", "none"}
    for name, pruner_cls in kinds.items():
        sched = make_scheduler(name, max_t=27, grace_period=3)
        assert isinstance(sched, OptunaPrunerScheduler)
        assert type(sched.pruner) is pruner_cls
        assert sched.metric == "miou" and sched.mode == "max"
        assert sched.supports_buffered_results is False
    asha = make_scheduler("asha", max_t=27, grace_period=3, reduction_factor=2)
    assert isinstance(asha, ASHAScheduler)
    assert (asha._time_attr, asha.metric, asha._max_t, asha._reduction_factor) == (
        "step", "miou", 27, 2)
    none = make_scheduler("none", max_t=27, grace_period=3)
    assert isinstance(none, FIFOScheduler) and not isinstance(none, OptunaPrunerScheduler)
    assert none.on_trial_result(None, _trial("a"), {"step": 1, "miou": 0.0}) == CONTINUE
    pct = make_scheduler("optuna-percentile", max_t=27, grace_period=3, percentile=10.0,
                         n_startup_trials=1)
    assert pct.pruner._percentile == 10.0 and pct.pruner._n_startup_trials == 1
    assert pct.pruner._n_warmup_steps == 3
    hb = make_scheduler("optuna-hyperband", max_t=27, grace_period=3)
    assert (hb.pruner._min_resource, hb.pruner._max_resource) == (3, 27)


def test_make_scheduler_rejects_bad_input():
    with pytest.raises(ValueError, match="optuna-median, optuna-percentile"):
        make_scheduler("median", max_t=10, grace_period=1)
    with pytest.raises(ValueError, match="grace_period"):
        make_scheduler("asha", max_t=10, grace_period=11)
    with pytest.raises(TypeError):
        make_scheduler("optuna-median", max_t=10, grace_period=1, no_such_option=3)


# --- Optuna's record in every path ------------------------------------------------------------


class _HashableTrial:
    """ASHA keys its brackets by trial object: SimpleNamespace is not hashable."""

    def __init__(self, trial_id: str, error_file: str | None = None) -> None:
        self.trial_id = trial_id
        self.error_file = error_file


def _drive(sched, searcher, trial, steps, values):
    """Tune's order for one trial: scheduler decision, searcher result unless STOP, then
    scheduler and searcher completion with the last result. Returns the last step run."""
    sched.on_trial_add(None, trial)
    result = {}
    for step, value in zip(steps, values):
        result = {"step": int(step), "miou": float(value)}
        if sched.on_trial_result(None, trial, result) == STOP:
            break
        searcher.on_trial_result(trial.trial_id, result)
    sched.on_trial_complete(None, trial, result)
    searcher.on_trial_complete(trial.trial_id, result=result)
    return result["step"]


def test_asha_stopped_trials_are_pruned_and_rungs_count_from_the_warmup():
    # warm-up 4, ASHA grace 2, rf 2, budget 12: rungs at 4 + 2 = 6 and 4 + 4 = 8.
    searcher = _searcher([{"q": q, "noise": 0.5} for q in (0.9, 0.2, 0.95, 0.1)], max_t=12,
                         step_offset=4)
    sched = make_scheduler("asha", max_t=12, grace_period=2, step_offset=4, searcher=searcher,
                           reduction_factor=2)
    steps = range(1, 13)
    last = {}
    for k in range(4):
        t = _HashableTrial(f"t{k}")
        q = searcher.suggest(t.trial_id)["q"]
        # inside the warm-up every trial is the same (and worst): never a reason to stop
        last[t.trial_id] = _drive(sched, searcher, t, steps,
                                  [1.0 if s <= 4 else 100 * q * s / 12 for s in steps])
    assert last == {"t0": 12, "t1": 6, "t2": 12, "t3": 6}  # losers stop at the first rung
    study = searcher._ot_study
    states = {k: _state_of(study, k).state for k in last}
    assert states == {"t0": TrialState.COMPLETE, "t1": TrialState.PRUNED,
                      "t2": TrialState.COMPLETE, "t3": TrialState.PRUNED}
    # Optuna steps count from the warm-up's end; the stop step's value reached Optuna too
    assert sorted(_state_of(study, "t1").intermediate_values) == [0, 1, 2]
    assert _state_of(study, "t1").value == pytest.approx(100 * 0.2 * 6 / 12)
    assert _state_of(study, "t0").value == pytest.approx(90.0)
    assert study.user_attrs[STEP_OFFSET_ATTR] == 4


def test_errors_and_non_finite_trials_are_fail_with_their_reason(tmp_path):
    pruner = make_pruner("optuna-median", max_t=10, grace_period=2)
    searcher = _searcher([{"q": 0.5, "noise": 0.5}] * 4, pruner=pruner, max_t=10)
    sched = make_scheduler("optuna-median", max_t=10, grace_period=2, searcher=searcher)
    for tid in ("nanloss", "config", "crash", "nanmetric"):
        searcher.suggest(tid)
        searcher.on_trial_result(tid, {"step": 2, "miou": 10.0})
    # the trainable's own diagnosis of a deterministic failure: it reports `error` and returns
    searcher.on_trial_complete("nanloss", result={"step": 4, "error": "non-finite loss at 4"})
    searcher.on_trial_complete("config", result={"step": 0, "error": "ConfigError: bad key"})
    # a crash Ray gave up on: the scheduler hears of it first, with the error file
    err = tmp_path / "error.txt"
    err.write_text("Failure # 1\nTraceback ...\nRuntimeError: node lost\n")
    sched.on_trial_error(None, _HashableTrial("crash", str(err)))
    searcher.on_trial_complete("crash", error=True)
    searcher.on_trial_complete("nanmetric", result={"step": 10, "miou": float("nan")})
    study = searcher._ot_study
    got = {k: (_state_of(study, k).state, _state_of(study, k).user_attrs.get(ERROR_ATTR))
           for k in ("nanloss", "config", "crash", "nanmetric")}
    assert got == {"nanloss": (TrialState.FAIL, "non-finite loss at 4"),
                   "config": (TrialState.FAIL, "ConfigError: bad key"),
                   "crash": (TrialState.FAIL, "RuntimeError: node lost"),
                   "nanmetric": (TrialState.FAIL, "non-finite final miou (nan)")}
    # a second completion (Tune repeats it on some paths) never re-tells
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        searcher.on_trial_complete("config", result={"step": 10, "miou": 50.0})
    assert _state_of(study, "config").state == TrialState.FAIL


def test_restore_older_than_storage_never_retells_and_fails_orphans(tmp_path):
    """A driver killed after a prune/finish/failure and before Tune saved the searcher: the
    restored book is older than the sqlite storage. Nothing raises, nothing is told twice, a
    pruned trial replays to its prune step and stops, an orphan Optuna trial is FAIL."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    pruner = make_pruner("optuna-median", max_t=10, grace_period=3, n_startup_trials=1)
    searcher = _searcher([{"q": q, "noise": 0.5} for q in (0.9, 0.1, 0.8, 0.7, 0.6)],
                         pruner=pruner, max_t=10, storage=storage, study_name="s")
    sched = make_scheduler("optuna-median", max_t=10, grace_period=3, searcher=searcher)
    steps = range(1, 11)
    searcher.suggest("good")
    _run(sched, "good", steps, [9.0] * 10, searcher=searcher)
    for tid in ("bad", "done", "fail"):
        searcher.suggest(tid)
        first = {"step": 1, "miou": 1.0 if tid == "bad" else 9.5}
        assert sched.on_trial_result(None, _trial(tid), first) == CONTINUE
        searcher.on_trial_result(tid, first)
    restore = tune_snapshot(searcher, sched, tmp_path / "searcher.pkl")
    # after the snapshot: "bad" is pruned at step 3, "done" completes, "fail" fails, and an
    # Optuna trial is asked for a Tune trial that the snapshot will not hold
    for step in (2, 3):
        decision = sched.on_trial_result(None, _trial("bad"), {"step": step, "miou": 1.0})
    assert decision == STOP
    for step in range(2, 11):
        sched.on_trial_result(None, _trial("done"), {"step": step, "miou": 9.5})
        searcher.on_trial_result("done", {"step": step, "miou": 9.5})
    searcher.on_trial_complete("done", result={"step": 10, "miou": 9.5})
    searcher.on_trial_complete("fail", result={"step": 2, "error": "non-finite loss"})
    searcher.suggest("orphan")
    before = {t.number: (t.state, t.value, dict(t.intermediate_values))
              for t in searcher._ot_study.trials if t.state.is_finished()}

    s2, sched2 = restore()
    study = s2._ot_study
    orphan = next(t for t in study.trials if t.number == max(before) + 1)
    assert orphan.state == TrialState.FAIL and orphan.user_attrs[ERROR_ATTR] == ORPHAN_ERROR
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # also no "step already reported" warning
        # Tune restarts the unfinished trials from their step-1 checkpoints
        assert sched2.on_trial_result(None, _trial("bad"), {"step": 2, "miou": 1.0}) == CONTINUE
        assert sched2.on_trial_result(None, _trial("bad"), {"step": 3, "miou": 1.0}) == STOP
        s2.on_trial_complete("bad", result={"step": 3, "miou": 1.0})
        for step in range(2, 11):
            assert sched2.on_trial_result(None, _trial("done"),
                                          {"step": step, "miou": 9.5}) == CONTINUE
            s2.on_trial_result("done", {"step": step, "miou": 9.5})
        s2.on_trial_complete("done", result={"step": 10, "miou": 9.5})
        sched2.on_trial_result(None, _trial("fail"), {"step": 2, "miou": 3.0})
        s2.on_trial_complete("fail", result={"step": 2, "error": "non-finite loss"})
    after = {t.number: (t.state, t.value, dict(t.intermediate_values))
             for t in study.trials if t.number in before}
    assert after == before
    states = {t.user_attrs.get(TUNE_TRIAL_ID_ATTR): t.state for t in study.trials}
    assert states == {"good": TrialState.COMPLETE, "bad": TrialState.PRUNED,
                      "done": TrialState.COMPLETE, "fail": TrialState.FAIL,
                      "orphan": TrialState.FAIL}
    # the restored study goes on: a new trial is asked and told normally
    s2.suggest("next")
    _run(sched2, "next", steps, [9.9] * 10, searcher=s2)
    assert _state_of(study, "next").state == TrialState.COMPLETE


def test_pruner_is_the_studys_from_creation():
    pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9)
    searcher = _searcher([{"q": 0.5, "noise": 0.5}], pruner=pruner, max_t=9)
    assert searcher._ot_study.pruner is pruner  # before any trial was asked
    # a study created later (Tune sets the space) gets it at creation too
    late = PruningAwareOptunaSearch(metric="miou", mode="max", pruner=pruner, max_t=9)
    assert late._ot_study is None and late.pruner is pruner
    late.set_search_properties("miou", "max", {"q": tune.uniform(0, 1)})
    assert late._ot_study.pruner is pruner
    sched = make_scheduler("optuna-hyperband", max_t=9, grace_period=1, searcher=searcher)
    assert sched.pruner is pruner and sched.study.pruner is pruner
    no_pruner = _searcher([{"q": 0.5, "noise": 0.5}], max_t=9)
    with pytest.raises(TypeError, match="pruner="):
        make_scheduler("optuna-median", max_t=9, grace_period=1, searcher=no_pruner)
    with pytest.raises(ValueError, match="MedianPruner"):
        make_scheduler("optuna-median", max_t=9, grace_period=1, searcher=searcher)
    with pytest.raises(TypeError, match="make_pruner"):
        make_scheduler("optuna-hyperband", max_t=9, grace_period=1, searcher=searcher,
                       reduction_factor=2)
    with pytest.raises(ValueError, match="pruning clock"):
        make_scheduler("optuna-hyperband", max_t=9, grace_period=1, step_offset=2,
                       searcher=searcher)


def test_median_grace_counts_from_the_warmup():
    # warm-up 4, grace 2: the first decision falls at step 6, never inside the warm-up
    sched = make_scheduler("optuna-median", max_t=12, grace_period=2, step_offset=4,
                           n_startup_trials=1)
    steps = range(2, 13, 2)
    _run(sched, "good", steps, [1.0, 1.0, 50.0, 60.0, 70.0, 80.0])
    assert _run(sched, "bad", steps, [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]) == 6
    assert _state_of(sched.study, "bad").intermediate_values == {0: 0.0, 2: 1.0}
    assert _state_of(sched.study, "good").state == TrialState.COMPLETE
    assert (sched.pruner._n_warmup_steps, sched.study.user_attrs[STEP_OFFSET_ATTR]) == (2, 4)


def test_sha_and_hyperband_rungs_count_from_the_warmup():
    # warm-up 10, min_resource 1, rf 3, budget 19: Optuna rungs at steps 1, 3, 9 after the
    # warm-up = iterations 11, 13, 19; a worse later trial stops at 11
    sha = make_scheduler("optuna-sha", max_t=19, grace_period=1, step_offset=10)
    steps = range(1, 20)
    assert _run(sha, "a", steps, [float(s) for s in steps]) == 19
    assert _run(sha, "b", steps, [s / 2 for s in steps]) == 11
    hb = make_scheduler("optuna-hyperband", max_t=37, grace_period=1, step_offset=10)
    assert (hb.pruner._min_resource, hb.pruner._max_resource) == (1, 27)


# --- with Ray: Tuner, function trainables -----------------------------------------------------

N_STEPS = 8


def _make_trainable(n_steps):
    # Built inside a function so cloudpickle ships it by value: Ray workers cannot import this
    # test module by name (tests/ is not a package on their sys.path).
    def trainable(config):
        for i in range(1, n_steps + 1):
            tune.report({"step": i, "miou": 100.0 * config["q"] * i / n_steps})

    return trainable


def _fit(tmp_path, scheduler, searcher=None, param_space=None, num_samples=1):
    tuner = tune.Tuner(
        tune.with_resources(_make_trainable(N_STEPS), {"cpu": 1}),
        param_space=param_space or {},
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
            max_concurrent_trials=1,  # the pruner compares with trials completed before
            reuse_actors=True, metric="miou", mode="max",
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="sched", verbose=0),
    )
    grid = tuner.fit()
    assert not grid.errors
    return {r.metrics["trial_id"]: (r.config["q"], r.metrics["step"]) for r in grid}


def test_tuner_with_searcher_prunes_bad_trial(ray_local, tmp_path):
    searcher = PruningAwareOptunaSearch(
        space={"q": FloatDistribution(0.0, 1.0)}, metric="miou", mode="max", seed=0,
        points_to_evaluate=[{"q": 0.9}, {"q": 0.8}, {"q": 0.1}, {"q": 0.95}], max_t=N_STEPS,
        pruner=make_pruner("optuna-median", max_t=N_STEPS, grace_period=2, n_startup_trials=2))
    sched = make_scheduler("optuna-median", max_t=N_STEPS, grace_period=2, searcher=searcher)
    runs = _fit(tmp_path, sched, searcher=searcher, num_samples=4)
    assert sorted(runs.values()) == [(0.1, 2), (0.8, N_STEPS), (0.9, N_STEPS), (0.95, N_STEPS)]
    study = searcher._ot_study
    for trial_id, (q, _) in runs.items():
        ft = _state_of(study, trial_id)
        if q == 0.1:
            assert ft.state == TrialState.PRUNED
            assert ft.intermediate_values == {1: 1.25, 2: 2.5}
        else:
            assert ft.state == TrialState.COMPLETE
            assert ft.value == pytest.approx(100 * q)
            assert sorted(ft.intermediate_values) == list(range(1, N_STEPS + 1))


def test_tuner_grid_without_searcher_prunes_bad_trial(ray_local, tmp_path):
    sched = make_scheduler("optuna-median", max_t=N_STEPS, grace_period=3, n_startup_trials=2)
    runs = _fit(tmp_path, sched, param_space={"q": tune.grid_search([0.9, 0.8, 0.1, 0.95])})
    assert sorted(runs.values()) == [(0.1, 3), (0.8, N_STEPS), (0.9, N_STEPS), (0.95, N_STEPS)]
    states = {t.user_attrs[TUNE_TRIAL_ID_ATTR]: t.state for t in sched.study.trials}
    assert states == {tid: (TrialState.PRUNED if q == 0.1 else TrialState.COMPLETE)
                      for tid, (q, _) in runs.items()}


def test_tuner_asha_with_searcher_records_stopped_trials_pruned(ray_local, tmp_path):
    # ASHA, grace 2, rf 2 on 8 steps: rungs at 2 and 4; the 0.1 trial loses at its first rung
    searcher = PruningAwareOptunaSearch(
        space={"q": FloatDistribution(0.0, 1.0)}, metric="miou", mode="max", seed=0,
        points_to_evaluate=[{"q": 0.9}, {"q": 0.1}, {"q": 0.95}], max_t=N_STEPS)
    sched = make_scheduler("asha", max_t=N_STEPS, grace_period=2, searcher=searcher,
                           reduction_factor=2)
    tuner = tune.Tuner(
        tune.with_resources(_make_trainable(N_STEPS), {"cpu": 1}),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=sched, num_samples=3,
                                    max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0))
    grid = tuner.fit()
    assert not grid.errors
    runs = {r.metrics["trial_id"]: (r.config["q"], r.metrics["step"]) for r in grid}
    assert sorted(runs.values()) == [(0.1, 2), (0.9, N_STEPS), (0.95, N_STEPS)]
    for trial_id, (q, _) in runs.items():
        ft = _state_of(searcher._ot_study, trial_id)
        assert ft.state == (TrialState.PRUNED if q == 0.1 else TrialState.COMPLETE), q
