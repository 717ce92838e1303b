"""The report's ``## Questions`` section (ctt.tune.report.assess_questions, render_questions,
questions_summary): each question's estimate, interval and verdict against a slow reference
written out here (the t quantile from scipy, the Bonferroni and spending levels by hand), for
a fixed and an adaptive study, with plan.json's spend and stop reason, a missing variant, and
no section for studies that ask no question (old study.json files included)."""

from __future__ import annotations

import json
import math

import pytest
import scipy.stats

from ctt.tune.report import (
    _fmt_confidence,
    assess_questions,
    questions_summary,
    render_report,
)
from ctt.tune.results import build_results
from ctt.tune.stats import seeds_needed
from ctt.tune.tables import load_study_json, load_trials

ALPHA = 0.05
DELTA = 1.0

# --- writing a study directory ----------------------------------------------------------------


def write_trial(root, tid, variant, seed, value, status="TERMINATED", **fields):
    d = root / "trials" / tid
    d.mkdir(parents=True)
    info = {"trial_id": tid, "variant": variant, "seed": seed, "status": status,
            "error": None, "pruned": False,
            "config": {"variant": variant, "seed": seed, "run.seed": seed},
            "step": 4, "miou_final": value, "miou_best": value}
    info.update(fields)
    (d / "trial.json").write_text(json.dumps(info))
    (d / "metrics.jsonl").write_text("")


def write_study(root, values, study, plan=None):
    """``values``: {variant: {seed: miou_final}}."""
    for variant, per_seed in values.items():
        for seed, v in per_seed.items():
            write_trial(root, f"{variant}_{seed}", variant, seed, v)
    (root / "study.json").write_text(json.dumps(study))
    if plan is not None:
        (root / "plan.json").write_text(json.dumps(plan))


def report_of(root):
    return render_report(str(root), load_trials(root), load_study_json(root))


def question_table(report):
    """The rows of the ``## Questions`` table as lists of cells (header and rule dropped)."""
    section = report[report.index("## Questions"):]
    section = section[:section.index("\n## ")]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows[1:]]


# --- the slow reference -------------------------------------------------------------------------

def ref_row(a, b, seeds, level, delta=DELTA):
    """Question ``a - b`` over ``seeds`` (those both have) at the two-sided error ``level``:
    (estimate, low, high, n, verdict words), by hand."""
    d = [a[s] - b[s] for s in seeds if s in a and s in b]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    q = scipy.stats.t.ppf(1 - level / 2, n - 1)
    lo, hi = mean - q * sd / math.sqrt(n), mean + q * sd / math.sqrt(n)
    if lo > 0:
        words = "resolved: {a} > {b}"
    elif hi < 0:
        words = "resolved: {a} < {b}"
    elif -delta < lo and hi < delta:
        words = f"smaller than δ = {delta}"
    else:
        words = "open"
    return mean, lo, hi, n, words, sd


def ref_cells(name_a, name_b, ref, level):
    mean, lo, hi, n, words, _ = ref
    return [f"{name_a} − {name_b}", f"{mean:+.2f}",
            f"[{lo:+.2f}, {hi:+.2f}] ({100 * (1 - level):.{_decimals(level)}f} %)", str(n),
            words.format(a=name_a, b=name_b)]


def _decimals(level):
    # one decimal for the usual levels (99.2 %), more where the miss is smaller than 0.1 %
    d = 1
    while round(100 * level, d) == 0 or 10 ** -d > 100 * level:
        d += 1
    return d


# --- a fixed study ---------------------------------------------------------------------------

CROSS = {0: 55.0, 1: 56.2, 2: 54.1, 3: 55.7, 4: 56.9, 5: 54.8}


def fixed_values():
    return {
        "cross": dict(CROSS),
        # resolved above: a steady +1.5
        "ctt": {s: v + d for (s, v), d in zip(CROSS.items(), [1.5, 1.7, 1.4, 1.6, 1.55, 1.45])},
        # within delta: a tight difference near 0
        "mean_teacher": {s: v + d for (s, v), d in zip(CROSS.items(),
                                                       [0.1, -0.1, 0.05, 0.0, -0.05, 0.1])},
        # open: noisy
        "dual_self": {s: v + d for (s, v), d in zip(CROSS.items(), [2, -1.5, 0.5, 3, -2, 1])},
        # resolved below (as supervised - ctt)
        "supervised": {s: v - 5 + 0.1 * (s % 3) for s, v in CROSS.items()},
    }


FIXED_QUESTIONS = ["mean_teacher/cross", "dual_self/cross", "supervised/ctt", "ctt/cross"]


def test_fixed_study_rows_match_the_reference_in_question_order(tmp_path):
    values = fixed_values()
    write_study(tmp_path, values, {
        "name": "fixed", "kind": "ablation", "seeds": list(CROSS),
        "options": {"questions": FIXED_QUESTIONS, "delta": DELTA, "adaptive": False,
                    "max_seeds": 10, "budget": None}})
    report = report_of(tmp_path)
    assert report.index("## Questions") < report.index("## Ablation")
    assert "| supervised |" in report and "## Paired comparisons" in report  # tables kept
    assert "Bonferroni level α/m = 0.05/4" in report and "one look at all 6 seeds" in report

    m = len(FIXED_QUESTIONS)
    level = ALPHA / m  # one look: the whole alpha, split over the questions
    rows = question_table(report)
    assert [r[0] for r in rows] == [q.replace("/", " − ") for q in FIXED_QUESTIONS]
    rep = assess_questions(load_trials(tmp_path), load_study_json(tmp_path))
    verdicts = []
    for text, cells, row in zip(FIXED_QUESTIONS, rows, rep.rows):
        a, b = text.split("/")
        ref = ref_row(values[a], values[b], sorted(CROSS), level)
        assert cells[:5] == ref_cells(a, b, ref, level)
        assert row.result.estimate == pytest.approx(ref[0], abs=1e-12)
        assert row.result.ci_low == pytest.approx(ref[1], rel=1e-10)
        assert row.result.ci_high == pytest.approx(ref[2], rel=1e-10)
        assert row.result.level == pytest.approx(level, rel=1e-12)
        if ref[4] == "open":  # what a fixed design at alpha/m would need to detect delta
            need = seeds_needed(ref[5], DELTA, alpha=level)
            assert cells[5] == f"{need} seeds" and need > len(CROSS)
        else:
            assert cells[5] == "-"
        verdicts.append(cells[4])
    assert verdicts == ["smaller than δ = 1.0", "open", "resolved: supervised < ctt",
                        "resolved: ctt > cross"]
    assert "Spend:" not in report and "Stopped:" not in report  # no plan.json

    # the terminal lines: the same cells, aligned
    lines = questions_summary(tmp_path)
    assert lines[0].startswith("questions (fixed design, family-wise α = 0.05, δ = 1.0")
    assert lines[1].split()[:2] == ["question", "estimate"]
    assert set(lines[2]) <= {"-", " "}
    for cells, line in zip(rows, lines[3:]):
        for c in cells:
            assert c in line
    assert len(lines) == 3 + len(rows)


def test_fixed_study_needs_two_seeds(tmp_path):
    write_study(tmp_path, {"ctt": {0: 50.0}, "cross": {0: 49.0}}, {
        "name": "one", "kind": "ablation", "seeds": [0],
        "options": {"questions": ["ctt/cross"], "delta": 1.0}})
    report = report_of(tmp_path)
    assert "## Questions\n\nThe questions need at least 2 seeds with results" in report
    assert "1 so far" in report
    assert questions_summary(tmp_path)[1].startswith("The questions need at least 2 seeds")


def test_missing_variant_row_says_so_and_counts_in_the_family(tmp_path):
    values = {"ctt": fixed_values()["ctt"], "cross": dict(CROSS)}
    write_study(tmp_path, values, {
        "name": "missing", "kind": "ablation", "seeds": list(CROSS),
        "options": {"questions": ["ctt/cross", "ghost/cross", "ctt/broken"], "delta": 1.0}})
    for s in range(3):  # a variant whose trials all failed has no row either
        write_trial(tmp_path, f"broken_{s}", "broken", s, None, status="ERROR",
                    error="loss is NaN")
    rows = question_table(report_of(tmp_path))
    level = ALPHA / 3  # the family is still three questions
    assert rows[0][:5] == ref_cells("ctt", "cross",
                                    ref_row(values["ctt"], CROSS, sorted(CROSS), level), level)
    assert rows[1] == ["ghost − cross", "n/a", "n/a", "0", "open; no finished trial of ghost",
                       "n/a"]
    assert rows[2] == ["ctt − broken", "n/a", "n/a", "0", "open; no finished trial of broken",
                       "n/a"]


# --- an adaptive study ---------------------------------------------------------------------------

def spend_levels(initial, max_seeds, m, rho=10.0):
    """alpha · w_k / m per look, the w_k as increments of (n_k / max_seeds) ** rho, by hand."""
    out, before = [], 0.0
    for n in range(initial, max_seeds + 1):
        now = (n / max_seeds) ** rho
        out.append(ALPHA * (now - before) / m)
        before = now
    return out


def test_adaptive_study_replays_plan_order_with_budget_stop(tmp_path):
    order = [5, 0, 2, 4, 1]  # released: the initial 3, then one round each; seed 3 never ran
    # q1 closes at the first look on the first 3 seeds of this order (not of sorted seeds):
    # a very steady +5 on seeds 5, 0, 2 only (its variants ran no further round)
    a = {5: 60.0, 0: 61.0, 2: 59.0}
    b = {5: 55.0, 0: 56.01, 2: 53.99}
    # q2 stays open through the 3 looks (3, 4, 5 seeds): noisy
    c = {5: 50.0, 0: 51.0, 2: 49.5, 4: 50.5, 1: 52.0}
    d = {5: 49.0, 0: 52.5, 2: 48.0, 4: 51.5, 1: 50.0}
    # q3 shares d, within delta from the second look on
    e = {5: 49.1, 0: 52.4, 2: 48.05, 4: 51.45, 1: 50.1}
    values = {"a": a, "b": b, "c": c, "d": d, "e": e}
    questions = ["a/b", "c/d", "e/d"]
    write_study(tmp_path, values, {
        "name": "adaptive", "kind": "ablation", "seeds": [0, 1, 2],
        "options": {"questions": questions, "delta": 1.0, "adaptive": True, "max_seeds": 6,
                    "budget": 2.0}},
        plan={"seed_order": order, "stopped": "budget",
              "budget": {"cap": 2.0, "unit": "core-hours", "estimated": 1.7, "spent": 1.5},
              "rounds": [{"seed": 4, "variants": ["c", "d", "e"]},
                         {"seed": 1, "variants": ["c", "d", "e"]}]})
    report = build_results(tmp_path)["report"]  # the report.md the study's results write
    assert (tmp_path / "report.md").read_text() == report
    levels = spend_levels(3, 6, len(questions))
    assert sum(spend_levels(3, 6, 1)) == pytest.approx(ALPHA)

    # the reference replays the looks: a question closes at its first verdict
    ref = {}
    for k, n in enumerate(range(3, 6)):
        for q in questions:
            if q in ref and ref[q][1][4] != "open":
                continue
            x, y = q.split("/")
            ref[q] = (levels[k], ref_row(values[x], values[y], order[:n], levels[k]))
    rows = question_table(report)
    assert len(rows) == 3
    for q, cells in zip(questions, rows):
        x, y = q.split("/")
        level, r = ref[q]
        expected = ref_cells(x, y, r, level)
        if r[4] == "open":
            expected[4] = "open: budget"
        assert cells[:5] == expected
    assert rows[0][3] == "3" and rows[0][4] == "resolved: a > b"  # closed at the first look
    assert rows[0][2].endswith(f"({100 * (1 - levels[0]):.{_decimals(levels[0])}f} %)")
    assert "100.0 %" not in report  # a tiny first-look level is not rounded up to 100 %
    assert rows[1][4] == "open: budget" and rows[1][5].endswith(" seeds")
    # closed at the second look (4 seeds): it keeps that look though 5 seeds have results
    assert rows[2][4] == "smaller than δ = 1.0" and rows[2][3] == "4"
    assert ref["e/d"][0] == levels[1]

    assert ("\nSpend: 1.50 of 2.00 core-hours (estimated 1.70 before the trials ran).\n"
            in report)
    assert "Stopped: the next round would have gone past the budget." in report
    assert "Adaptive design" in report and "up to 6" in report
    assert "sorted seed order" not in report

    lines = questions_summary(tmp_path)
    assert lines[-2:] == ["Spend: 1.50 of 2.00 core-hours (estimated 1.70 before the trials "
                          "ran).", "Stopped: the next round would have gone past the budget."]


def test_adaptive_without_plan_json_replays_sorted_seeds(tmp_path):
    values = {"ctt": fixed_values()["ctt"], "cross": dict(CROSS)}
    write_study(tmp_path, values, {
        "name": "running", "kind": "ablation", "seeds": [0, 1, 2],
        "options": {"questions": ["ctt/cross"], "delta": 1.0, "adaptive": True,
                    "max_seeds": 8}})
    report = report_of(tmp_path)
    assert "replayed in sorted seed order" in report
    assert "Spend:" not in report and "Stopped:" not in report
    rep = assess_questions(load_trials(tmp_path), load_study_json(tmp_path))
    assert rep.looks >= 1 and rep.rows[0].result.n >= 3


def test_adaptive_max_seeds_stop_and_no_look_yet(tmp_path):
    values = {"c": {0: 50.0, 1: 51.0, 2: 49.5}, "d": {0: 49.0, 1: 52.5, 2: 48.0}}
    study = {"name": "s", "kind": "ablation", "seeds": [0, 1, 2],
             "options": {"questions": ["c/d"], "delta": 1.0, "adaptive": True,
                         "max_seeds": 3}}
    rep = assess_questions([{"trial_id": f"{v}{s}", "variant": v, "seed": s,
                             "status": "TERMINATED", "miou_final": x}
                            for v, per in values.items() for s, x in per.items()],
                           study, {"seed_order": [0, 1, 2], "stopped": "max_seeds"})
    assert rep.rows[0].verdict == "open: max seeds"
    # two of the three initial seeds: no look yet
    rep = assess_questions([{"trial_id": f"{v}{s}", "variant": v, "seed": s,
                             "status": "TERMINATED", "miou_final": x}
                            for v, per in values.items() for s, x in per.items() if s < 2],
                           study, {"seed_order": [0, 1], "stopped": ""})
    assert not rep.rows and rep.note.startswith("No look yet: the first look needs 3 seeds")


# --- studies that ask nothing ------------------------------------------------------------------

@pytest.mark.parametrize("study", [
    {"name": "none", "kind": "ablation", "seeds": [0, 1, 2],
     "options": {"questions": [], "delta": 1.0, "adaptive": False, "max_seeds": 10}},
    {"name": "old", "kind": "ablation", "seeds": [0, 1, 2],
     "options": {"preset": "tiny", "seeds": [0, 1, 2]}},  # written before the new keys
    {"name": "older"},  # no options at all
], ids=["no-questions", "old-options", "no-options"])
def test_no_questions_no_section(tmp_path, study):
    write_study(tmp_path, {"ctt": fixed_values()["ctt"], "cross": dict(CROSS)}, study)
    report = report_of(tmp_path)
    assert "## Questions" not in report and "## Ablation" in report
    assert questions_summary(tmp_path) == []


def test_unreadable_questions_and_plan_json_do_not_break_the_report(tmp_path):
    write_study(tmp_path, {"ctt": fixed_values()["ctt"], "cross": dict(CROSS)}, {
        "name": "bad", "kind": "ablation", "seeds": [0, 1, 2],
        "options": {"questions": ["ctt-cross"], "delta": 1.0}})
    (tmp_path / "plan.json").write_text("{not json")
    report = report_of(tmp_path)
    assert "The questions in study.json could not be read: question 'ctt-cross'" in report
    assert "## Ablation" in report


@pytest.mark.parametrize("error,text", [(0.05, "95.0 %"), (0.05 / 6, "99.2 %"),
                                        (3e-4, "99.97 %"), (2.4e-7, "99.99998 %"),
                                        (0.0, "100 %")])
def test_confidence_shown_short_of_100(error, text):
    assert _fmt_confidence(error) == text


def test_fixed_study_with_a_budget_shows_the_spend_and_plain_open(tmp_path):
    values = fixed_values()
    write_study(tmp_path, {v: values[v] for v in ("cross", "dual_self")}, {
        "name": "capped", "kind": "ablation", "seeds": list(CROSS),
        "options": {"questions": ["dual_self/cross"], "delta": 1.0, "budget": 3.0}},
        plan={"adaptive": False, "seed_order": list(CROSS), "rounds": [], "stopped": "",
              "budget": {"cap": 3.0, "unit": "GPU-hours", "estimated": 2.5, "spent": 0.05}})
    report = report_of(tmp_path)
    assert question_table(report)[0][4] == "open"  # a fixed study has no rounds to stop
    assert "\nSpend: 0.05 of 3.00 GPU-hours (estimated 2.50 before the trials ran).\n" in report
    assert "Stopped" not in report and "Not stopped" not in report
