"""PlannedGridSearcher (ctt.tune.adaptive) driven as Tune drives it, without Ray: rounds of
seeds only for the variants open questions need, the budget, the plan record and the state
Tune saves with each experiment snapshot.

Each test plays Tune's part by hand: ``suggest`` until it returns None or FINISHED, then ends
trials with the results a trial reports (``step``, ``miou``, ``time/trial_compute_s``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ray.tune.search import Searcher

from ctt.config import get_preset
from ctt.tune import ablation
from ctt.tune.adaptive import COMPUTE_KEY, PlannedGridSearcher
from ctt.tune.runtime import StudyOptions
from ctt.tune.sequential import Plan

TINY = get_preset("tiny")
ITERS, WARMUP_STEP = TINY.optim.iters, TINY.method.warmup_iters
HOUR_PER_TRIAL = 3600.0 / ITERS  # seconds per step that make an unforked trial 1 hour


def _searcher(tmp_path: Path, *, variants=("supervised", "ctt", "cross"), seeds=(0, 1),
              max_seeds=4, questions=("ctt/supervised",), budget=None, step_s=None,
              adaptive=True, fork=True) -> PlannedGridSearcher:
    opts = StudyOptions(name="a", seeds=list(seeds), max_seeds=max_seeds, adaptive=adaptive,
                        questions=tuple(questions), budget=budget)
    configs = ablation.ablation_trials(opts, list(variants))
    items = ablation._grid_items(opts, configs, str(tmp_path), fork=fork)
    extra = ablation.extra_seeds(opts.seeds, max_seeds - len(seeds)) if adaptive else []
    reserve = [(s, ablation._grid_items(opts, ablation.ablation_trials(opts, list(variants), [s]),
                                        str(tmp_path), fork, [s])) for s in extra]
    ablation._common_space(items + [i for _, later in reserve for i in later])
    return PlannedGridSearcher(
        items, reserve=reserve, questions=tuple(questions), plan=ablation.plan_of(opts),
        seeds=list(seeds), budget=budget, step_s=step_s or {},
        plan_record=str(tmp_path / "plan.json"), record=str(tmp_path / "warmup.json"),
        failures=str(tmp_path / "warmup-failed.json"))


class Tune:
    """Tune's side: start what the searcher suggests, end trials with given results."""

    def __init__(self, searcher: PlannedGridSearcher, tmp_path: Path):
        self.s, self.tmp = searcher, tmp_path
        self.n = 0
        self.running: dict[str, dict] = {}
        self.started: list[tuple[str, int]] = []
        self.finished = False

    def start_all(self) -> None:
        while True:
            self.n += 1
            tid = f"t{self.n}"
            cfg = self.s.suggest(tid)
            if cfg is Searcher.FINISHED:
                self.finished = True
                return
            if cfg is None:
                return
            self.running[tid] = cfg
            self.started.append((cfg["variant"], cfg["seed"]))

    def end(self, tid: str, miou: float | None = None, compute_s: float = 36.0,
            error: bool = False) -> None:
        cfg = self.running.pop(tid)
        if cfg["variant"] == "warmup":
            d = Path(cfg["_publish"])
            d.mkdir(parents=True, exist_ok=True)
            (d / "state.pt").write_bytes(b"x")
            result = {"step": WARMUP_STEP, "error": None, COMPUTE_KEY: compute_s}
        else:
            result = {"step": 10, "error": None, "miou": miou, COMPUTE_KEY: compute_s}
        self.s.on_trial_complete(tid, None if error else result, error=error)

    def run_round(self, values, compute_s: float = 36.0) -> None:
        """Start and end everything until nothing more starts: ``values(variant, seed)``."""
        self.start_all()
        while self.running:
            tid = next(iter(self.running))
            cfg = self.running[tid]
            self.end(tid, values(cfg["variant"], cfg["seed"]), compute_s=compute_s)
            self.start_all()


def test_rounds_release_only_the_variants_open_questions_need(tmp_path):
    """ctt/supervised stays open (noisy): each round adds one seed of ctt and supervised (and
    the seed's warm-up), never cross; at max_seeds the plan stops and says why."""
    s = _searcher(tmp_path)
    t = Tune(s, tmp_path)
    noise = {0: 0.0, 1: 3.0, 2: -3.0, 3: 2.0}
    t.run_round(lambda v, seed: 50.0 + (0.5 if v == "ctt" else 0.0) + noise[seed] *
                (1 if v == "ctt" else -1))
    assert t.finished
    by_seed = {seed: sorted(v for v, s2 in t.started if s2 == seed) for seed in range(4)}
    assert by_seed[0] == by_seed[1] == ["cross", "ctt", "supervised", "warmup"]
    assert by_seed[2] == by_seed[3] == ["ctt", "supervised", "warmup"]
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["seed_order"] == [0, 1, 2, 3] and record["stopped"] == "max_seeds"
    assert [r["variants"] for r in record["rounds"]] == [["ctt", "supervised"]] * 2
    assert record["budget"] is None


def test_a_question_answered_stops_the_study_and_spares_the_others_variants(tmp_path):
    """Two questions: ctt/supervised differs by 20 with no noise (resolved at the first look
    whose level lets it), cross/supervised stays open: later rounds run cross and supervised
    only; once both are answered no seed is added."""
    s = _searcher(tmp_path, questions=("ctt/supervised", "cross/supervised"), max_seeds=6)
    t = Tune(s, tmp_path)
    jitter = {0: 0.1, 1: -0.1, 2: 0.05, 3: -0.05, 4: 0.0, 5: 0.02}
    t.run_round(lambda v, seed: {"ctt": 70.0, "supervised": 50.0}.get(v, 50.0) + jitter[seed])
    record = json.loads((tmp_path / "plan.json").read_text())
    # every look closes ctt/supervised the moment its level allows; cross/supervised (a
    # difference of 0 with small noise) settles inside ±delta at the same look
    assert record["stopped"] == "answered"
    ran = {(v, seed) for v, seed in t.started}
    last = max(seed for _, seed in ran)
    assert all((v, seed) in ran for v in ("ctt", "supervised", "cross") for seed in (0, 1))
    assert last < 5  # it stopped before max_seeds
    for r in record["rounds"]:
        assert set(r["variants"]) == {v for q in r["open"] for v in q.split("/")}


def test_budget_waits_while_trials_run_and_leaves_out_what_cannot_fit(tmp_path):
    """Estimates 1 core-hour per variant trial: with a cap of 2.5 the third trial waits while
    two run; after they measure 1 hour each it is left out (2 + 1 > 2.5), its seed's others
    too, and the plan stops for the budget with the spend measured."""
    step_s = {"warmup": 0.0, "supervised": HOUR_PER_TRIAL, "ctt": HOUR_PER_TRIAL}
    s = _searcher(tmp_path, variants=("supervised", "ctt"), budget=2.5, step_s=step_s,
                  fork=False)
    t = Tune(s, tmp_path)
    t.start_all()
    assert len(t.running) == 2 and not t.finished  # the third would pass 2.5 while two run
    for tid in list(t.running):
        t.end(tid, 50.0, compute_s=3600.0)
    t.start_all()
    assert not t.running and t.finished
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["stopped"] == "budget" and len(record["over_budget"]) == 2
    assert record["budget"]["spent"] == pytest.approx(2.0)
    assert record["budget"]["estimated"] == pytest.approx(2.0)
    assert record["budget"]["unit"] == "core-hours"


def test_measured_seconds_per_step_replace_the_model(tmp_path):
    """A variant's first ended trial sets its estimate: the model said 1 s per step, the trial
    measured 2, so the next trial of that variant counts 2."""
    s = _searcher(tmp_path, variants=("supervised", "ctt"), questions=(), adaptive=False,
                  fork=False, budget=1e9, step_s={"supervised": 1.0, "ctt": 1.0})
    t = Tune(s, tmp_path)
    t.start_all()
    assert s._cost(s._key_items["supervised/1"]) == pytest.approx(ITERS / 3600)
    first = next(tid for tid, cfg in t.running.items() if cfg["variant"] == "supervised")
    t.end(first, 50.0, compute_s=2.0 * ITERS)
    assert s.measured_step_s["supervised"] == pytest.approx(2.0)
    assert s._cost(s._key_items["supervised/1"]) == pytest.approx(2.0 * ITERS / 3600)


def test_state_survives_a_snapshot_mid_round_and_no_seed_is_released_twice(tmp_path):
    """Tune's snapshot after the first round's decision: the restored searcher holds the same
    released seeds, results and spend, and releases the next seed once."""
    s = _searcher(tmp_path, variants=("supervised", "ctt"), max_seeds=4)
    t = Tune(s, tmp_path)
    noise = {0: 0.0, 1: 3.0, 2: -3.0, 3: 2.0}
    values = lambda v, seed: 50.0 + noise[seed] * (1 if v == "ctt" else -1)  # noqa: E731
    t.start_all()
    while any(seed < 2 for _, seed in t.started if (_, seed)) and t.running:
        tid = next(iter(t.running))
        t.end(tid, values(t.running[tid]["variant"], t.running[tid]["seed"]))
        if not t.running:
            break
        t.start_all()
    assert s.seed_order == [0, 1, 2]  # the first round ended: seed 2 released
    path = tmp_path / "searcher.pkl"
    s.save(str(path))
    restored = _searcher(tmp_path / "elsewhere", variants=("supervised", "ctt"), max_seeds=4)
    restored.restore(str(path))
    assert restored.seed_order == [0, 1, 2] and restored.results == s.results
    assert restored.spent == pytest.approx(s.spent)
    t2 = Tune(restored, tmp_path)
    t2.run_round(values)
    assert restored.seed_order == [0, 1, 2, 3]
    assert sorted(seed for _, seed in t2.started).count(2) == 3  # warm-up + 2 variants, once
    assert sorted(seed for _, seed in t2.started).count(3) == 3


def test_a_fixed_study_with_a_budget_records_it_and_stops_for_it(tmp_path):
    step_s = {"supervised": HOUR_PER_TRIAL, "ctt": HOUR_PER_TRIAL}
    s = _searcher(tmp_path, variants=("supervised", "ctt"), adaptive=False, budget=1.0,
                  step_s=step_s, fork=False)
    t = Tune(s, tmp_path)
    t.run_round(lambda v, seed: 50.0, compute_s=3600.0)  # each trial measures its 1 hour
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["adaptive"] is False and record["stopped"] == "budget"
    assert len(t.started) == 1 and len(record["over_budget"]) == 3


def test_plan_rejects_bad_designs():
    with pytest.raises(ValueError):
        Plan(initial=1)
    with pytest.raises(ValueError):
        Plan(delta=0.0)
    assert ablation.extra_seeds([0, 1, 2], 3) == [3, 4, 5]
    assert ablation.extra_seeds([5, 2], 0) == []


def test_dry_run_prints_the_worst_case_against_the_budget(tmp_path, capsys):
    """--dry-run of an adaptive study: the first seeds' estimate, the worst case (every seed up
    to --max-seeds for every variant, max_seeds / seeds times it) and the verdict against
    --budget; nothing is launched or written."""
    from helpers import load_script

    main = load_script("voc_ablation").main
    args = ["--variants", "supervised,ctt", "--seeds", "0,1", "--adaptive", "--max-seeds", "6",
            "--storage", str(tmp_path / "s"), "--dry-run"]
    assert main([*args, "--budget", "1000"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"at most 6 seeds: worst case ([\d.e+-]+) core-hours \(([\d.e+-]+) for the "
                  r"first 2\)", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(3 * float(m.group(2)), rel=1e-2)
    assert "budget 1000 core-hours: the worst case is within it" in out
    assert main([*args, "--budget", "1e-9"]) == 0
    assert "budget 1e-09 core-hours: the worst case is over it" in capsys.readouterr().out
    assert not (tmp_path / "s").exists()
