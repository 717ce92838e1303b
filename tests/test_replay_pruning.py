"""Tests for benchmarks/replay_pruning.py on a tiny synthetic set of recorded curves: the clock,
the real schedulers' decisions, the summary and the files it writes."""

import json
import math

import optuna
import pytest
from benchmark_scripts import load_benchmark
from ray.tune.schedulers import ASHAScheduler

from ctt.tune.curve_pruner import CurvePruner
from ctt.tune.schedulers import OptunaPrunerScheduler

rp = load_benchmark("replay_pruning")

WARMUP, ITERS = 200, 2000
CLOCK = {"warmup_iters": WARMUP, "iters": ITERS}
PRUNER_TYPES = {
    "optuna-median": optuna.pruners.MedianPruner,
    "optuna-percentile": optuna.pruners.PercentilePruner,
    "optuna-sha": optuna.pruners.SuccessiveHalvingPruner,
    "optuna-hyperband": optuna.pruners.HyperbandPruner,
    "optuna-curve": CurvePruner,
}


def synthetic_run(config: int, seed: int, quality: float) -> dict:
    """A run in record_curves.py's format: the same warm-up for every config, then a
    noise-free log curve ending near ``quality``; training cost 1 + 0.5*config CPU s per 100
    iterations (0.5 during the warm-up), 0.2 s per evaluation, every 100 iterations."""
    points, cpu, ev = [], 0.0, 0.0
    per100 = 1.0 + 0.5 * config
    for step in range(100, ITERS + 1, 100):
        cpu += (0.5 if step <= WARMUP else per100) + 0.2
        ev += 0.2
        t = step - WARMUP
        miou = 10.0 * step / WARMUP if t <= 0 else quality - 6 + 2 * math.log1p(t / 180) / (
            math.log1p((ITERS - WARMUP) / 180)) * 3
        points.append({"step": step, "miou": miou + 0.1 * seed, "cpu_s": cpu,
                       "eval_cpu_s": ev, "wall_s": cpu, "eval_wall_s": ev})
    return {"params": {"x": float(config)}, "seed": seed, "config": config, "points": points,
            "warmup_iters": WARMUP, "iters": ITERS}


# config 0 is clearly best at every evaluation after the warm-up; the others trail by >= 8
QUALITIES = (40.0, 32.0, 24.0, 16.0)
RUNS = [synthetic_run(c, s, q) for s in (0, 1) for c, q in enumerate(QUALITIES)]


@pytest.fixture(scope="module")
def curves():
    by_seed, dropped, clock = rp.curves_by_seed(RUNS, 200)
    assert dropped == [] and clock == CLOCK and sorted(by_seed) == [0, 1]
    return by_seed


def test_cadence_drops_the_evaluations_a_sweep_does_not_run():
    c = rp.at_cadence(RUNS[2], 200)
    assert c.steps == tuple(range(200, ITERS + 1, 200))
    # up to 400: warm-up training 2*0.5, training 2*(1 + 0.5*2), evaluations at 200 and 400 only
    assert c.cost[1] == pytest.approx(2 * 0.5 + 2 * 2.0 + 2 * 0.2)
    assert c.cost[-1] == pytest.approx(2 * 0.5 + 18 * 2.0 + 10 * 0.2)
    every100 = rp.at_cadence(RUNS[2], 100)
    assert every100.cost == tuple(p["cpu_s"] for p in RUNS[2]["points"])
    with pytest.raises(ValueError, match="must end"):
        rp.at_cadence({**RUNS[0], "points": RUNS[0]["points"][:-1]}, 200)


def test_incomplete_seeds_are_left_out():
    by_seed, dropped, _ = rp.curves_by_seed(RUNS + [synthetic_run(0, 7, 30.0)], 200)
    assert sorted(by_seed) == [0, 1] and dropped == [7]


def test_clock_one_versus_two_slots(curves):
    seed0 = curves[0]
    totals = [c.total for c in seed0]
    order = [3, 0, 2, 1]
    one = rp.simulate(seed0, order, 1, rp.build_scheduler("none", {}, CLOCK), max_t=ITERS)
    assert one.makespan == pytest.approx(sum(totals))
    assert one.consumed == pytest.approx(sum(totals))
    two = rp.simulate(seed0, order, 2, rp.build_scheduler("none", {}, CLOCK), max_t=ITERS)
    # list scheduling by hand: 3 and 0 start at 0; 2 takes the first free slot, 1 the next
    free = sorted([totals[3], totals[0]])
    end2 = free[0] + totals[2]
    free = sorted([free[1], end2])
    end1 = free[0] + totals[1]
    assert two.makespan == pytest.approx(max(totals[3], totals[0], end2, end1))
    assert two.makespan < one.makespan
    assert two.consumed == pytest.approx(sum(totals))
    assert one.picked == two.picked == 0
    assert all(step == ITERS for step in two.stopped.values())


def test_none_costs_everything_and_has_no_regret(curves):
    rows = rp.run_replay(curves, CLOCK, {"none": [{"grace_period": 0}]}, slots=(1, 2),
                         n_orders=2)
    summary = rp.summarize(rows)
    assert len(rows) == 2 * 2 * 2 and len(summary) == 2
    for e in summary:
        assert e["compute_mean"] == pytest.approx(1.0)
        assert e["regret_median"] == e["regret_p90"] == 0.0 and e["p_regret_le_1"] == 1.0
        assert e["time_median"] == pytest.approx(1.0)


@pytest.mark.parametrize("family", [f for f in rp.FAMILIES if f != "none"])
def test_real_schedulers_prune_bad_curves_and_keep_the_best(curves, family):
    settings = rp.QUICK_SETTINGS[family]
    sched = rp.build_scheduler(family, settings[0], CLOCK)
    if family == "asha":
        assert isinstance(sched, ASHAScheduler)
    else:
        assert isinstance(sched, OptunaPrunerScheduler)
        assert type(sched.pruner) is PRUNER_TYPES[family]
    # one sweep by hand: the best config launched first, the scheduler's own book afterwards
    sweep = rp.simulate(curves[0], [0, 1, 2, 3], 1, sched, max_t=ITERS)
    assert sweep.picked == 0 and sweep.stopped[0] == ITERS
    pruned = {c for c, step in sweep.stopped.items() if step < ITERS}
    assert pruned, f"{family} stopped none of the clearly worse configs"
    cost = {c.config: dict(zip(c.steps, c.cost)) for c in curves[0]}
    assert sweep.consumed == pytest.approx(sum(cost[c][s] for c, s in sweep.stopped.items()))
    if family == "asha":
        assert sched._trial_info == {}  # on_trial_complete reached it for every trial
    else:
        states = {t.user_attrs["tune_trial_id"]: t.state for t in sched.study.trials}
        assert sorted(states.values(), key=str) == sorted(
            [optuna.trial.TrialState.PRUNED] * len(pruned)
            + [optuna.trial.TrialState.COMPLETE] * (4 - len(pruned)), key=str)
    # many orders, 1 and 2 slots: the best config always survives; compute is saved
    summary = rp.summarize(rp.run_replay(curves, CLOCK, {family: settings}, slots=(1, 2),
                                         n_orders=4))
    for e in summary:
        assert e["regret_p90"] == 0.0 and e["p_regret_le_1"] == 1.0
        assert e["compute_mean"] < 1.0


def test_pareto_front_and_dominance():
    def pt(c, r):
        return {"compute_mean": c, "regret_median": r}
    front = rp.pareto_front([pt(0.5, 1.0), pt(0.3, 2.0), pt(0.6, 0.5), pt(0.7, 1.5)])
    assert [(p["compute_mean"], p["regret_median"]) for p in front] == [
        (0.3, 2.0), (0.5, 1.0), (0.6, 0.5)]
    assert rp.dominates([pt(0.2, 1.0), pt(0.5, 0.0)], front)
    assert not rp.dominates([pt(0.4, 0.0)], front)  # nothing as cheap as 0.3
    assert rp.box_distance({"compute_mean": 0.3, "regret_median": 0.9}) == 0.0
    assert rp.box_distance({"compute_mean": 0.45, "regret_median": 1.0}) == pytest.approx(1.0)

    def ent(c, r, p90=0.0):
        return {"compute_mean": c, "regret_median": r, "regret_p90": p90}
    inside, cheap_bad, good = ent(0.3, 0.5), ent(0.2, 3.0), ent(0.45, 0.0)
    assert rp.best_in_box([cheap_bad, inside, good, ent(0.34, 0.9)]) is inside
    assert rp.best_in_box([cheap_bad, good, ent(0.6, 0.0)]) is good  # cheapest within 1 mIoU
    nearest = ent(0.36, 1.5)
    assert rp.best_in_box([cheap_bad, nearest]) is nearest
    assert rp.best_in_box([]) is None


def test_main_writes_json_and_png(tmp_path):
    path = tmp_path / "curves.partial.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RUNS + [synthetic_run(0, 5, 30.0)]))
    out, png = tmp_path / "replay.json", tmp_path / "pareto.png"
    assert rp.main(["--curves", str(path), "--quick", "--orders", "2", "--slots", "1,2",
                    "--workers", "1", "--out", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    assert data["seeds"] == [0, 1] and data["seeds_left_out"] == [5]
    assert data["orders"] == 2 and data["quick"] is True
    assert {(e["family"], e["slots"]) for e in data["summary"]} == {
        (f, n) for f in rp.FAMILIES for n in (1, 2)}
    assert all(len(e["compute"]) == 4 for e in data["summary"])
    assert set(data["analysis"]) == {"1", "2"}
    assert data["analysis"]["2"]["none"]["best"]["compute_mean"] == pytest.approx(1.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
