"""Two finished runs of the same study, trial by trial: are they the same numbers?

    python benchmarks/compare_studies.py BEFORE_DIR AFTER_DIR [--json PATH]

Reads each study's own records (``study.json``, ``trials/*/trial.json``) and pairs the trials by
(variant, seed). For each it prints and records ``miou_final`` and ``miou_best`` of both runs
and whether they are bit-identical; then each run's ablation table and paired comparisons
(the rows of its ``report.md``), its wall time, commit and CPU. Same seeds on the same machine
must give the same numbers, so two commits whose trials are identical here changed no result
(a refactor's proof). Exits 1 when a pair differs. Writes
``benchmarks/results/compare_studies.json`` by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, metadata, write_json

from ctt.errors import UserError, guarded

DEFAULT_OUT = RESULTS_DIR / "compare_studies.json"
VALUES = ("miou_final", "miou_best")


def read_study(study_dir: Path) -> dict[str, Any]:
    """The study's record, its trials by (variant, seed) and its ablation rows."""
    from ctt.tune.tables import ablation_rows, comparison_rows, load_study_json, load_trials

    if not (study_dir / "study.json").is_file():
        raise UserError(f"{study_dir} holds no finished study (no study.json): pass the "
                        "directory of a study, <storage>/<name>")
    study, trials = load_study_json(study_dir), load_trials(study_dir)
    env = study.get("env") or {}
    return {
        "dir": str(study_dir), "commit": env.get("git_commit"),
        "cpu": env.get("cpu"), "wall_s": (study.get("wall_s_runs") or [None])[-1],
        "trials": {(t["variant"], int(t["seed"])): t for t in trials},
        "rows": [{k: r.get(k) for k in ("variant", "seeds", "final_mean", "final_std",
                                         "best_mean", "best_std", "delta", "p")}
                 for r in ablation_rows(trials, study)],
        "comparisons": comparison_rows(trials, study),
    }


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--json", type=Path, default=DEFAULT_OUT)
    p.add_argument("--note", default="", help="free text kept in the JSON (e.g. what each run "
                   "ran beside it, which tree a run without a git checkout came from)")
    a = p.parse_args(argv)
    runs = {"before": read_study(a.before), "after": read_study(a.after)}
    keys = sorted(set(runs["before"]["trials"]) | set(runs["after"]["trials"]))
    pairs, identical = [], True
    for variant, seed in keys:
        got = {name: run["trials"].get((variant, seed)) for name, run in runs.items()}
        row: dict[str, Any] = {"variant": variant, "seed": seed}
        for key in VALUES:
            for name, trial in got.items():
                row[f"{key}_{name}"] = None if trial is None else trial.get(key)
            row[f"{key}_identical"] = row[f"{key}_before"] == row[f"{key}_after"]
            identical &= row[f"{key}_identical"]
        pairs.append(row)
        same = all(row[f"{key}_identical"] for key in VALUES)
        print(f"{variant:>14} seed {seed}: final {row['miou_final_before']} -> "
              f"{row['miou_final_after']}, best {row['miou_best_before']} -> "
              f"{row['miou_best_after']}{'' if same else '  DIFFERS'}")
    for name, run in runs.items():
        wall = run["wall_s"]
        print(f"{name}: commit {run['commit']}, wall "
              f"{'?' if wall is None else f'{wall / 60:.1f} min'}, {run['cpu']}")
    print("bit-identical" if identical else "the runs differ")
    out = {**metadata("cpu", "compare_studies.py", argv, note=a.note), "identical": identical,
           "trials": pairs,
           "runs": {name: {k: v for k, v in run.items() if k != "trials"}
                    for name, run in runs.items()}}
    write_json(a.json, out)
    print(f"wrote {a.json}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
