"""Run points of the replayed pruning front as real sweeps, to see them land on it.

    python benchmarks/live_pruning.py          # 2 points of optuna-curve's front, seed 2, order 0

``benchmarks/replay_pruning.py`` decides on recorded curves. This script trains: for one seed
and one of the replay's config orders (:func:`replay_pruning.orders_for`, the same draw), it
runs the 24 recorded configs as one Ray Tune sweep per point, in that order, ``--slots`` at a
time, each trial through the sweeps' trainable (``ctt.tune.trainable.train_ctt``) and the
point's scheduler built as the replay builds it (:func:`replay_pruning.build_scheduler`:
``make_scheduler`` with the warm-up as ``step_offset``). The configs are those the curves were
recorded with (``run_cfg``: same preset, overrides and seed, evaluated at the sweep's cadence).

Per point the JSON holds each trial's last step, live compute seconds and final mIoU, and:

- ``compute``: the CPU seconds the recorded curves charge up to each live trial's last step,
  over those of every config to the end (the replay's clock, with the live decisions);
  ``live_compute_s`` the trials' own measured seconds;
- ``regret``: the seed's best recorded final mIoU minus the recorded final of the config the
  sweep picks (best final among trials that ran to the end); ``finals_match`` whether each
  finished trial's live final equals its recorded one (same machine, same seed);
- the replay's figures for the same point: the sweep of the same seed, order and slots, and
  the spread over all its sweeps (min, 10th and 90th percentile, max), and ``on_front``:
  the live compute inside the replayed range and the live regret at most its 90th percentile.

Trials run with one torch thread each, ``--slots`` at a time, on a local in-process Ray.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import replay_pruning as replay
from common import RESULTS_DIR, fit_fixed_list, metadata, write_json

from ctt.errors import UserError, guarded

DEFAULT_OUT = RESULTS_DIR / "pruning_live.json"
# The sweeps' default setting and the cheapest point of the same family's front at 2 slots.
DEFAULT_POINTS = (
    "optuna-curve:grace_period=200,margin=0.0,n_min_points=3,noise=0.5,reference=step",
    "optuna-curve:grace_period=200,margin=0.0,n_min_points=2,noise=0.5,reference=step",
)


def parse_point(text: str) -> tuple[str, str, dict[str, Any]]:
    """``family:k=v,...`` (the replay's labels) -> (family, setting label, scheduler kwargs)."""
    family, _, setting = text.partition(":")
    if family not in replay.FAMILIES:
        raise UserError(f"--point {text!r}: unknown scheduler family {family!r}; choose one of "
                        f"{', '.join(replay.FAMILIES)}")
    kwargs: dict[str, Any] = {}
    for item in filter(None, setting.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--point {text!r}: {item!r} is not KEY=VALUE")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return family, replay.setting_label(kwargs), kwargs


def replayed(summary: list[dict[str, Any]], family: str, setting: str, slots: int,
             seeds: list[int], n_orders: int, seed: int, order: int) -> dict[str, Any] | None:
    """The replay's figures for one point: its sweep of (seed, order) and its spread."""
    rows = [r for r in summary if (r["family"], r["setting"], r["slots"]) == (family, setting,
                                                                            slots)]
    if not rows:
        return None
    row = rows[0]
    comp, reg = np.asarray(row["compute"]), np.asarray(row["regret"])
    k = seeds.index(seed) * n_orders + order  # the replay lists sweeps by seed, then order
    return {"same_sweep": {"compute": float(comp[k]), "regret": float(reg[k])},
            "compute": {"mean": float(comp.mean()), "min": float(comp.min()),
                        "p10": float(np.percentile(comp, 10)),
                        "p90": float(np.percentile(comp, 90)), "max": float(comp.max())},
            "regret": {"median": float(np.median(reg)), "p90": float(np.percentile(reg, 90)),
                       "max": float(reg.max())}}


def run_point(family: str, kwargs: dict[str, Any], curves: list[replay.Curve],
              runs: dict[int, dict[str, Any]], order: list[int], seed: int, slots: int,
              clock: dict[str, int], meta: dict[str, Any], every: int,
              storage: Path) -> dict[str, Any]:
    """One live sweep of the recorded configs in ``order``; its outcome (module doc)."""
    from record_curves import run_cfg

    configs = [{**run_cfg(meta["preset"], runs[c]["params"], seed, every,
                          meta.get("overrides", {})).to_flat(),
                "variant": meta.get("variant", "ctt"), "seed": seed} for c in order]
    np.random.seed(seed * 1000)  # as the replay: ASHA draws its bracket from NumPy's state
    sched = replay.build_scheduler(family, kwargs, clock, seed)
    name = f"live-{family}-{replay.setting_label(kwargs)}".replace("=", "").replace(",", "-")
    wall, record = fit_fixed_list(configs, storage, name[:120], scheduler=sched,
                                  max_concurrent=slots)
    by_config = {c.config: c for c in curves}
    trials = []
    for t in sorted(record.trials.values(), key=lambda t: t["index"]):
        config = order[t["index"]]
        curve = by_config[config]
        k = int(np.searchsorted(curve.steps, t["step"]))
        trials.append({"config": config, "step": t["step"], "live_compute_s": t["compute_s"],
                       "clock_s": float(curve.cost[min(k, len(curve.cost) - 1)]),
                       "miou_final": t["miou_final"], "recorded_final": curve.final,
                       "error": t["error"]})
    full = sum(float(c.cost[-1]) for c in curves)
    done = [t for t in trials if t["step"] >= clock["iters"] and t["error"] is None]
    best = max(c.final for c in curves)
    picked = max(done, key=lambda t: (t["miou_final"], -t["config"])) if done else None
    return {
        "trials": trials, "wall_s": wall,
        "compute": sum(t["clock_s"] for t in trials) / full,
        "live_compute_s": sum(t["live_compute_s"] for t in trials),
        "picked": picked and picked["config"],
        "regret": None if picked is None else best - picked["recorded_final"],
        "finals_match": all(t["miou_final"] == t["recorded_final"] for t in done),
        "stopped_early": sum(t["step"] < clock["iters"] for t in trials)}


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curves", type=Path, default=replay.DEFAULT_CURVES)
    p.add_argument("--replay", type=Path, default=replay.DEFAULT_OUT,
                   help="replay_pruning.py's JSON, for the replayed figures of each point")
    p.add_argument("--point", action="append", default=None, metavar="FAMILY:K=V,...",
                   help="a scheduler setting as the replay labels it (repeatable; default: "
                   "the sweeps' default and the cheapest point of its front)")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--order", type=int, default=0, help="index of the replay's config order")
    p.add_argument("--orders", type=int, default=20, help="orders the replay drew per seed")
    p.add_argument("--order-seed", type=int, default=0)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--every", type=int, default=200,
                   help="the sweep's evaluation cadence (a multiple of the recorded one)")
    p.add_argument("--storage", type=Path, default=None,
                   help="where Ray keeps the sweeps (default: a temporary directory, removed)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    points = [parse_point(t) for t in (a.point or DEFAULT_POINTS)]
    if a.slots < 1 or a.every < 1 or not 0 <= a.order < a.orders:
        raise UserError(f"need --slots >= 1, --every >= 1 and 0 <= --order < --orders, got "
                        f"{a.slots}, {a.every}, {a.order}, {a.orders}")
    curves_by_seed, _, clock, meta = replay.read_curves(a.curves, a.every)
    if a.seed not in curves_by_seed:
        raise UserError(f"--seed {a.seed}: {a.curves} has complete curves for seeds "
                        f"{sorted(curves_by_seed)} only")
    raw, _ = replay.load_runs(a.curves)
    runs = {int(r["config"]): r for r in raw if int(r["seed"]) == a.seed}
    curves = curves_by_seed[a.seed]
    order = replay.orders_for(len(curves), a.seed, a.orders, a.order_seed)[a.order]
    summary, seeds = [], sorted(curves_by_seed)
    if a.replay.exists():
        rep = json.loads(a.replay.read_text())
        summary, seeds = rep.get("summary", []), rep.get("seeds", seeds)

    from ctt.tune.ray_setup import init_ray
    from ctt.tune.runtime import StudyOptions

    storage = a.storage or Path(tempfile.mkdtemp(prefix="ctt-live-pruning-"))
    init_ray(StudyOptions(name="live-pruning", num_cpus=a.slots))
    out_points = []
    try:
        for family, label, kwargs in points:
            t0 = time.time()
            got = run_point(family, kwargs, curves, runs, order, a.seed, a.slots, clock, meta,
                            a.every, storage.resolve())
            ref = replayed(summary, family, label, a.slots, seeds, a.orders, a.seed, a.order)
            on_front = None if ref is None or got["regret"] is None else bool(
                ref["compute"]["min"] <= got["compute"] <= ref["compute"]["max"]
                and got["regret"] <= ref["regret"]["p90"] + 1e-9)
            out_points.append({"family": family, "setting": label, **got, "replayed": ref,
                               "on_front": on_front})
            same = f"{ref['same_sweep']['compute']:.3f}" if ref else "n/a"
            print(f"{family} [{label}]: compute {got['compute']:.3f} (replay, same order "
                  f"{same}), regret {got['regret']}, "
                  f"{got['stopped_early']}/{len(curves)} stopped early, finals match "
                  f"{got['finals_match']}, on the replayed front: {on_front} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    finally:
        if a.storage is None:
            shutil.rmtree(storage, ignore_errors=True)
    write_json(a.out, {**metadata("cpu", "live_pruning.py", argv, threads=1),
                       "curves": str(a.curves), "seed": a.seed, "order": a.order,
                       "order_configs": order, "slots": a.slots, "every": a.every,
                       "clock": clock, "points": out_points})
    print(f"wrote {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
