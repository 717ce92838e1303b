"""Study-system benchmarks: ``python benchmarks/bench_study.py [--what efficiency,pruning]``.

Two measurements of the Ray Tune layer, on CPU, through public APIs only:

**(a) Efficiency.** A real ablation study (:func:`ctt.tune.ablation.run_ablation`: the study's
trainable, ``RunConfig`` and driver-side callback, ``reuse_actors=True``) of ``n_trials`` (8)
tiny trials (variant ``mean_teacher``, seeds 0..7, 300 iterations of which the first 40 % are
the supervised warm-up, evaluation and checkpoint every 100) on ``num_cpus`` (2) CPUs with
``cpus_per_trial=1`` and ``run.num_threads=1``::

    ratio = sum_i compute_i / (wall x slots)

``compute_i`` is the last ``time/trial_compute_s`` trial *i* reports (read from the study's
``metrics.parquet``): the time inside the trainable from its entry to the final evaluation
(dataset build, training, evaluations, checkpoints; the ~5 ms blocking of each ``tune.report``
is included). ``wall`` is the study's own ``wall_s_runs`` (``study.json``): from after Ray has
started (~3 s, paid once per study, timed separately as ``ray_init_s``) to the end of
``Tuner.fit()``, before the results are built. ``slots = min(n_trials, cluster CPUs /
cpus_per_trial)``. What the ratio misses is Tune's own cost: actor start-up and imports in the
worker, scheduling between trials, result and checkpoint handling on the driver (which shares
the two cores), and the tail where one slot idles while the last trial finishes. Target
>= 0.90. At the default size this part takes about 2 minutes on an idle 2-core machine.

**(b) Pruning.** ``optuna-median``, ``asha`` and ``none`` on the *same* fixed list of
``n_configs`` (12) configurations, pre-sampled once by :func:`sample_configs` from a seeded
NumPy RNG (no TPE: its suggestions depend on completion order under concurrency). Tune runs
the list as a grid over its index, in order, with
``max_concurrent_trials=2``; each trial is :func:`ctt.tune.trainable.train_ctt` on that config.
Repeat ``r`` uses ``run.seed = r`` and the order ``r`` (the identity for ``r = 0``, a seeded
permutation otherwise), the same for every scheduler. Trials: tiny ``mean_teacher``, 450
iterations (the preset's supervised warm-up share: 20 %, 90 iterations), evaluation every 50;
``grace_period`` 50 (ASHA: rungs at 50 and 150 with reduction factor 3; median:
``n_warmup_steps=50``); the median pruner's ``n_startup_trials`` is 2, the number of
concurrent slots (the first wave runs before any reference exists anyway).
Per scheduler and repeat: iterations used (sum over trials of the last step) and compute
seconds (sum of the last ``time/trial_compute_s``), each relative to ``none`` of the same
repeat; the best mIoU found (``miou_best`` of the best trial) and its gap to ``none``'s best.
Target: gap <= 1 mIoU using <= 35 % of ``none``'s compute (checked on both iterations and
seconds). At the default size one repeat costs about 12 trial-minutes for ``none``, so the
whole part takes roughly 10-15 minutes on an idle 2-core machine.

Output: a summary on stdout and one JSON file (``--json``, default
``benchmarks/results/tune.json``) with the machine, versions and a hash of ``ctt/*.py`` before
and after (a shared working tree may change under a long run); the Tune experiments go to a
temporary directory unless ``--out-dir`` is given. Run it on an otherwise idle machine: other
processes on the same cores stretch the trials and the Ray driver differently.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # benchmarks/common.py: a script's folder is on sys.path
import numpy as np
import pyarrow.parquet as pq
import ray

from ctt.config import (
    VARIANTS,
    ConfigError,
    CTTConfig,
    apply_variant,
    check_semantics,
    get_preset,
    parse_set_args,
)
from ctt.data.loader import dataset_root
from ctt.errors import guarded, int_at_least, warn_all
from ctt.tune.ablation import run_ablation
from ctt.tune.layout import METRICS_PARQUET, TRIALS_PARQUET, read_json, study_json_path
from ctt.tune.ray_setup import init_ray
from ctt.tune.runtime import StudyOptions
from ctt.tune.schedulers import SCHEDULERS, make_scheduler

EFFICIENCY_TARGET = 0.90
PRUNING_GAP_TARGET = 1.0  # mIoU points below none's best
PRUNING_COMPUTE_TARGET = 0.35  # fraction of none's compute
SAMPLED_KEYS = ("optim.lr", "method.ema_decay", "method.lambda_u", "method.tau_p")


# --- trial configs ------------------------------------------------------------------------------

def bench_overrides(preset: str, iters: int, eval_every: int,
                    overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flat config keys of the bench's trials on top of the preset: ``iters`` with the preset's
    warm-up share of them, evaluation, checkpoint and log every ``eval_every``, one thread on
    the CPU; then the caller's ``overrides`` (which win, so smoke sizes can shrink everything).

    The warm-up share matters for pruning: during the supervised warm-up the sampled EMA decay,
    ``lambda_u`` and ``tau_p`` have no effect yet, so a rung inside it ranks trials on the
    learning rate alone."""
    base = get_preset(preset)
    share = base.method.warmup_iters / base.optim.iters
    return {"optim.iters": iters, "run.eval_every": eval_every,
            "run.checkpoint_every": eval_every, "run.log_every": eval_every,
            "method.warmup_iters": int(share * iters), "run.num_threads": 1,
            "run.device": "cpu", **(overrides or {})}


def base_config(preset: str, variant: str, iters: int, eval_every: int,
                overrides: dict[str, Any] | None = None) -> CTTConfig:
    """The config every trial of the bench starts from (:func:`bench_overrides`, variant)."""
    flat = bench_overrides(preset, iters, eval_every, overrides)
    return apply_variant(get_preset(preset).override(flat), variant)


def sample_configs(n: int = 12, seed: int = 0) -> list[dict[str, float]]:
    """``n`` hyperparameter sets drawn once from ``numpy.random.default_rng(seed)``.

    Ranges are deliberately wide so that some draws are clearly bad (a learning rate near
    1e-4 barely trains in a few hundred iterations; a large ``lambda_u`` with a loose
    ``tau_p`` trains on wrong pseudo-labels):

    - ``optim.lr``: log-uniform [1e-4, 2e-2]
    - ``method.ema_decay``: ``1 - 10**u``, u uniform [-3, -1] (0.9 ... 0.999)
    - ``method.lambda_u``: uniform [0, 3]
    - ``method.tau_p``: uniform [0.5, 0.99]

    Returns a list of dicts keyed by :data:`SAMPLED_KEYS` (plain floats, rounded to 6
    significant digits so they print and compare cleanly).
    """
    if n < 1:
        raise ValueError(f"sample_configs: n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        draw = {
            "optim.lr": 10 ** rng.uniform(math.log10(1e-4), math.log10(2e-2)),
            "method.ema_decay": 1.0 - 10 ** rng.uniform(-3.0, -1.0),
            "method.lambda_u": rng.uniform(0.0, 3.0),
            "method.tau_p": rng.uniform(0.5, 0.99),
        }
        out.append({k: float(f"{v:.6g}") for k, v in draw.items()})
    return out


def study_options(name: str, storage: str | Path, num_cpus: int, **kw: Any) -> StudyOptions:
    # max_failures=0: a crash in a benchmark is a bug to see, not to retry (retries would
    # double-count compute).
    return StudyOptions(name=name, storage=str(storage), num_cpus=num_cpus, max_failures=0,
                        verbose=0, **kw)


# --- (a) efficiency -----------------------------------------------------------------------------

def _last_compute(metrics: Any) -> dict[str, float]:
    """trial_id -> its last reported ``time/trial_compute_s`` (``metrics.parquet`` rows)."""
    compute_key = common.TRIAL_COMPUTE_KEY
    rows = metrics.select(["trial_id", "step", compute_key]).to_pylist()
    last: dict[str, tuple[int, float]] = {}
    for r in rows:
        if r[compute_key] is not None and r["step"] >= last.get(r["trial_id"], (-1, 0.0))[0]:
            last[r["trial_id"]] = (r["step"], r[compute_key])
    return {tid: c for tid, (_, c) in last.items()}


def bench_efficiency(storage: str | Path, *, n_trials: int = 8, num_cpus: int = 2,
                     cpus_per_trial: float = 1.0, preset: str = "tiny",
                     variant: str = "mean_teacher", iters: int = 300, eval_every: int = 100,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run an ablation study of ``variant`` x seeds ``0..n_trials-1`` in ``storage`` and measure
    the compute/wall ratio (module docstring). Starts in-process Ray with ``num_cpus`` CPUs
    unless Ray is already running (then its CPUs decide the slots). Returns the
    ``efficiency`` record of the JSON."""
    if n_trials < 1:
        raise ValueError(f"bench_efficiency: n_trials must be >= 1, got {n_trials}")
    opts = study_options("efficiency", storage, num_cpus, preset=preset,
                         seeds=list(range(n_trials)), cpus_per_trial=cpus_per_trial,
                         overrides=bench_overrides(preset, iters, eval_every, overrides),
                         fork_warmup=False)
    dataset_root(opts.base)  # a one-time synthetic cache, before any timed region
    t0 = time.perf_counter()
    init_ray(opts)
    ray_init_s = time.perf_counter() - t0
    study_dir = run_ablation(opts, [variant])
    wall = float(read_json(study_json_path(study_dir), strict=True)["wall_s_runs"][-1])
    trials = sorted(pq.read_table(study_dir / TRIALS_PARQUET).to_pylist(),
                    key=lambda t: t["seed"])
    compute_by_id = _last_compute(pq.read_table(study_dir / METRICS_PARQUET))
    compute = [compute_by_id.get(t["trial_id"], 0.0) for t in trials]
    cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
    slots = max(1, min(n_trials, int(cluster_cpus // cpus_per_trial)))
    ratio = sum(compute) / (wall * slots)
    cfg = opts.base
    return {
        "n_trials": n_trials, "slots": slots, "cpus_per_trial": cpus_per_trial,
        "cluster_cpus": cluster_cpus, "preset": preset, "variant": variant,
        "iters": cfg.optim.iters, "eval_every": cfg.run.eval_every,
        "warmup_iters": cfg.method.warmup_iters, "overrides": dict(overrides or {}),
        "ray_init_s": ray_init_s, "wall_s": wall, "trial_compute_s": compute,
        "sum_compute_s": sum(compute), "steps": [t["step"] for t in trials],
        "errors": [t["error"] for t in trials if t["error"]],
        "ratio": ratio, "target": EFFICIENCY_TARGET, "meets_target": ratio >= EFFICIENCY_TARGET,
    }


# --- (b) pruning --------------------------------------------------------------------------------

def trial_order(n: int, repeat: int) -> list[int]:
    """Repeat 0 keeps the sampled order; later repeats use a seeded permutation."""
    if repeat == 0:
        return list(range(n))
    return [int(i) for i in np.random.default_rng(1000 + repeat).permutation(n)]


def bench_pruning(storage: str | Path, *, params: list[dict[str, float]] | None = None,
                  schedulers: tuple[str, ...] = ("none", "asha", "optuna-median"),
                  repeats: int = 2, num_cpus: int = 2, max_concurrent: int = 2,
                  preset: str = "tiny", variant: str = "mean_teacher", iters: int = 450,
                  eval_every: int = 50, grace_period: int = 50, median_startup: int = 2,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every scheduler on the same pre-sampled ``params`` (default
    :func:`sample_configs`) for ``repeats`` repeats; return the ``pruning`` record.

    ``none`` must be among ``schedulers``: every fraction and gap is relative to it.
    """
    if "none" not in schedulers:
        raise ValueError(f"bench_pruning: schedulers must include 'none' (the reference), "
                         f"got {list(schedulers)}")
    if repeats < 1:
        raise ValueError(f"bench_pruning: repeats must be >= 1, got {repeats}")
    params = sample_configs() if params is None else params
    base = base_config(preset, variant, iters, eval_every, overrides)
    dataset_root(base)  # a one-time synthetic cache, before any timed region
    init_ray(study_options("pruning", storage, num_cpus))
    runs: list[dict[str, Any]] = []
    for r in range(repeats):
        order = trial_order(len(params), r)
        seeded = base.override({"run.seed": r})
        # The trainable's trial config: flat config keys plus variant and seed.
        configs = [{**seeded.override(params[i]).to_flat(), "variant": variant, "seed": r}
                   for i in order]
        for name in schedulers:
            kw = {"n_startup_trials": median_startup} if name in (
                "optuna-median", "optuna-percentile") else {}
            sched = make_scheduler(name, metric="miou", mode="max", time_attr="step",
                                   max_t=base.optim.iters, grace_period=grace_period,
                                   seed=r, **kw)
            wall, record = common.fit_fixed_list(configs, Path(storage), f"prune-{name}-r{r}",
                                                 scheduler=sched, max_concurrent=max_concurrent)
            trials = sorted(record.trials.values(), key=lambda t: t["index"])
            for t in trials:  # position in this repeat's list -> index into params
                t["index"] = order[t["index"]]
                t["stopped_early"] = t["step"] < base.optim.iters
            runs.append({"repeat": r, "seed": r, "order": order, "scheduler": name,
                         "wall_s": wall, "trials": trials})
            print(f"[pruning] repeat {r} {name}: {_run_line(runs[-1])}", flush=True)
    out = {
        "preset": preset, "variant": variant, "iters": base.optim.iters,
        "eval_every": base.run.eval_every, "warmup_iters": base.method.warmup_iters,
        "grace_period": grace_period, "median_n_startup_trials": median_startup,
        "asha_reduction_factor": 3, "max_concurrent": max_concurrent, "repeats": repeats,
        "schedulers": list(schedulers), "overrides": dict(overrides or {}),
        "sampled_keys": list(SAMPLED_KEYS), "params": params, "runs": runs,
    }
    out.update(summarise_pruning(runs))
    return out


def _run_line(run: dict[str, Any]) -> str:
    ts = run["trials"]
    best = max((t["miou_best"] for t in ts if t["miou_best"] is not None), default=float("nan"))
    n_early = sum(t["stopped_early"] for t in ts)
    return (f"{sum(t['step'] for t in ts)} iters ({n_early}/{len(ts)} stopped early), "
            f"{sum(t['compute_s'] for t in ts):.0f} s compute, {run['wall_s']:.0f} s wall, "
            f"best mIoU {best:.2f}")


def _best(trials: list[dict[str, Any]]) -> tuple[float, int | None]:
    scored = [(t["miou_best"], t["index"]) for t in trials if t["miou_best"] is not None]
    if not scored:
        return float("nan"), None
    return max(scored)


def summarise_pruning(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (repeat, scheduler) fractions and gaps relative to ``none`` of the same repeat, and
    their means per scheduler.

    Each run is ``{"repeat", "scheduler", "trials": [{"index", "step", "compute_s",
    "miou_best"}, ...]}``. Returns ``{"per_repeat": [...], "summary": {scheduler: {...}}}``
    where ``iters_frac = sum(step) / sum(step of none)``, ``compute_frac`` the same for
    ``compute_s``, ``gap = best(none) - best(scheduler)`` (positive: the scheduler found less)
    and ``meets_target`` = mean gap <= 1 and both mean fractions <= 0.35 (``none`` itself is
    the reference and is not judged).
    """
    ref = {r["repeat"]: r for r in runs if r["scheduler"] == "none"}
    per_repeat = []
    for run in runs:
        if run["repeat"] not in ref:
            raise ValueError(f"repeat {run['repeat']} has no 'none' run to compare against")
        base = ref[run["repeat"]]["trials"]
        iters, iters_ref = sum(t["step"] for t in run["trials"]), sum(t["step"] for t in base)
        comp = sum(t["compute_s"] for t in run["trials"])
        comp_ref = sum(t["compute_s"] for t in base)
        best, best_index = _best(run["trials"])
        best_ref, _ = _best(base)
        per_repeat.append({
            "repeat": run["repeat"], "scheduler": run["scheduler"], "iters": iters,
            "compute_s": comp, "iters_frac": iters / iters_ref if iters_ref else float("nan"),
            "compute_frac": comp / comp_ref if comp_ref else float("nan"),
            "best_miou": best, "best_index": best_index, "none_best_miou": best_ref,
            "gap": best_ref - best,
            "n_stopped_early": sum(bool(t.get("stopped_early")) for t in run["trials"]),
            "n_trials": len(run["trials"])})
    summary: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(p["scheduler"] for p in per_repeat):
        rows = [p for p in per_repeat if p["scheduler"] == name]

        def mean(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return float(np.mean([p[key] for p in rows]))

        s = {"repeats": len(rows), "iters_frac": mean("iters_frac"),
             "compute_frac": mean("compute_frac"), "best_miou": mean("best_miou"),
             "gap": mean("gap"), "gap_max": float(max(p["gap"] for p in rows)),
             "iters_frac_max": float(max(p["iters_frac"] for p in rows))}
        if name != "none":
            s["meets_target"] = bool(s["gap"] <= PRUNING_GAP_TARGET
                                     and s["iters_frac"] <= PRUNING_COMPUTE_TARGET
                                     and s["compute_frac"] <= PRUNING_COMPUTE_TARGET)
        summary[name] = s
    return {"per_repeat": per_repeat, "summary": summary,
            "target": {"gap": PRUNING_GAP_TARGET, "compute_frac": PRUNING_COMPUTE_TARGET}}


# --- CLI ----------------------------------------------------------------------------------------

def _print_efficiency(e: dict[str, Any]) -> None:
    print(f"efficiency: {e['n_trials']} trials x {e['iters']} iters ({e['variant']}) on "
          f"{e['slots']} slots: sum compute {e['sum_compute_s']:.1f} s / (wall "
          f"{e['wall_s']:.1f} s x {e['slots']}) = {e['ratio']:.3f} (target >= "
          f"{e['target']:.2f}: {'met' if e['meets_target'] else 'NOT met'}); ray.init "
          f"{e['ray_init_s']:.1f} s not counted", flush=True)


def _print_pruning(p: dict[str, Any]) -> None:
    print(f"pruning: {len(p['params'])} configs x {p['iters']} iters ({p['variant']}), "
          f"{p['repeats']} repeat(s); fractions and gaps vs 'none' of the same repeat")
    print(f"  {'scheduler':15s} {'iters':>7s} {'seconds':>8s} {'best mIoU':>10s} {'gap':>6s} "
          f"{'target':>7s}")
    for name, s in p["summary"].items():
        verdict = "ref" if name == "none" else ("met" if s["meets_target"] else "NOT met")
        print(f"  {name:15s} {s['iters_frac']:7.1%} {s['compute_frac']:8.1%} "
              f"{s['best_miou']:10.2f} {s['gap']:6.2f} {verdict:>7s}")
    sys.stdout.flush()


def _check_inputs(a: argparse.Namespace, what: list[str], overrides: dict[str, Any]) -> None:
    """Every config the bench will run, and the schedulers, checked before Ray starts."""
    if a.variant not in VARIANTS:
        raise ConfigError(f"unknown variant {a.variant!r} (--variant): choose one of "
                          f"{', '.join(VARIANTS)}")
    sizes = []
    if "efficiency" in what:
        sizes.append((a.eff_iters, a.eff_eval_every))
    if "pruning" in what:
        sizes.append((a.prune_iters, a.prune_eval_every))
        unknown = [s.strip() for s in a.schedulers.split(",")
                   if s.strip() and s.strip() not in SCHEDULERS]
        if unknown:
            raise ConfigError(f"unknown scheduler(s) {', '.join(unknown)} (--schedulers): "
                              f"choose from {', '.join(SCHEDULERS)}")
    for iters, eval_every in sizes:
        cfg = base_config(a.preset, a.variant, iters, eval_every, overrides)
        warn_all(check_semantics(cfg, a.variant, study=True))
        dataset_root(cfg)


@guarded
def main(argv: list[str] | None = None) -> int:
    """Run the bench; input errors (preset, variant, --set, schedulers) are one ``error:``
    line and exit code 2, before Ray starts."""
    p = argparse.ArgumentParser(prog="python benchmarks/bench_study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="efficiency,pruning",
                   help="comma-separated: efficiency, pruning")
    p.add_argument("--repeats", type=int_at_least(1), default=2,
                   help="pruning repeats (>= 2 for figures)")
    p.add_argument("--json", default=str(common.RESULTS_DIR / "tune.json"),
                   help="output JSON file")
    p.add_argument("--out-dir", help="keep the Tune experiments here (default: a temporary "
                   "directory, deleted at the end)")
    p.add_argument("--num-cpus", type=int_at_least(1), default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--variant", default="mean_teacher")
    p.add_argument("--eff-trials", type=int_at_least(1), default=8)
    p.add_argument("--eff-iters", type=int_at_least(1), default=300)
    p.add_argument("--eff-eval-every", type=int_at_least(1), default=100)
    p.add_argument("--configs", type=int_at_least(1), default=12,
                   help="pruning: number of sampled configs")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--prune-iters", type=int_at_least(1), default=450)
    p.add_argument("--prune-eval-every", type=int_at_least(1), default=50)
    p.add_argument("--grace-period", type=int_at_least(1), default=50)
    p.add_argument("--median-startup", type=int_at_least(0), default=2,
                   help="optuna-median n_startup_trials")
    p.add_argument("--schedulers", default="none,asha,optuna-median")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any flat config key in every trial (repeatable)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. how busy "
                   "the machine was)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    a = p.parse_args(argv)
    what = [w.strip() for w in a.what.split(",") if w.strip()]
    unknown = sorted(set(what) - {"efficiency", "pruning"})
    if unknown or not what:
        p.error(f"--what: unknown part(s) {unknown}; choose from efficiency, pruning")
    overrides = parse_set_args(a.overrides)
    _check_inputs(a, what, overrides)
    out: dict[str, Any] = {**common.metadata("cpu", "bench_study.py", argv, note=a.note),
                           "source_hash_before": common.source_hash()}
    tmp = None if a.out_dir else tempfile.mkdtemp(prefix="ctt-bench-study-")
    storage = Path(a.out_dir or tmp).resolve()
    try:
        if "efficiency" in what:
            out["efficiency"] = bench_efficiency(
                storage, n_trials=a.eff_trials, num_cpus=a.num_cpus, preset=a.preset,
                variant=a.variant, iters=a.eff_iters, eval_every=a.eff_eval_every,
                overrides=overrides)
            _print_efficiency(out["efficiency"])
        if "pruning" in what:
            out["pruning"] = bench_pruning(
                storage, params=sample_configs(a.configs, a.sample_seed),
                schedulers=tuple(s.strip() for s in a.schedulers.split(",") if s.strip()),
                repeats=a.repeats, num_cpus=a.num_cpus, preset=a.preset, variant=a.variant,
                iters=a.prune_iters, eval_every=a.prune_eval_every,
                grace_period=a.grace_period, median_startup=a.median_startup,
                overrides=overrides)
            _print_pruning(out["pruning"])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    out["load_avg_1m_after"] = common.load_average()
    out["source_hash_after"] = common.source_hash()
    if out["source_hash_after"] != out["source_hash_before"]:
        print("WARNING: ctt/*.py changed while the bench ran; the runs compare different code "
              "(source_hash_before != source_hash_after in the JSON)", flush=True)
    print(f"wrote {common.write_json(a.json, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
