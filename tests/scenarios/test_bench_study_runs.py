"""benchmarks/bench_study.py end to end at toy size (never the full bench): the efficiency
part runs a real ablation study, the pruning part the same trials under two schedulers, both on
one loopback Ray. (Its pure parts: tests/test_bench_study.py.)
"""

from __future__ import annotations

import json
import math

import pytest
from benchmark_scripts import load_benchmark

from ctt.tune.cli import SMOKE_OVERRIDES

bench = load_benchmark("bench_study")

TOY = {"iters": 6, "eval_every": 3, "overrides": dict(SMOKE_OVERRIDES)}


def _in_ratio_range(x):
    return isinstance(x, float) and math.isfinite(x) and 0.0 < x <= 1.5


def test_efficiency_toy(ray_local, tmp_path):
    e = bench.bench_efficiency(tmp_path, n_trials=2, **TOY)
    json.dumps(e)  # the record must be JSON-serialisable as is
    for key in ("n_trials", "slots", "cpus_per_trial", "variant", "iters", "wall_s",
                "trial_compute_s", "sum_compute_s", "ratio", "target", "meets_target",
                "ray_init_s", "errors"):
        assert key in e, key
    assert e["n_trials"] == 2 and e["slots"] == min(2, int(e["cluster_cpus"]))
    assert e["steps"] == [6, 6] and e["errors"] == []
    assert len(e["trial_compute_s"]) == 2 and all(c > 0 for c in e["trial_compute_s"])
    assert e["sum_compute_s"] == pytest.approx(sum(e["trial_compute_s"]))
    assert e["ratio"] == pytest.approx(e["sum_compute_s"] / (e["wall_s"] * e["slots"]))
    assert _in_ratio_range(e["ratio"])
    # the bench ran a real ablation study (the real study plumbing is measured): its directory
    # holds what the study logger and the results wrote
    study = tmp_path / "efficiency"
    assert len(list((study / "trials").iterdir())) == 2
    assert (study / "trials.parquet").exists() and (study / "report.md").exists()


def test_pruning_toy(ray_local, tmp_path):
    params = bench.sample_configs(2, seed=3)
    p = bench.bench_pruning(tmp_path, params=params, schedulers=("none", "optuna-median"),
                            repeats=1, grace_period=3, median_startup=1, **TOY)
    json.dumps(p)
    assert p["params"] == params and p["schedulers"] == ["none", "optuna-median"]
    assert len(p["runs"]) == 2 and len(p["per_repeat"]) == 2
    for run in p["runs"]:
        assert sorted(t["index"] for t in run["trials"]) == [0, 1]
        for t in run["trials"]:
            assert 3 <= t["step"] <= 6, t
            assert t["compute_s"] > 0, t
            assert t["status"] == "TERMINATED", t
            assert t["miou_best"] is not None, t
            assert 0.0 <= t["miou_best"] <= 100.0, t
    none = next(r for r in p["runs"] if r["scheduler"] == "none")
    assert [t["step"] for t in none["trials"]] == [6, 6]  # nothing stopped without a scheduler
    for row in p["per_repeat"]:
        assert _in_ratio_range(row["iters_frac"]), row
        assert row["iters_frac"] <= 1.0, row  # a scheduler can only remove iterations
        # Seconds of a 6-iteration trial are mostly start-up (dataset build, first kernels)
        # and vary by more than 1.5x between runs on a shared 2-core machine: only check sign.
        assert math.isfinite(row["compute_frac"]) and row["compute_frac"] > 0, row
    s = p["summary"]
    assert s["none"]["iters_frac"] == 1.0 and s["none"]["gap"] == 0.0
    assert isinstance(s["optuna-median"]["meets_target"], bool)
    assert p["target"] == {"gap": 1.0, "compute_frac": 0.35}
