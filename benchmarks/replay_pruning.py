"""Replay recorded learning curves through the real schedulers: compute versus regret.

    python benchmarks/replay_pruning.py                       # benchmarks/results/curves_tiny.json
    python benchmarks/replay_pruning.py --curves /path/curves_tiny.partial.jsonl --quick

The curves (``benchmarks/record_curves.py``: every config of the sweep space trained to the end
on each seed, evaluated every 100 iterations with its cumulative CPU cost) are replayed as
sweeps, without training anything. For each seed, each of ``--orders`` random config orders
(seeded, the same for every scheduler), each slot count and each scheduler setting:

- **Clock**: a trial occupies one slot from its launch to its stop or end; trials launch in
  order as slots free. Its cost up to an evaluation is its measured CPU seconds there at the
  sweep's cadence (``--every``, 200 iterations by default: every other recorded point; the
  recorded evaluations that the sweep would not run are taken off the cost).
- **Decisions**: at each evaluation the scheduler a sweep would use decides, through the calls
  Tune makes (``on_trial_add``, ``on_trial_result(controller, trial, result)``,
  ``on_trial_complete`` with the last result once a trial stops or ends) on real
  ``ray.tune.experiment.Trial`` objects. Schedulers come from
  :func:`ctt.tune.schedulers.make_scheduler` with the warm-up as ``step_offset`` (grace
  periods and rungs count from its end) and no searcher: the project's
  ``OptunaPrunerScheduler`` for every ``optuna-*`` pruner (``optuna-curve`` is
  :class:`ctt.tune.curve_pruner.CurvePruner`), the ``_WarmupASHA`` wrapper of Ray's
  ``ASHAScheduler`` for ``asha``, FIFO for ``none``.
- **Outcome**: the sweep picks the best final mIoU among the trials that ran to the end (how a
  sweep ranks). *Compute fraction*: CPU seconds consumed over those of running every config to
  the end. *Regret*: the seed's best final mIoU over all configs minus the picked config's.
  *Time fraction*: the sweep's makespan over the unpruned sweep's (same order and slots).

Per (scheduler, setting, slots) the JSON holds the mean and median compute fraction, median
and 90th-percentile regret and P(regret <= 1 mIoU) over orders x seeds, plus each sweep's
numbers; per family and slot count the Pareto front (mean compute fraction vs median regret)
and whether each Optuna family's front dominates ASHA's. The plot draws the fronts with the
target box (<= 35 % compute, <= 1 mIoU median regret).

Only seeds with every config recorded are replayed (a partial file's unfinished seed is left
out and named in the JSON).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import multiprocessing as mp
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CURVES = ROOT / "benchmarks" / "results" / "curves_tiny.json"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "pruning_replay.json"
DEFAULT_PLOT = ROOT / "docs" / "pruning_pareto.png"
TARGET_COMPUTE = 0.35  # the target box: <= 35 % of the unpruned compute ...
TARGET_REGRET = 1.0  # ... at a median regret <= 1 mIoU
FAMILIES = ("none", "optuna-median", "optuna-percentile", "optuna-sha", "optuna-hyperband",
            "optuna-curve", "asha")


def _grid(base: dict[str, Any], **axes: Sequence[Any]) -> list[dict[str, Any]]:
    out = [dict(base)]
    for key, values in axes.items():
        out = [{**o, key: v} for o in out for v in values]
    return out


# Aggressiveness settings per family: make_scheduler keyword arguments. ``grace_period`` counts
# iterations from the warm-up's end (200, 400, 600: one to three sweep evaluations).
SETTINGS: dict[str, list[dict[str, Any]]] = {
    "none": [{"grace_period": 0}],
    "optuna-median": _grid({}, grace_period=(200, 400), n_startup_trials=(1, 2, 5)),
    "optuna-percentile": _grid({}, grace_period=(200, 400), percentile=(10.0, 25.0),
                               n_startup_trials=(1, 2)),
    "optuna-sha": _grid({}, grace_period=(200, 400), reduction_factor=(2, 3, 4)),
    "optuna-hyperband": _grid({}, grace_period=(200, 400), reduction_factor=(2, 3, 4)),
    # noise: the least scatter assumed around the fit (tiny's val mIoU moves by 1-2 points
    # between evaluations); with it 2 points suffice for a (wide) forecast. n_min_points 3:
    # the first decision one evaluation later (slow starters show their climb by then)
    # top_k 3: 3 trials can finish for a top-3 confirmation (ctt.tune.schedulers.make_pruner)
    "optuna-curve": _grid({"grace_period": 200}, reference=("complete", "step"),
                          margin=(0.0, 1.0, 2.0), noise=(0.5, 1.0), n_min_points=(2, 3),
                          top_k=(1, 3)),
    "asha": _grid({}, grace_period=(200, 400, 600), reduction_factor=(2, 3, 4)),
}
QUICK_SETTINGS: dict[str, list[dict[str, Any]]] = {
    "none": [{"grace_period": 0}],
    "optuna-median": [{"grace_period": 200, "n_startup_trials": 1}],
    "optuna-percentile": [{"grace_period": 200, "percentile": 25.0, "n_startup_trials": 1}],
    "optuna-sha": [{"grace_period": 200, "reduction_factor": 3}],
    "optuna-hyperband": [{"grace_period": 200, "reduction_factor": 3}],
    "optuna-curve": [{"grace_period": 200, "reference": "step", "margin": 1.0, "noise": 1.0,
                      "n_min_points": 2}],
    "asha": [{"grace_period": 200, "reduction_factor": 3}],
}


def setting_label(kwargs: dict[str, Any]) -> str:
    """A short stable name of a setting, e.g. ``grace_period=200,reduction_factor=3``."""
    return ",".join(f"{k}={v}" for k, v in sorted(kwargs.items())) or "default"


# --- curves -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Curve:
    """One config's unpruned run on one seed, at the sweep's cadence.

    ``steps``, ``miou`` and ``cost`` are ``(n,)``: the evaluation steps (iterations), the val
    mIoU there and the cumulative CPU seconds to reach and run that evaluation."""

    config: int
    steps: tuple[int, ...]
    miou: tuple[float, ...]
    cost: tuple[float, ...]

    @property
    def final(self) -> float:
        return self.miou[-1]

    @property
    def total(self) -> float:
        return self.cost[-1]


def load_runs(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The runs of a curves file (``record_curves.py``'s final JSON, or its ``.partial.jsonl``
    of one run per line) and the final JSON's metadata (empty for the partial file)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()], {}
    data = json.loads(text)
    return data["runs"], {k: v for k, v in data.items() if k != "runs"}


def at_cadence(run: dict[str, Any], every: int) -> Curve:
    """The run's curve as a sweep evaluating every ``every`` iterations sees it: the points at
    multiples of ``every`` (and the last one), each costing the training CPU seconds up to it
    plus the evaluations at the kept points only."""
    points = run["points"]
    iters = int(run["iters"])
    if not points or int(points[-1]["step"]) != iters:
        raise ValueError(f"config {run.get('config')} seed {run.get('seed')}: the curve must "
                         f"end with an evaluation at iters={iters}")
    steps, miou, cost = [], [], []
    eval_kept, eval_prev = 0.0, 0.0
    for p in points:
        step = int(p["step"])
        eval_here = float(p["eval_cpu_s"]) - eval_prev  # this evaluation's CPU seconds
        eval_prev = float(p["eval_cpu_s"])
        if step % every and step != iters:
            continue
        eval_kept += eval_here
        steps.append(step)
        miou.append(float(p["miou"]))
        cost.append(float(p["cpu_s"]) - float(p["eval_cpu_s"]) + eval_kept)
    return Curve(int(run["config"]), tuple(steps), tuple(miou), tuple(cost))


def curves_by_seed(runs: list[dict[str, Any]], every: int
                   ) -> tuple[dict[int, list[Curve]], list[int], dict[str, int]]:
    """``{seed: curves sorted by config}`` for the seeds holding the most configs (the complete
    ones), the seeds left out, and the clock (``warmup_iters``, ``iters``) shared by all runs."""
    clocks = {(int(r["warmup_iters"]), int(r["iters"])) for r in runs}
    if len(clocks) != 1:
        raise ValueError(f"runs disagree on (warmup_iters, iters): {sorted(clocks)}")
    warmup, iters = clocks.pop()
    by_seed: dict[int, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_seed.setdefault(int(r["seed"]), {})[int(r["config"])] = r
    full = max(len(v) for v in by_seed.values())
    keep = {s: v for s, v in sorted(by_seed.items()) if len(v) == full}
    dropped = sorted(set(by_seed) - set(keep))
    curves = {s: [at_cadence(v[c], every) for c in sorted(v)] for s, v in keep.items()}
    return curves, dropped, {"warmup_iters": warmup, "iters": iters}


# --- one simulated sweep ------------------------------------------------------------------------

@dataclass
class ReplayOutcome:
    """What one simulated sweep did: CPU seconds consumed, its makespan (seconds), the step
    each config stopped at (``{config: step}``) and the config it picks (None: no trial ran to
    the end)."""

    consumed: float
    makespan: float
    stopped: dict[int, int]
    picked: int | None


def simulate(curves: Sequence[Curve], order: Sequence[int], slots: int, scheduler: Any, *,
             max_t: int) -> ReplayOutcome:
    """Run one sweep of ``curves`` (indexed by ``order``: the launch order) on ``slots``
    parallel slots with ``scheduler`` deciding at every evaluation, as TuneController does:
    ``on_trial_add`` at launch, ``on_trial_result`` per evaluation, and once the trial is
    stopped (``STOP``) or reaches its last evaluation, ``on_trial_complete`` with its last
    result marked ``done``. Events at equal times run in launch order."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    queue = list(order)[::-1]  # pop() launches the next config
    events: list[tuple[float, int, int]] = []  # (time, launch number, point index)
    running: dict[int, tuple[Curve, Trial, float]] = {}  # launch number -> curve, trial, start
    stopped: dict[int, int] = {}
    consumed = makespan = 0.0
    launched = 0

    def launch(now: float) -> None:
        nonlocal launched
        curve = curves[queue.pop()]
        trial = Trial("replay", config={"config": curve.config},
                      trial_id=f"{launched:05d}_c{curve.config}", stub=True)
        scheduler.on_trial_add(None, trial)
        running[launched] = (curve, trial, now)
        heapq.heappush(events, (now + curve.cost[0], launched, 0))
        launched += 1

    while queue and len(running) < slots:
        launch(0.0)
    while events:
        now, number, k = heapq.heappop(events)
        curve, trial, start = running[number]
        result = {"step": curve.steps[k], "miou": curve.miou[k], "training_iteration": k + 1,
                  "done": False, "trial_id": trial.trial_id}
        decision = scheduler.on_trial_result(None, trial, result)
        if decision not in (TrialScheduler.CONTINUE, TrialScheduler.STOP):
            raise RuntimeError(f"{type(scheduler).__name__} returned {decision!r}; the replay "
                               "models CONTINUE and STOP only")
        if decision == TrialScheduler.STOP or k == len(curve.steps) - 1:
            scheduler.on_trial_complete(None, trial, {**result, "done": True})
            del running[number]
            stopped[curve.config] = curve.steps[k]
            consumed += curve.cost[k]
            makespan = max(makespan, now)
            if queue:
                launch(now)
        else:
            heapq.heappush(events, (start + curve.cost[k + 1], number, k + 1))
    finals = {c.config: c.final for c in curves}
    done = [c for c, step in stopped.items() if step >= max_t]
    picked = max(done, key=lambda c: (finals[c], -c)) if done else None
    return ReplayOutcome(consumed, makespan, stopped, picked)


def build_scheduler(family: str, kwargs: dict[str, Any], clock: dict[str, int],
                    seed: int = 0) -> Any:
    """The scheduler a sweep on ``clock`` would use (no searcher: the scheduler's own study)."""
    from ctt.tune.schedulers import make_scheduler

    kw = dict(kwargs)
    grace = kw.pop("grace_period", 0)
    return make_scheduler(family, max_t=clock["iters"], grace_period=grace,
                          step_offset=clock["warmup_iters"], searcher=None, seed=seed, **kw)


def orders_for(n_configs: int, seed: int, n_orders: int, order_seed: int) -> list[list[int]]:
    """``n_orders`` launch orders of ``n_configs`` configs for one seed (the same for every
    scheduler, so settings are compared on the same draws)."""
    rng = np.random.default_rng([order_seed, seed])
    return [rng.permutation(n_configs).tolist() for _ in range(n_orders)]


# --- many sweeps --------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _init_worker(curves: dict[int, list[Curve]], clock: dict[str, int],
                 orders: dict[int, list[list[int]]],
                 base: dict[tuple[int, int, int], float]) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", module="optuna")
    _STATE.update(curves=curves, clock=clock, orders=orders, base=base)


def _unpruned_makespans(curves: dict[int, list[Curve]], clock: dict[str, int],
                        orders: dict[int, list[list[int]]], slots: Sequence[int]
                        ) -> dict[tuple[int, int, int], float]:
    """``{(seed, order, slots): makespan}`` of the unpruned sweeps (the time fraction's
    denominator)."""
    return {(seed, i, n): simulate(curves[seed], order, n,
                                   build_scheduler("none", {}, clock), max_t=clock["iters"]
                                   ).makespan
            for seed, seed_orders in orders.items() for i, order in enumerate(seed_orders)
            for n in slots}


def _run_task(task: tuple[str, dict[str, Any], int, int]) -> list[dict[str, Any]]:
    """All orders of one seed for one (family, setting, slots)."""
    family, kwargs, slots, seed = task
    curves, clock = _STATE["curves"][seed], _STATE["clock"]
    full = sum(c.total for c in curves)
    best = max(c.final for c in curves)
    best_config = max(curves, key=lambda c: c.final).config
    rows = []
    for i, order in enumerate(_STATE["orders"][seed]):
        np.random.seed(seed * 1000 + i)  # ASHA draws its bracket from NumPy's global state
        outcome = simulate(curves, order, slots, build_scheduler(family, kwargs, clock, seed),
                           max_t=clock["iters"])
        picked_final = (curves[outcome.picked].final if outcome.picked is not None
                        else float("nan"))
        rows.append({"family": family, "setting": setting_label(kwargs), "slots": slots,
                     "seed": seed, "order": i, "compute": outcome.consumed / full,
                     "time": outcome.makespan / _STATE["base"][(seed, i, slots)],
                     "regret": best - picked_final,
                     "picked": outcome.picked,
                     "n_complete": sum(s >= clock["iters"] for s in outcome.stopped.values()),
                     "best_complete": outcome.stopped.get(best_config, 0) >= clock["iters"]})
    return rows


def run_replay(curves: dict[int, list[Curve]], clock: dict[str, int],
               settings: dict[str, list[dict[str, Any]]], *, slots: Sequence[int] = (2, 8),
               n_orders: int = 20, order_seed: int = 0, workers: int = 1
               ) -> list[dict[str, Any]]:
    """One row per simulated sweep (family, setting, slots, seed, order, compute fraction,
    time fraction, regret, picked config, trials run to the end)."""
    orders = {s: orders_for(len(c), s, n_orders, order_seed) for s, c in curves.items()}
    tasks = [(fam, kw, n, s) for fam, kws in settings.items() for kw in kws for n in slots
             for s in curves]
    state = (curves, clock, orders, _unpruned_makespans(curves, clock, orders, slots))
    if workers <= 1:
        _init_worker(*state)
        parts = [_run_task(t) for t in tasks]
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers, _init_worker, state) as pool:
            parts = pool.map(_run_task, tasks, chunksize=1)
    return [row for part in parts for row in part]


# --- summary ------------------------------------------------------------------------------------

def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (family, setting, slots): compute fraction (mean, median), time fraction (median),
    regret (median, p90, mean), P(regret <= 1 mIoU) over orders x seeds, and each sweep's
    compute and regret (order by seed, then order)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["setting"], r["slots"]), []).append(r)
    out = []
    for (family, setting, slots), rs in groups.items():
        rs = sorted(rs, key=lambda r: (r["seed"], r["order"]))
        compute = np.array([r["compute"] for r in rs])
        # a sweep with no trial run to the end picks nothing: count it as an unbounded regret
        regret = np.array([r["regret"] if math.isfinite(r["regret"]) else math.inf
                           for r in rs])
        out.append({
            "family": family, "setting": setting, "slots": slots, "n": len(rs),
            "compute_mean": float(compute.mean()), "compute_median": float(np.median(compute)),
            "time_median": float(np.median([r["time"] for r in rs])),
            "regret_median": float(np.median(regret)),
            "regret_p90": float(np.percentile(regret, 90)),
            "regret_mean": float(regret.mean()),
            "p_regret_le_1": float(np.mean(regret <= TARGET_REGRET + 1e-9)),
            # trials run to the end (what a top-K confirmation can choose from) and how often
            # the best config was one of them
            "n_complete_median": float(np.median([r["n_complete"] for r in rs])),
            "p_best_complete": float(np.mean([bool(r.get("best_complete")) for r in rs])),
            "compute": [round(float(c), 4) for c in compute],
            "regret": [round(float(r), 3) if math.isfinite(r) else None for r in regret]})
    return out


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries not dominated in (``compute_mean``, ``regret_median``), both lower-better,
    sorted by compute."""
    front: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda p: (p["compute_mean"], p["regret_median"])):
        if not front or p["regret_median"] < front[-1]["regret_median"]:
            front.append(p)
    return front


def dominates(front_a: list[dict[str, Any]], front_b: list[dict[str, Any]]) -> bool:
    """Whether every point of ``front_b`` is matched or beaten on both axes by a point of
    ``front_a`` (``front_a`` weakly dominates ``front_b``)."""
    return bool(front_b) and all(
        any(a["compute_mean"] <= b["compute_mean"] + 1e-12
            and a["regret_median"] <= b["regret_median"] + 1e-12 for a in front_a)
        for b in front_b)


def box_distance(entry: dict[str, Any]) -> float:
    """How far a setting lies outside the target box: compute excess in units of 10 points
    and median-regret excess in mIoU, combined as a Euclidean distance (0 inside)."""
    dc = max(0.0, entry["compute_mean"] - TARGET_COMPUTE) / 0.10
    dr = max(0.0, entry["regret_median"] - TARGET_REGRET)
    return math.hypot(dc, dr)


def best_in_box(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A family's best setting: inside the box the lowest median regret (then p90 regret, then
    compute); with none inside, the cheapest that keeps the median regret <= 1 mIoU (then
    lower p90 regret; the regret bound is the one a user cannot trade); with none of those,
    the nearest to the box (:func:`box_distance`)."""
    if not entries:
        return None
    inside = [e for e in entries if box_distance(e) == 0.0]
    if inside:
        return min(inside, key=lambda e: (e["regret_median"], e["regret_p90"],
                                          e["compute_mean"]))
    good = [e for e in entries if e["regret_median"] <= TARGET_REGRET]
    if good:
        return min(good, key=lambda e: (e["compute_mean"], e["regret_p90"]))
    return min(entries, key=lambda e: (box_distance(e), e["regret_median"]))


def at_equal_compute(front: list[dict[str, Any]], compute: float) -> dict[str, Any] | None:
    """The point of ``front`` with the most compute not above ``compute`` (+0.5 points): what
    that family reaches on the same budget; None when its cheapest point costs more."""
    fits = [p for p in front if p["compute_mean"] <= compute + 0.005]
    return fits[-1] if fits else None


def analyse(summary: list[dict[str, Any]], slots: Sequence[int]) -> dict[str, Any]:
    """Per slot count: each family's front, its best setting for the box, ASHA's point at the
    same compute, and whether the family's front dominates ASHA's."""
    out: dict[str, Any] = {}
    for n in slots:
        entries = [e for e in summary if e["slots"] == n]
        fronts = {f: pareto_front([e for e in entries if e["family"] == f]) for f in FAMILIES}
        fronts = {f: fr for f, fr in fronts.items() if fr}
        asha = fronts.get("asha", [])
        fams = {}
        for f, fr in fronts.items():
            best = best_in_box([e for e in entries if e["family"] == f])
            keep = ("setting", "compute_mean", "regret_median", "regret_p90", "p_regret_le_1")
            fams[f] = {
                "front": [{k: p[k] for k in keep} for p in fr],
                "best": {k: best[k] for k in keep} if best else None,
                "in_box": best is not None and box_distance(best) == 0.0,
                "asha_at_equal_compute": (
                    {k: p[k] for k in keep} if best and (p := at_equal_compute(
                        asha, best["compute_mean"])) else None),
                "dominates_asha": dominates(fr, asha) if f != "asha" else None}
        out[str(n)] = fams
    return out


def plot(summary: list[dict[str, Any]], slots: Sequence[int], path: str | os.PathLike) -> Path:
    """Mean compute fraction vs median regret, one panel per slot count: every setting as a
    faint marker, each family's Pareto front as a line with whiskers up to the p90 regret, the
    target box shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = dict(zip(FAMILIES, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, len(slots), figsize=(5.5 * len(slots), 4.5), squeeze=False,
                             sharey=True)
    top = max([e["regret_p90"] for e in summary if math.isfinite(e["regret_p90"])]
              + [TARGET_REGRET]) * 1.1 + 0.2
    for ax, n in zip(axes[0], slots):
        ax.add_patch(Rectangle((0, 0), TARGET_COMPUTE, TARGET_REGRET, facecolor="tab:green",
                               alpha=0.12, edgecolor="tab:green", linestyle="--",
                               label="target"))
        for fam in FAMILIES:
            entries = [e for e in summary if e["slots"] == n and e["family"] == fam]
            if not entries:
                continue
            ax.scatter([e["compute_mean"] for e in entries],
                       [min(e["regret_median"], top) for e in entries],
                       color=colors[fam], alpha=0.3, s=14)
            front = pareto_front(entries)
            ax.plot([p["compute_mean"] for p in front], [p["regret_median"] for p in front],
                    marker="o", ms=5, color=colors[fam], label=fam)
            # the spread: a whisker from each front point's median regret up to its p90
            ax.vlines([p["compute_mean"] for p in front], [p["regret_median"] for p in front],
                      [min(p["regret_p90"], top) for p in front], color=colors[fam],
                      alpha=0.5, lw=1)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-0.1, top)
        ax.set_xlabel("compute fraction (mean CPU s / unpruned)")
        ax.set_title(f"{n} slots")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("median regret (mIoU points)")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (a sweep that picked nothing has an unbounded
    regret; JSON has no infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# --- command line -------------------------------------------------------------------------------

def read_curves(path: Path, every: int) -> tuple[dict[int, list[Curve]], list[int],
                                                 dict[str, int], dict[str, Any]]:
    """:func:`load_runs` + :func:`curves_by_seed`, with a bad file as one :class:`UserError`
    line naming it."""
    from ctt.errors import UserError

    try:
        runs, meta = load_runs(path)
        if not runs:
            raise ValueError("it holds no runs")
        curves, dropped, clock = curves_by_seed(runs, every)
    except FileNotFoundError:
        raise UserError(f"--curves {path}: no such file; record the curves first "
                        "(python benchmarks/record_curves.py)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"--curves {path}: not a record_curves.py curves file "
                        f"({type(e).__name__}: {e})") from None
    return curves, dropped, clock, meta


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curves", type=Path, default=DEFAULT_CURVES,
                   help="record_curves.py output: final .json or .partial.jsonl")
    p.add_argument("--every", type=int, default=200, choices=(100, 200),
                   help="the sweep's evaluation cadence in iterations (default 200)")
    p.add_argument("--orders", type=int, default=20, help="random config orders per seed")
    p.add_argument("--order-seed", type=int, default=0)
    p.add_argument("--slots", default="2,8", help="parallel slots, comma separated")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="scheduler families to replay, comma separated")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--quick", action="store_true",
                   help="one setting per family and 3 orders (tests, a first look)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    a = p.parse_args(argv)
    slots = [int(s) for s in a.slots.split(",") if s.strip()]
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    grid = QUICK_SETTINGS if a.quick else SETTINGS
    settings = {f: grid[f] for f in families}
    n_orders = min(a.orders, 3) if a.quick else a.orders

    curves, dropped, clock, meta = read_curves(a.curves, a.every)
    print(f"{sum(len(c) for c in curves.values())} curves, seeds {sorted(curves)} "
          f"(left out, incomplete: {dropped}); warm-up {clock['warmup_iters']}, "
          f"{clock['iters']} iterations, evaluation every {a.every}", flush=True)
    t0 = time.perf_counter()
    rows = run_replay(curves, clock, settings, slots=slots, n_orders=n_orders,
                      order_seed=a.order_seed, workers=a.workers)
    summary = summarize(rows)
    analysis = analyse(summary, slots)
    elapsed = time.perf_counter() - t0

    from common import metadata, write_json  # here, after the replay: common imports torch

    meta_out = metadata("cpu", "replay_pruning.py", argv, threads=1)
    source = {k: meta.get(k) for k in ("preset", "variant", "eval_every", "config_seed",
                                       "seeds", "time", "command") if k in meta}
    write_json(a.out, _json_safe({
        **meta_out, "curves": str(a.curves), "curves_meta": source,
        "seeds": sorted(curves), "seeds_left_out": dropped,
        "configs": len(next(iter(curves.values()))), "clock": {**clock, "every": a.every},
        "orders": n_orders, "order_seed": a.order_seed, "slots": slots, "quick": a.quick,
        "target": {"compute": TARGET_COMPUTE, "regret_median": TARGET_REGRET},
        "settings": {f: [setting_label(k) for k in kws] for f, kws in settings.items()},
        "replay_s": round(elapsed, 1), "summary": summary, "analysis": analysis}))
    plot(summary, slots, a.plot)
    print(f"{len(rows)} sweeps in {elapsed:.0f}s; wrote {a.out} and {a.plot}", flush=True)
    for n in slots:
        print(f"\n{n} slots: best setting per family (mean compute, median/p90 regret, "
              "P(regret<=1)); ASHA at equal compute")
        for fam, info in analysis[str(n)].items():
            b, eq = info["best"], info["asha_at_equal_compute"]
            eq_text = (f"asha {eq['compute_mean']:.2f} {eq['regret_median']:.2f}/"
                       f"{eq['regret_p90']:.2f}" if eq else "asha -")
            print(f"  {fam:18s} {b['compute_mean']:.3f}  {b['regret_median']:.2f}/"
                  f"{b['regret_p90']:.2f}  {b['p_regret_le_1']:.2f}  "
                  f"{'box' if info['in_box'] else '   '}  {eq_text}  "
                  f"dominates asha: {info['dominates_asha']}  [{b['setting']}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ctt.errors import guarded

    return guarded(_main)(argv)


if __name__ == "__main__":
    raise SystemExit(main())
