"""How far a finished study's wall time is from what its trials needed: the idle-core ratio.

    python benchmarks/study_floor.py studies_out/voc_ablation [--slots 2] [--json PATH]

Reads the study's own records (``study.json`` wall time, ``trials.parquet`` per-trial wall
seconds, the warm-up trials' time from Tune's ``result.json`` files under ``ray/``) and reports
``wall / (sum of trial compute / slots)``: 1.0 means no slot ever waited while work was left.
It also estimates the wall time on more slots by longest-first list scheduling of the measured
trial times (each warm-up before its seed's variants), an estimate, not a measurement.
Writes ``benchmarks/results/study_floor.json`` by default.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from common import RESULTS_DIR, finished_study, metadata, write_json

from ctt.errors import guarded


def _warmup_seconds(study: Path) -> dict[int, float]:
    """Seed -> seconds of its warm-up trial (the last ``time_total_s`` Tune recorded)."""
    out: dict[int, float] = {}
    for path in glob.glob(str(study / "ray" / "warmup_seed*" / "result.json")):
        last = None
        for line in Path(path).read_text().splitlines():
            if line.strip():
                last = json.loads(line)
        if last is not None:
            out[int(last["config"]["seed"])] = float(last["time_total_s"])
    return out


def list_schedule(trials: list[dict[str, Any]], warmups: dict[int, float], slots: int) -> float:
    """Makespan of longest-first list scheduling: warm-ups first, a variant only after its
    seed's warm-up has finished."""
    free = [0.0] * slots
    ready: dict[int, float] = {}
    for seed, secs in sorted(warmups.items(), key=lambda kv: -kv[1]):
        i = min(range(slots), key=free.__getitem__)
        free[i] += secs
        ready[seed] = free[i]
    for t in sorted(trials, key=lambda t: -t["wall_s"]):
        i = min(range(slots), key=free.__getitem__)
        free[i] = max(free[i], ready.get(int(t["seed"]), 0.0)) + t["wall_s"]
    return max(free)


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", help="a finished study directory")
    p.add_argument("--slots", type=int, default=2, help="trials that ran at once")
    p.add_argument("--json", default=str(RESULTS_DIR / "study_floor.json"))
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    study, info = finished_study(a.study)
    wall = float(sum(info.get("wall_s_runs") or [0.0]))
    trials = [t for t in pq.read_table(study / "trials.parquet").to_pylist()
              if t.get("wall_s") is not None]
    warm = _warmup_seconds(study)
    compute = sum(t["wall_s"] for t in trials) + sum(warm.values())
    per_variant: dict[str, list[float]] = {}
    for t in trials:
        per_variant.setdefault(t["variant"], []).append(t["wall_s"])
    res = {
        **metadata("cpu", "study_floor.py", argv, note="reads a finished study's records"),
        "study": os.fspath(study), "study_commit": info.get("env", {}).get("git_commit"),
        "study_cpu": info.get("env", {}).get("cpu"),
        "wall_s": wall, "slots": a.slots, "trial_compute_s": compute,
        "warmup_s": warm, "variant_mean_s": {k: sum(v) / len(v) for k, v in per_variant.items()},
        "idle_ratio": wall / (compute / a.slots) if compute else None,
        "estimated_wall_s": {n: list_schedule(trials, warm, n) for n in (2, 4, 8)},
    }
    path = write_json(a.json, res)
    print(f"wall {wall / 60:.1f} min; trial compute {compute:.0f} s on {a.slots} slots -> "
          f"wall / (compute / slots) = {res['idle_ratio']:.3f}; estimated wall on 2/4/8 slots: "
          + ", ".join(f"{v / 60:.1f} min" for v in res["estimated_wall_s"].values())
          + f"; {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
