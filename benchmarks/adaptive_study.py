"""A finished ``--adaptive`` study's outcome, for the README: each question's verdict, the seeds
each variant ran, the spend against ``--budget`` next to the cost model's estimate, and the
wall time.

    python benchmarks/adaptive_study.py studies_out/voc_ablation [--json PATH] [--note TEXT]

Reads the study's own records (``study.json``, ``plan.json``, ``trials.parquet``) through the
report's code (:func:`ctt.tune.report.assess_questions`), so the JSON says what ``report.md``
says. Writes ``benchmarks/results/adaptive_study.json`` by default.
"""

from __future__ import annotations

import argparse
import os
import sys

import pyarrow.parquet as pq
from common import RESULTS_DIR, finished_study, metadata, write_json

from ctt.errors import UserError, guarded
from ctt.tune.report import assess_questions, load_plan_record


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", help="a finished study directory")
    p.add_argument("--json", default=str(RESULTS_DIR / "adaptive_study.json"))
    p.add_argument("--note", default="")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    study, info = finished_study(a.study)
    plan = load_plan_record(study)
    trials = pq.read_table(study / "trials.parquet").to_pylist()
    rep = assess_questions(trials, info, plan)
    if rep is None:
        raise UserError(f"{study} asks no questions: nothing to record")
    seeds: dict[str, list[int]] = {}
    for t in trials:
        seeds.setdefault(t["variant"], []).append(int(t["seed"]))
    rows = []
    for row in rep.rows:
        r = row.result
        rows.append({
            "question": str(row.question), "verdict": row.verdict,
            "estimate": None if r is None else r.estimate,
            "ci": None if r is None else [r.ci_low, r.ci_high],
            "level": None if r is None else r.level, "seeds": None if r is None else r.n,
            "closed_at_look": None if r is None or not r.closed else r.look,
            "fixed_design_seeds": row.fixed_seeds})
    res = {
        **metadata("cpu", "adaptive_study.py", argv, note=a.note),
        "study": os.fspath(study), "study_command": info.get("command"),
        "study_commit": info.get("env", {}).get("git_commit"),
        "study_cpu": info.get("env", {}).get("cpu"),
        "options": {k: info.get("options", {}).get(k)
                    for k in ("seeds", "adaptive", "max_seeds", "delta", "budget",
                              "questions")},
        "wall_s": float(sum(info.get("wall_s_runs") or [0.0])),
        "stopped": (plan or {}).get("stopped"), "budget": (plan or {}).get("budget"),
        "seed_order": (plan or {}).get("seed_order"), "rounds": (plan or {}).get("rounds"),
        "seeds_per_variant": {v: sorted(s) for v, s in sorted(seeds.items())},
        "trials": len(trials), "questions": rows,
    }
    path = write_json(a.json, res)
    print("\n".join(f"{q['question']}: {q['verdict']}" for q in rows))
    b = res["budget"] or {}
    print(f"{len(trials)} trials; spend {b.get('spent')} of {b.get('cap')} {b.get('unit')}; "
          f"wall {res['wall_s'] / 60:.1f} min; {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
