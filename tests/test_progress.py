"""The study's progress line (ctt.tune.progress) against a slow, obvious reference of the
same arithmetic, with fake Tune trials and a fake clock."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import pytest

from ctt.tune.grid import WARMUP_VARIANT, relative_cost
from ctt.tune.progress import StudyProgress, format_minutes, start_line, trial_work


@dataclass
class FakeTrial:
    config: dict[str, Any]
    status: str = "PENDING"
    last_result: dict[str, Any] = field(default_factory=dict)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cfg(variant: str, iters: int = 100, warmup: int = 20, fork: bool = True,
        seed: int = 0) -> dict[str, Any]:
    unsup = "none" if variant == "supervised" else "cross"
    pairs = 1 if variant in ("supervised", "mean_teacher") else 2
    lam = 0.1 if variant == "ctt" else 0.0
    c = {"variant": variant, "seed": seed, "optim.iters": iters, "method.warmup_iters": warmup,
         "method.unsup": unsup, "method.pairs": pairs, "method.lambda_h": lam,
         "method.lambda_l": lam, "data.batch_size": 2, "data.batch_size_u": 2}
    if fork:
        c["_fork_from"] = "/somewhere/warmup/seed-0"
    return c


def reference_work(c: dict[str, Any], step: int | None) -> float:
    """Iteration by iteration: each iteration the trial ran adds one iteration's cost."""
    if c["variant"] == WARMUP_VARIANT:
        first, last = 0, c["_until"]
        per = relative_cost({**c, "method.unsup": "none"})
    else:
        first = c["method.warmup_iters"] if c.get("_fork_from") else 0
        last = c["optim.iters"]
        per = relative_cost(c)
    end = last if step is None else step
    return sum(per for i in range(first, last) if i < end)


@pytest.mark.parametrize("step", [None, 0, 10, 20, 21, 57, 100, 150])
@pytest.mark.parametrize("variant,fork", [("supervised", False), ("ctt", True),
                                          ("cross", False), ("warmup", False)])
def test_trial_work_matches_iteration_by_iteration_reference(step, variant, fork):
    c = cfg(variant, fork=fork)
    if variant == WARMUP_VARIANT:
        c["_until"] = 20
    assert trial_work(c, step) == pytest.approx(reference_work(c, step))


def test_progress_line_counts_and_share_of_work():
    clock, out = FakeClock(), io.StringIO()
    trials = [FakeTrial({**cfg("ctt", fork=False), "variant": WARMUP_VARIANT, "_until": 20},
                        "TERMINATED", {"step": 20, "miou": 99.0}),
              FakeTrial(cfg("ctt"), "RUNNING", {"step": 60, "miou": 30.5}),
              FakeTrial(cfg("supervised", fork=False), "TERMINATED",
                        {"step": 100, "miou": 28.25}),
              FakeTrial(cfg("cross"), "ERROR", {"step": 40}),
              FakeTrial(cfg("cross", seed=1), "PENDING")]
    rep = StudyProgress(total=5, estimate_s=None, stream=out, clock=clock)
    line = rep.line(trials)
    # the warm-up is not a result; a fifth trial the searcher has not created yet is pending
    assert "trials 2 done (1 failed), 1 running, 2 pending" in line
    done = (reference_work(trials[0].config, None) + reference_work(trials[1].config, 60)
            + reference_work(trials[2].config, None) + reference_work(trials[3].config, None))
    planned = (reference_work(trials[0].config, None) + reference_work(trials[1].config, None)
               + reference_work(trials[2].config, None) + reference_work(trials[3].config, None)
               + reference_work(trials[4].config, None))
    unsampled = reference_work(trials[1].config, None)  # the largest trial stands for it
    assert f"compute {100 * done / (planned + unsampled):.0f}%" in line
    # the best value is a result's, never the warm-up's
    assert "best miou 30.50 (ctt, seed 0)" in line
    assert "left" not in line  # no estimate and nothing measured yet


def test_pruned_trial_counts_only_the_work_it_ran():
    rep = StudyProgress(total=2, clock=FakeClock())
    pruned = FakeTrial(cfg("ctt", fork=False), "TERMINATED", {"step": 50})
    pending = FakeTrial(cfg("ctt", fork=False, seed=1))
    done, planned = rep._work([pruned, pending], [pruned, pending])
    assert done == pytest.approx(reference_work(pruned.config, 50))
    assert planned == pytest.approx(reference_work(pruned.config, 50)
                                    + reference_work(pending.config, None))


def test_time_left_from_estimate_then_from_measured_rate():
    clock = FakeClock()
    c = cfg("ctt", fork=False)
    trials = [FakeTrial(c, "RUNNING", {"step": 0}), FakeTrial(dict(c, seed=1), "PENDING")]
    rep = StudyProgress(total=2, estimate_s=400.0, slots=2, clock=clock)
    assert rep.should_report(trials) is False  # the first call starts the clock
    # before anything is measured: the estimate, all of it left, over 2 slots
    assert "about 3.3 min left" in rep.line(trials)
    clock.now += 60
    trials[0].last_result = {"step": 50}  # a quarter of the work in 60 s
    assert rep.should_report(trials) is True
    assert "compute 25%" in rep.line(trials)
    assert "about 3.0 min left" in rep.line(trials)  # 3 quarters at 60 s each


def test_report_prints_one_line_per_interval_and_at_the_end():
    clock, out = FakeClock(), io.StringIO()
    rep = StudyProgress(total=1, every_s=30, stream=out, clock=clock)
    trials = [FakeTrial(cfg("supervised", fork=False), "RUNNING", {"step": 10})]
    rep.setup()
    assert not rep.should_report(trials)
    clock.now += 29
    assert not rep.should_report(trials)
    clock.now += 1
    assert rep.should_report(trials)
    rep.report(trials, False)
    assert not rep.should_report(trials)
    assert rep.should_report(trials, done=True)
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("[ 0:30] trials")


def test_setup_restarts_the_clock_for_a_resumed_fit():
    clock = FakeClock()
    c = cfg("ctt", fork=False)
    trials = [FakeTrial(c, "TERMINATED", {"step": 100}), FakeTrial(dict(c, seed=1), "RUNNING",
                                                                    {"step": 0})]
    rep = StudyProgress(total=2, clock=clock)
    rep.should_report(trials)
    clock.now += 500
    rep.setup()  # a new fit: the finished trial's work is not this run's speed
    rep.should_report(trials)
    clock.now += 30
    trials[1].last_result = {"step": 25}
    assert "about 1.5 min left" in rep.line(trials)  # 75 steps left at 25 steps per 30 s


def test_start_line_and_minutes():
    line = start_line("voc_ablation", "/x/studies_out/voc_ablation", 21, 3, 2400.0, 2)
    assert line == ("study voc_ablation: 21 trials + 3 shared warm-ups in "
                    "/x/studies_out/voc_ablation; estimated compute 40 min, about 20 min wall "
                    "on 2 slots")
    assert start_line("s", "/d", 1).endswith("time left shown once trials report")
    assert [format_minutes(s) for s in (5, 90, 1800, 40000)] == ["5 s", "1.5 min", "30 min",
                                                                  "11.1 h"]
