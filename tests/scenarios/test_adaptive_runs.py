"""``--adaptive`` and ``--budget`` end to end, as a user runs them: the VOC ablation script in a
subprocess (its own Ray), on the generated synthetic set and on the real VOC layout with a tiny
network. (The searcher alone, Tune's part played by hand: tests/test_adaptive.py.)

Which questions a smoke study answers depends on its arbitrary numbers, so these tests check
what holds whatever the numbers: each round runs exactly the variants its open questions need,
each (variant, seed) trains once, the report answers the questions in order, the budget stops
the study cleanly, and a resume continues the plan without a seed released twice."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import REPO_ROOT
from real_layouts import hash_tree, make_voc

pytestmark = pytest.mark.slow

TIMEOUT_S = 420


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "CTT_STAGING": str(tmp_path / "staging"),
            "CTT_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def _study(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "studies" / "voc_ablation.py"), "--smoke-test",
            "--storage", str(tmp_path / "s"), "--max-failures", "0", *args]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_study(tmp_path, *args), cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _log(res: subprocess.CompletedProcess) -> str:
    return f"exit {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n" \
           f"{res.stderr[-4000:]}"


def _trials(study: Path) -> list[dict]:
    return pq.read_table(study / "trials.parquet").to_pylist()


def _check_plan(study: Path, initial: list[int], variants: list[str]) -> dict:
    """What holds whatever the numbers: the initial seeds ran every variant once; each later
    seed ran exactly the variants of the questions open when it was released (the last one
    fewer, or none, when the budget stopped the study there); no (variant, seed) twice; every
    trial finished with an mIoU."""
    plan = json.loads((study / "plan.json").read_text())
    trials = _trials(study)
    ran = [(t["variant"], t["seed"]) for t in trials]
    assert len(ran) == len(set(ran)), ran
    assert all(t["status"] == "TERMINATED" and math.isfinite(t["miou_final"]) for t in trials)
    assert plan["seed_order"][:len(initial)] == initial
    assert len(plan["seed_order"]) == len(set(plan["seed_order"]))
    for s in initial:
        assert sorted(v for v, seed in ran if seed == s) == sorted(variants)
    released = {r["seed"]: r for r in plan["rounds"]}
    assert sorted(released) == plan["seed_order"][len(initial):]
    last = plan["seed_order"][-1]
    for seed, r in released.items():
        need = sorted({v for q in r["open"] for v in q.split("/")})
        assert r["variants"] == need, r
        got = sorted(v for v, s in ran if s == seed)
        if plan["stopped"] == "budget" and seed == last:
            assert set(got) < set(need), (seed, ran, plan)
        else:
            assert got == need, (seed, ran)
    return plan


def _questions_rows(report: str) -> list[str]:
    section = report.split("## Questions", 1)[1].split("\n## ", 1)[0]
    return [ln for ln in section.splitlines() if ln.startswith("| ") and "−" in ln]


def test_adaptive_smoke_study_adds_seeds_only_where_questions_are_open(tmp_path):
    """Up to 4 seeds, two questions sharing `supervised`: rounds, the plan record, the trial
    table, TensorBoard runs for the added seeds and the report's Questions section agree."""
    variants = ["supervised", "ctt", "cross"]
    res = _run(tmp_path, "--variants", ",".join(variants), "--seeds", "0,1", "--adaptive",
               "--max-seeds", "4", "--questions", "ctt/supervised,cross/supervised",
               "--out", "adaptive")
    assert res.returncode == 0, _log(res)
    study = tmp_path / "s" / "adaptive"
    plan = _check_plan(study, [0, 1], variants)
    assert plan["stopped"] in ("answered", "max_seeds"), plan
    if plan["stopped"] == "max_seeds":
        assert plan["seed_order"] == [0, 1, 2, 3]
    for variant, seed in {(t["variant"], t["seed"]) for t in _trials(study)}:
        assert list((study / "tb").glob(f"{variant}_seed{seed}_*")), (variant, seed)
    report = (study / "report.md").read_text()
    rows = _questions_rows(report)
    assert [r.split("|")[1].strip() for r in rows] == ["ctt − supervised", "cross − supervised"]
    assert report.index("## Questions") < report.index("## Ablation")
    assert "questions (adaptive design" in res.stdout, _log(res)
    options = json.loads((study / "study.json").read_text())["options"]
    assert options["adaptive"] is True and options["questions"] == [
        "ctt/supervised", "cross/supervised"]


def test_budget_stops_an_adaptive_study_cleanly_with_an_honest_report(tmp_path):
    """A budget of 0.0005 core-hours (1.8 s) against up to 5 seeds of smoke trials (each
    measures a fraction of a second or more): however fast the machine, a round is cut or
    never started, the study exits 0, and the report states the spend against the cap and the
    questions left open for it. Which round the budget cuts depends on the machine's speed,
    so only that it cut one is asserted."""
    res = _run(tmp_path, "--variants", "supervised,ctt", "--seeds", "0,1", "--adaptive",
               "--max-seeds", "5", "--questions", "ctt/supervised", "--budget", "0.0005",
               "--out", "capped")
    assert res.returncode == 0, _log(res)
    study = tmp_path / "s" / "capped"
    plan = _check_plan(study, [0, 1], ["supervised", "ctt"])
    budget = plan["budget"]
    assert budget["unit"] == "core-hours" and budget["cap"] == 0.0005
    assert json.loads((study / "study.json").read_text())["plan"] == plan  # spend on record
    # the estimates (the cost model, then what the first trials measured) let trials start
    # whose measured compute then passed the cap: the spend is on record either way
    assert budget["spent"] > 0, budget
    answered = plan["stopped"] == "answered"  # possible only if the first look decided
    assert answered or plan["stopped"] == "budget", plan
    report = (study / "report.md").read_text()
    spend = re.search(r"^Spend: ([\d.e-]+) of 0.0005 core-hours \(estimated ([\d.e-]+) before "
                      r"the trials ran\)\.$", report, re.M)
    assert spend, report
    assert float(spend.group(1)) == pytest.approx(budget["spent"], rel=0.05)
    if not answered:
        assert "open: budget" in _questions_rows(report)[0], report
        assert "Stopped: the next round would have gone past the budget." in report
        assert len(plan["over_budget"]) >= 1 and len(plan["seed_order"]) < 5


def test_an_interrupted_adaptive_study_resumes_without_releasing_a_seed_twice(tmp_path):
    """Ctrl-C while the first added seed's trials run; --resume (the same --budget): the
    released seeds, the results and the spend are the searcher's restored state, so seed 2 is
    not released again and its trials run once; the spend only grows."""
    args = ["--variants", "supervised,ctt", "--seeds", "0,1", "--adaptive", "--max-seeds", "3",
            "--questions", "ctt/supervised", "--max-concurrent", "1", "--iters", "300",
            "--set", "run.eval_every=30", "--set", "run.checkpoint_every=30", "--budget", "10",
            "--out", "resumed"]
    study = tmp_path / "s" / "resumed"
    proc = subprocess.Popen(_study(tmp_path, *args), cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    before = None
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            plan_file, trials_dir = study / "plan.json", study / "trials"
            if plan_file.exists() and trials_dir.is_dir():
                plan = json.loads(plan_file.read_text())
                running = [json.loads(p.read_text()) for p in trials_dir.glob("*/trial.json")]
                if len(plan["seed_order"]) == 3 and any(
                        t.get("seed") == 2 and t.get("status") == "RUNNING" for t in running):
                    before = plan
                    break
            time.sleep(0.2)
        assert before is not None, "seed 2 never ran"
        assert proc.poll() is None, "the study ended before the interrupt"
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, f"{out[-3000:]}\n{err[-3000:]}"
    assert "--resume" in err
    res = _run(tmp_path, *args, "--resume")
    assert res.returncode == 0, _log(res)
    plan = _check_plan(study, [0, 1], ["supervised", "ctt"])
    assert plan["seed_order"] == before["seed_order"] == [0, 1, 2]
    assert plan["rounds"] == before["rounds"]
    assert plan["stopped"] == "max_seeds" and len(_trials(study)) == 6
    # the budget counts what was spent before the interrupt (restored with the searcher)
    assert plan["budget"]["spent"] > before["budget"]["spent"] > 0, (before, plan)


def test_adaptive_ablation_on_the_real_voc_layout(tmp_path):
    """The adaptive study on a VOC 2012 tree as downloaded (tests/real_layouts.py), a tiny
    network at 32 px: it runs, reads the tree without writing to it, and answers in report.md."""
    data = tmp_path / "data"
    make_voc(data, splits={"4": (4, "pair_class")})
    tree = hash_tree(data)
    res = _run(tmp_path, "--preset", "voc-r101", "--data-root", str(data), "--split", "4",
               "--set", "model.arch=tiny", "--set", "data.crop_size=32",
               "--variants", "supervised,ctt", "--seeds", "0,1", "--adaptive", "--max-seeds",
               "3", "--out", "voc-adaptive")
    assert res.returncode == 0, _log(res)
    assert hash_tree(data) == tree
    study = tmp_path / "s" / "voc-adaptive"
    _check_plan(study, [0, 1], ["supervised", "ctt"])
    trials = _trials(study)
    assert {t["data.dataset"] for t in trials} == {"voc"}
    rows = _questions_rows((study / "report.md").read_text())
    # voc_ablation's own questions whose two variants run: ctt/supervised only
    assert [r.split("|")[1].strip() for r in rows] == ["ctt − supervised"]


def test_budget_stops_a_sweep_before_its_num_samples(tmp_path):
    """A sweep of 3 smoke samples, one at a time, with a budget the first trial's measured
    compute already passes (0.0001 core-hours is 0.36 s): one trial runs, the search ends
    cleanly, the report's Budget section gives the spend and says the budget stopped it."""
    res = subprocess.run(
        [sys.executable, str(REPO_ROOT / "studies" / "voc_sweep.py"), "--smoke-test",
         "--storage", str(tmp_path / "s"), "--out", "sweep", "--confirm-top", "0",
         "--max-concurrent", "1", "--budget", "0.0001"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert res.returncode == 0, _log(res)
    study = tmp_path / "s" / "sweep"
    assert len(_trials(study)) == 1
    plan = json.loads((study / "plan.json").read_text())
    assert plan["stopped"] == "budget" and plan["budget"]["spent"] > 0.0001, plan
    report = (study / "report.md").read_text()
    assert "## Budget" in report
    assert "The search stopped for the budget: no further trial fitted in it." in report
