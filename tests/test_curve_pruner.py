"""Tests for ctt/tune/curve_pruner.py: the forecast against a slow textbook fit, the pruning
rule on real Optuna studies, its edge cases, and its registration as ``optuna-curve``."""

import math
import pickle
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from ray.tune.schedulers import TrialScheduler

from ctt.tune.curve_pruner import CurvePruner, forecast
from ctt.tune.schedulers import OptunaPrunerScheduler, make_pruner, make_scheduler

optuna.logging.set_verbosity(optuna.logging.WARNING)


def reference_forecast(steps, values, at, tau, z, noise=0.0):
    """Simple linear regression of y on x = log(1 + step/tau), written out term by term, and the
    textbook standard error of a new observation at x0 (sigma floored at ``noise``)."""
    xs = [math.log(1.0 + s / tau) for s in steps]
    n = len(xs)
    xbar = sum(xs) / n
    ybar = sum(values) / n
    sxx = sum((x - xbar) ** 2 for x in xs)
    sxy = sum((x - xbar) * (y - ybar) for x, y in zip(xs, values))
    b = sxy / sxx
    a = ybar - b * xbar
    x0 = math.log(1.0 + at / tau)
    mean = a + b * x0
    sigma = noise
    if n > 2:
        rss = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, values))
        sigma = max(noise, math.sqrt(rss / (n - 2)))
    se = sigma * math.sqrt(1.0 + 1.0 / n + (x0 - xbar) ** 2 / sxx)
    return mean, mean + z * se


@pytest.mark.parametrize("case", range(12))
def test_forecast_matches_reference(case):
    rng = np.random.default_rng(case)
    n = int(rng.integers(2, 10))
    steps = np.sort(rng.choice(np.arange(0, 1800, 100), size=n, replace=False))
    values = 30 + 2 * np.log1p(steps / 180) + rng.normal(0, 1.0, n)
    tau, z = float(rng.uniform(20, 400)), float(rng.uniform(0, 3))
    noise = float(rng.choice([0.0, 0.3, 2.0]))  # 2.0: above the scatter, the floor decides
    got = forecast(steps, values, 1800, tau=tau, z=z, noise=noise)
    want = reference_forecast(steps.tolist(), values.tolist(), 1800, tau, z, noise)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_forecast_recovers_an_exact_log_curve():
    steps = [0, 200, 400, 600]
    values = [10 + 3 * math.log1p(s / 90) for s in steps]
    mean, optimistic = forecast(steps, values, 1800, tau=90, z=2.0)
    assert mean == pytest.approx(10 + 3 * math.log1p(1800 / 90))
    assert optimistic == pytest.approx(mean)  # no scatter, no widening
    _, floored = forecast(steps, values, 1800, tau=90, z=2.0, noise=0.5)
    assert floored > mean + 2 * 0.5  # the floor, widened by the extrapolation


def test_forecast_rejects_too_few_points():
    with pytest.raises(ValueError, match=">= 2"):
        forecast([0], [1.0], 10, tau=1.0)


def _study(pruner, direction="maximize"):
    return optuna.create_study(direction=direction, pruner=pruner,
                               sampler=optuna.samplers.RandomSampler(seed=0))


def _trial(study, steps, values, state=None, value=None):
    trial = study.ask()
    for s, v in zip(steps, values):
        trial.report(float(v), int(s))
    if state is not None:
        study.tell(trial, value, state=state)
    return trial


COMPLETE = optuna.trial.TrialState.COMPLETE
PRUNED = optuna.trial.TrialState.PRUNED


@pytest.mark.parametrize("case", range(10))
def test_decision_is_the_reference_rule(case):
    """should_prune == (reference optimistic forecast < best COMPLETE final - margin)."""
    rng = np.random.default_rng(100 + case)
    margin, z = float(rng.uniform(0, 3)), float(rng.uniform(0, 2))
    noise = 0.0 if case % 2 else 0.5
    pruner = CurvePruner(1800, margin=margin, z=z, tau=180, n_warmup_steps=200, noise=noise,
                         n_min_points=3 if case % 2 else 2)
    study = _study(pruner)
    finals = rng.uniform(30, 36, 3)
    for f in finals:
        _trial(study, [0, 200], [28, 29], state=COMPLETE, value=float(f))
    n = int(rng.integers(2 if noise else 3, 8))
    steps = [200 * i for i in range(n)]
    values = (rng.uniform(25, 33) + rng.uniform(0, 1.5) * np.log1p(np.array(steps) / 180)
              + rng.normal(0, 0.7, n))
    trial = _trial(study, steps, values)
    _, optimistic = reference_forecast(steps, values.tolist(), 1800, 180, z, noise)
    assert trial.should_prune() == (optimistic < max(finals) - margin)


@pytest.mark.parametrize("case", range(8))
def test_top_k_compares_with_the_kth_best_value(case):
    """should_prune == (optimistic forecast < the top_k-th largest COMPLETE final - margin),
    and never with fewer than top_k finals behind the reference."""
    rng = np.random.default_rng(200 + case)
    top_k, margin = int(rng.integers(1, 5)), float(rng.uniform(0, 2))
    pruner = CurvePruner(1800, margin=margin, tau=180, noise=0.5, top_k=top_k)
    study = _study(pruner)
    finals = rng.uniform(30, 36, int(rng.integers(1, 6)))
    for f in finals:
        _trial(study, [0, 200], [28, 29], state=COMPLETE, value=float(f))
    steps = [0, 200, 400, 600]
    values = rng.uniform(27, 35) + rng.normal(0, 0.7, 4)
    trial = _trial(study, steps, values)
    _, optimistic = reference_forecast(steps, values.tolist(), 1800, 180, 1.0, 0.5)
    ordered = sorted(finals, reverse=True)
    expected = len(finals) >= top_k and optimistic < ordered[top_k - 1] - margin
    assert trial.should_prune() == expected


def test_top_k_lets_k_trials_behind_one_strong_trial_finish():
    """The 16-trial sweep's failure: one strong early trial, every later one a little worse.
    With top_k=1 each later one is pruned; with top_k=3 the next two finish, the rest not."""
    for top_k, expect in ((1, [True, True, True]), (3, [False, False, True])):
        study = _study(CurvePruner(1800, margin=0.0, tau=30, noise=0.5, top_k=top_k))
        _trial(study, [0, 1800], [30, 36], state=COMPLETE, value=36.0)
        decisions = []
        for level in (33.0, 32.0, 31.0):
            t = _trial(study, [0, 200, 400], [level - 1.0, level - 0.5, level - 0.4])
            pruned = t.should_prune()
            decisions.append(pruned)
            state = PRUNED if pruned else COMPLETE
            study.tell(t, None if pruned else level, state=state)
        assert decisions == expect, (top_k, decisions)


def test_prunes_a_clearly_worse_curve_and_keeps_a_good_one():
    study = _study(CurvePruner(1800, margin=1.0))
    _trial(study, [0, 900, 1800], [30, 34, 36], state=COMPLETE, value=36.0)
    bad = _trial(study, [0, 200, 400], [20.0, 20.5, 20.8])
    good = _trial(study, [0, 200, 400], [30.0, 33.5, 35.0])
    assert bad.should_prune()
    assert not good.should_prune()


def test_no_completed_trial_never_prunes():
    study = _study(CurvePruner(1800, margin=0.0))
    _trial(study, [0, 200, 400], [40, 41, 42], state=PRUNED)  # pruned: not a final value
    awful = _trial(study, [0, 200, 400, 600], [1.0, 1.0, 1.0, 1.0])
    assert not awful.should_prune()


def test_step_reference_uses_other_trials_values_at_or_before_the_step():
    pruner = CurvePruner(1800, margin=1.0, reference="step")
    study = _study(pruner)
    # another running trial: 40 at step 400, 60 at step 800 (after ours: not seen)
    _trial(study, [0, 400, 800], [35, 40, 60])
    ours = _trial(study, [0, 200, 400], [30.0, 30.0, 30.0])
    assert ours.should_prune()  # flat 30 < 40 - 1
    study2 = _study(CurvePruner(1800, margin=1.0, reference="step"))
    _trial(study2, [0, 400, 800], [35, 31, 60])
    ours2 = _trial(study2, [0, 200, 400], [30.0, 30.0, 30.0])
    assert not ours2.should_prune()  # 30 is not below 31 - 1: the 60 at 800 is the future
    alone = _study(CurvePruner(1800, reference="step"))
    assert not _trial(alone, [0, 200, 400], [1.0, 1.0, 1.0]).should_prune()


def test_flat_curves_compare_their_level():
    study = _study(CurvePruner(1800, margin=1.0))
    _trial(study, [0, 1800], [30, 35], state=COMPLETE, value=35.0)
    assert not _trial(study, [0, 200, 400], [34.5] * 3).should_prune()  # 34.5 >= 34
    assert not _trial(study, [0, 200, 400], [34.0] * 3).should_prune()  # equal: not below
    assert _trial(study, [0, 200, 400], [33.9] * 3).should_prune()


def test_nan_values_are_ignored_and_min_points_counts_finite_ones():
    study = _study(CurvePruner(1800, margin=0.0))
    _trial(study, [0, 1800], [30, 35], state=COMPLETE, value=35.0)
    assert not _trial(study, [0, 200, 400], [10.0, math.nan, 10.0]).should_prune()
    assert _trial(study, [0, 200, 400, 600], [10.0, math.nan, 10.0, 10.0]).should_prune()
    # a NaN final of a COMPLETE trial is no reference (Optuna itself refuses to store one)
    pruner = CurvePruner(1800)
    frozen = SimpleNamespace(number=0, state=COMPLETE, value=math.nan, intermediate_values={})
    stub = SimpleNamespace(get_trials=lambda **kw: [frozen])
    assert pruner._reference(stub, SimpleNamespace(number=1), 400, 1.0) is None


def test_no_decision_before_min_points_grace_or_at_the_end():
    study = _study(CurvePruner(1800, margin=0.0, n_warmup_steps=400, n_min_points=4))
    _trial(study, [0, 1800], [30, 35], state=COMPLETE, value=35.0)
    assert not _trial(study, [0, 100, 200, 300], [1.0] * 4).should_prune()  # before grace
    assert not _trial(study, [0, 200, 400], [1.0] * 3).should_prune()  # 3 < 4 points
    assert _trial(study, [0, 200, 400, 600], [1.0] * 4).should_prune()
    assert not _trial(study, [0, 200, 400, 1800], [1.0] * 4).should_prune()  # at the end
    two = _study(CurvePruner(1800, margin=0.0, n_min_points=2, noise=0.5))
    _trial(two, [0, 1800], [30, 35], state=COMPLETE, value=35.0)
    assert not _trial(two, [0], [1.0]).should_prune()  # one point is no curve
    assert _trial(two, [0, 200], [1.0, 1.0]).should_prune()


def test_startup_trials_and_minimize():
    study = _study(CurvePruner(1800, margin=0.0, n_startup_trials=2))
    _trial(study, [0, 1800], [30, 35], state=COMPLETE, value=35.0)
    assert not _trial(study, [0, 200, 400], [1.0] * 3).should_prune()  # one complete of 2
    low = _study(CurvePruner(1800, margin=1.0), direction="minimize")
    _trial(low, [0, 1800], [0.5, 0.2], state=COMPLETE, value=0.2)
    assert _trial(low, [0, 200, 400], [3.0, 3.0, 3.0]).should_prune()  # loss 3 > 0.2 + 1
    assert not _trial(low, [0, 200, 400], [1.1, 1.0, 0.9]).should_prune()


@pytest.mark.parametrize("kwargs", [
    {"max_resource": 0}, {"max_resource": 10, "n_min_points": 2},
    {"max_resource": 10, "n_startup_trials": 0}, {"max_resource": 10, "z": -1.0},
    {"max_resource": 10, "margin": math.nan}, {"max_resource": 10, "tau": 0.0},
    {"max_resource": 10, "reference": "median"}, {"max_resource": 10, "noise": -0.1},
    {"max_resource": 10, "noise": math.inf}, {"max_resource": 10, "top_k": 0},
    {"max_resource": 10, "top_k": 1.5}, {"max_resource": 10, "top_k": True},
])
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        CurvePruner(**kwargs)


def test_registered_as_optuna_curve_on_the_pruning_clock():
    pruner = make_pruner("optuna-curve", max_t=2000, grace_period=200, step_offset=200,
                         margin=2.0, reference="step")
    assert isinstance(pruner, CurvePruner)
    assert (pruner.max_resource, pruner.n_warmup_steps, pruner.margin, pruner.reference) == (
        1800, 200, 2.0, "step")
    sched = make_scheduler("optuna-curve", max_t=2000, grace_period=200, step_offset=200,
                           margin=1.0)
    assert isinstance(sched, OptunaPrunerScheduler) and isinstance(sched.pruner, CurvePruner)
    sched = pickle.loads(pickle.dumps(sched))  # Tune pickles the scheduler
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    last = {}
    for i, step in enumerate(range(200, 2001, 200)):
        last = {"step": step, "miou": 30.0 + i, "training_iteration": i + 1}
        assert sched.on_trial_result(None, good, last) == TrialScheduler.CONTINUE
    sched.on_trial_complete(None, good, {**last, "done": True})
    decisions = [sched.on_trial_result(None, bad, {"step": s, "miou": 20.0})
                 for s in (200, 400, 600)]
    # Optuna steps 0, 200, 400: the third point (past the 200 grace) allows a fit -> stop
    assert decisions == [TrialScheduler.CONTINUE] * 2 + [TrialScheduler.STOP]
    assert sched.n_pruned == 1


def test_the_sweeps_default_is_the_replayed_curve_setting():
    """What ``voc_sweep.py`` prunes with when no flag says otherwise: the curve pruner with the
    setting the replay chose (docs/benchmarks.md#pruning-replayed); explicit options still win."""
    from ctt.tune.cli import Sweep
    from ctt.tune.schedulers import CURVE_DEFAULTS, DEFAULT_SCHEDULER

    assert DEFAULT_SCHEDULER == "optuna-curve" and Sweep("s", "s.py", "", dict).scheduler == \
        DEFAULT_SCHEDULER
    assert CURVE_DEFAULTS == {"margin": 0.0, "reference": "step", "n_min_points": 3,
                              "noise": 0.5}
    pruner = make_pruner(DEFAULT_SCHEDULER, max_t=2000, grace_period=200, step_offset=200)
    assert (pruner.margin, pruner.reference, pruner.n_min_points, pruner.noise,
            pruner.n_warmup_steps, pruner.max_resource) == (0.0, "step", 3, 0.5, 200, 1800)
    assert make_pruner(DEFAULT_SCHEDULER, max_t=2000, grace_period=200, margin=2.0,
                       noise=1.0).margin == 2.0


def test_study_json_records_the_sweeps_pruner():
    from ctt.tune.sweep import pruner_record

    clock = {"max_t": 2000, "grace_period": 200, "step_offset": 200}
    record = pruner_record(make_pruner("optuna-curve", **clock))
    assert record["class"] == "CurvePruner" and record["top_k"] == 1
    assert (record["margin"], record["reference"], record["max_resource"]) == (0.0, "step", 1800)
    assert pruner_record(make_pruner("optuna-median", **clock))["n_warmup_steps"] == 200
    assert pruner_record(make_pruner("asha", **clock)) is None
