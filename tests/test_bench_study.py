"""Tests of benchmarks/bench_study.py without Ray: config sampling, the pruning summary against
hand-computed numbers, argument checks. (Both benchmarks end to end at toy size:
tests/scenarios/test_bench_study_runs.py.)"""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark

from ctt.config import get_preset

bench = load_benchmark("bench_study")


# --- pure parts (no Ray) --------------------------------------------------------------------

def test_sample_configs_is_seeded_in_range_and_valid():
    a, b = bench.sample_configs(12, seed=0), bench.sample_configs(12, seed=0)
    assert a == b
    assert a != bench.sample_configs(12, seed=1)
    assert bench.sample_configs(3, seed=0) == a[:3]  # a prefix of the same stream
    base = get_preset("tiny")
    for p in a:
        assert tuple(p) == bench.SAMPLED_KEYS
        assert 1e-4 <= p["optim.lr"] <= 2e-2
        assert 0.9 <= p["method.ema_decay"] <= 0.999
        assert 0.0 <= p["method.lambda_u"] <= 3.0
        assert 0.5 <= p["method.tau_p"] <= 0.99
        assert base.override(p).to_flat()["optim.lr"] == p["optim.lr"]  # valid config keys
    # wide enough to contain clearly different learning rates (bad ones included)
    lrs = sorted(p["optim.lr"] for p in a)
    assert lrs[-1] / lrs[0] > 10
    with pytest.raises(ValueError, match="n must be >= 1"):
        bench.sample_configs(0)


def test_order_repeat_zero_is_identity_and_later_repeats_permute():
    assert bench.trial_order(12, 0) == list(range(12))
    r1 = bench.trial_order(12, 1)
    assert sorted(r1) == list(range(12)) and r1 != list(range(12))
    assert bench.trial_order(12, 1) == r1
    assert bench.trial_order(12, 2) != r1


def _trial(index, step, compute_s, miou_best, iters=100):
    return {"index": index, "step": step, "compute_s": compute_s, "miou_best": miou_best,
            "stopped_early": step < iters}


def _reference_summary(runs):
    """Slow, explicit recomputation of the summary's numbers."""
    out = {}
    for run in runs:
        ref = next(r for r in runs if r["scheduler"] == "none" and r["repeat"] == run["repeat"])
        it = sum(t["step"] for t in run["trials"]) / sum(t["step"] for t in ref["trials"])
        cs = (sum(t["compute_s"] for t in run["trials"])
              / sum(t["compute_s"] for t in ref["trials"]))
        best = max(t["miou_best"] for t in run["trials"] if t["miou_best"] is not None)
        best_ref = max(t["miou_best"] for t in ref["trials"])
        out.setdefault(run["scheduler"], []).append((it, cs, best, best_ref - best))
    return out


def test_summarise_pruning_matches_hand_computation():
    runs = [
        {"repeat": 0, "scheduler": "none", "trials": [
            _trial(0, 100, 10.0, 50.0), _trial(1, 100, 12.0, 60.0), _trial(2, 100, 8.0, 20.0)]},
        {"repeat": 0, "scheduler": "asha", "trials": [
            _trial(0, 10, 1.0, 30.0), _trial(1, 80, 7.0, 59.5), _trial(2, 10, 1.5, None)]},
        {"repeat": 0, "scheduler": "optuna-median", "trials": [
            _trial(0, 100, 10.0, 50.0), _trial(1, 100, 12.0, 60.0), _trial(2, 10, 1.0, 5.0)]},
        {"repeat": 1, "scheduler": "none", "trials": [
            _trial(0, 100, 9.0, 40.0), _trial(1, 100, 11.0, 58.0), _trial(2, 100, 10.0, 30.0)]},
        {"repeat": 1, "scheduler": "asha", "trials": [
            _trial(0, 10, 1.0, 20.0), _trial(1, 10, 1.0, 55.0), _trial(2, 10, 1.0, 10.0)]},
        {"repeat": 1, "scheduler": "optuna-median", "trials": [
            _trial(0, 100, 9.0, 40.0), _trial(1, 100, 11.0, 58.0), _trial(2, 20, 2.0, 8.0)]},
    ]
    got = bench.summarise_pruning(runs)
    ref = _reference_summary(runs)
    assert len(got["per_repeat"]) == 6
    for row in got["per_repeat"]:
        it, cs, best, gap = ref[row["scheduler"]][row["repeat"]]
        assert row["iters_frac"] == pytest.approx(it)
        assert row["compute_frac"] == pytest.approx(cs)
        assert row["best_miou"] == pytest.approx(best)
        assert row["gap"] == pytest.approx(gap)
    for name, rows in ref.items():
        s = got["summary"][name]
        assert s["repeats"] == 2
        assert s["iters_frac"] == pytest.approx(sum(r[0] for r in rows) / 2)
        assert s["compute_frac"] == pytest.approx(sum(r[1] for r in rows) / 2)
        assert s["gap"] == pytest.approx(sum(r[3] for r in rows) / 2)
        assert s["gap_max"] == pytest.approx(max(r[3] for r in rows))
    # hand-checked values: asha repeat 0 uses 100/300 iterations, 9.5/30 s, gap 0.5
    asha0 = next(r for r in got["per_repeat"] if r["scheduler"] == "asha" and r["repeat"] == 0)
    assert asha0["iters_frac"] == pytest.approx(1 / 3)
    assert asha0["best_index"] == 1 and asha0["n_stopped_early"] == 3
    # asha: gaps 0.5 and 3.0 -> mean 1.75 > 1: fails; median: 70 % compute: fails
    assert got["summary"]["asha"]["meets_target"] is False
    assert got["summary"]["optuna-median"]["meets_target"] is False
    assert got["summary"]["none"]["iters_frac"] == 1.0 and got["summary"]["none"]["gap"] == 0.0
    assert "meets_target" not in got["summary"]["none"]


def test_summarise_pruning_target_met_and_missing_reference():
    runs = [
        {"repeat": 0, "scheduler": "none", "trials": [_trial(i, 100, 10.0, 50.0 + i)
                                                      for i in range(4)]},
        {"repeat": 0, "scheduler": "asha", "trials": [_trial(0, 10, 1.0, 20.0),
                                                      _trial(1, 10, 1.0, 21.0),
                                                      _trial(2, 10, 1.0, 22.0),
                                                      _trial(3, 100, 10.0, 52.5)]},
    ]
    s = bench.summarise_pruning(runs)["summary"]["asha"]
    assert s["iters_frac"] == pytest.approx(130 / 400) and s["gap"] == pytest.approx(0.5)
    assert s["meets_target"] is True
    with pytest.raises(ValueError, match="repeat 0 has no 'none' run"):
        bench.summarise_pruning(runs[1:])


def test_bad_arguments_are_refused_before_ray_starts(tmp_path, capsys):
    with pytest.raises(ValueError, match="must include 'none'"):
        bench.bench_pruning(tmp_path, schedulers=("asha",))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench.bench_pruning(tmp_path, repeats=0)
    with pytest.raises(ValueError, match="n_trials must be >= 1"):
        bench.bench_efficiency(tmp_path, n_trials=0)
    with pytest.raises(SystemExit):
        bench.main(["--what", "speed"])
    assert "unknown part(s) ['speed']" in capsys.readouterr().err
