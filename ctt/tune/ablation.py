"""The ablation: every variant x every seed as one Tune experiment, supervised warm-ups shared
per seed.

Each seed's supervised warm-up (when the variants fork one) and the variant trials run in one
experiment, started longest first, each variant as soon as its seed's warm-up is published
(:class:`ctt.tune.grid.GridSearcher`, restored with the experiment on ``--resume``)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray import tune

from ctt.config import apply_variant, check_semantics
from ctt.envinfo import environment
from ctt.errors import UserError, warn_all
from ctt.tune.adaptive import PlannedGridSearcher, budget_unit
from ctt.tune.callbacks import StudyLoggerCallback
from ctt.tune.experiment import restore, run_config, trainable, trial_config
from ctt.tune.grid import WARMUP_VARIANT, GridItem, longest_first, warmup_dir
from ctt.tune.layout import EXPERIMENT, PLAN_RECORD, WARMUP, WARMUP_FAILED, WARMUP_RECORD
from ctt.tune.resume import check_resume
from ctt.tune.runtime import StudyOptions, check_inputs, finish_study, study_session, tune_env
from ctt.tune.sequential import Plan

__all__ = ["ablation_trials", "extra_seeds", "plan_of", "run_ablation", "step_seconds"]


class _VariantTrialLogger(StudyLoggerCallback):
    """The study's logger, for the variant trials only: the warm-up trials that share their
    experiment (:mod:`ctt.tune.grid`) are not results (no ``trials/<id>/``, no TensorBoard run,
    not in the tables); Tune's progress table and ``ray/`` still show them."""

    @staticmethod
    def _is_warmup(trial: Any) -> bool:
        return dict(trial.config).get("variant") == WARMUP_VARIANT

    # One forwarding method per Tune hook, deliberately alike: Ray's Callback dispatches by
    # method name, so each hook the parent implements must be filtered by name.
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self._is_warmup(trial):
            super().on_trial_start(iteration, trials, trial, **info)

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self._is_warmup(trial):
            super().on_trial_restore(iteration, trials, trial, **info)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self._is_warmup(trial):
            super().on_trial_recover(iteration, trials, trial, **info)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if not self._is_warmup(trial):
            super().on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self._is_warmup(trial):
            super().on_trial_complete(iteration, trials, trial, **info)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self._is_warmup(trial):
            super().on_trial_error(iteration, trials, trial, **info)


def ablation_trials(opts: StudyOptions, variants: list[str],
                    seeds: list[int] | None = None) -> list[dict[str, Any]]:
    """Every (variant, seed) trial config (``seeds``: default the study's), longest first
    (:func:`ctt.tune.grid.longest_first`: by estimated cost, seeds interleaved), the order the
    study starts them in."""
    base = opts.base
    if seeds is None:
        seeds = opts.seeds
        for v in variants:  # a setting a variant cannot honour is refused here, before Ray
            warn_all(check_semantics(apply_variant(base, v), v, study=True))
    configs = [trial_config(apply_variant(base.override({"run.seed": s}), v), v)
               for s in seeds for v in variants]
    return longest_first(configs, seeds)


def extra_seeds(seeds: list[int], count: int) -> list[int]:
    """The seeds an adaptive study may add, in release order: the next ``count`` integers
    after the largest initial seed."""
    start = max(seeds) + 1
    return list(range(start, start + max(count, 0)))


def plan_of(opts: StudyOptions) -> Plan | None:
    """The sequential design of an ``--adaptive`` study (None for a fixed one)."""
    if not opts.adaptive:
        return None
    return Plan(initial=len(opts.seeds), max_seeds=opts.max_seeds, delta=opts.delta)


def step_seconds(opts: StudyOptions, variants: list[str], fork: bool) -> dict[str, float]:
    """The cost model's seconds per step of each variant (and of a shared warm-up, two
    supervised students) on the driver's device, for ``--budget``; empty when the trials' device
    is not on this machine (a GPU trial from a CPU head): then each variant is estimated from
    the first of its trials that ends (:mod:`ctt.tune.adaptive`)."""
    from ctt.state import resolve_device
    from ctt.tune.dry_run import estimate_seconds_per_step

    base = opts.base
    try:
        resolve_device(base.run.device)
    except UserError:
        return {}
    out = {v: estimate_seconds_per_step(apply_variant(base, v)) for v in variants}
    if fork:
        out[WARMUP_VARIANT] = 2 * estimate_seconds_per_step(apply_variant(base, "supervised"))
    return out


def _grid_items(opts: StudyOptions, configs: list[dict[str, Any]], storage_path: str,
                fork: bool, seeds: list[int] | None = None) -> list[GridItem]:
    """The experiment's trials in start order: with ``fork``, one supervised warm-up per seed
    (2 pairs, banks on, stopped at ``method.warmup_iters``; it publishes its checkpoint to
    :func:`~ctt.tune.grid.warmup_dir`) first, then the variant trials, each forking its seed's
    warm-up."""
    items: list[GridItem] = []
    base = opts.base
    until = base.method.warmup_iters
    for s in (opts.seeds if seeds is None else seeds) if fork else []:
        publish = warmup_dir(storage_path, s)
        cfg = trial_config(apply_variant(base.override({"run.seed": s}), "ctt"),
                            WARMUP_VARIANT, _until=until, _publish=publish)
        items.append(GridItem(key=f"{WARMUP}/{s}", config=cfg, publish=publish, until=until,
                              seed=s, iters=until))
    for c in configs:
        seed = int(c["seed"])
        iters = int(c["optim.iters"])
        if fork:
            c = {**c, "_fork_from": warmup_dir(storage_path, seed)}
            iters -= until
        items.append(GridItem(key=f"{c['variant']}/{seed}", config=c, seed=seed,
                              after=f"{WARMUP}/{seed}" if fork else None, iters=iters))
    return items


def _common_space(items: list[GridItem]) -> dict[str, Any]:
    """Move the keys every config shares into the param space (returned); each item keeps
    what is its own (variant, seed, fork source, ...), so the searcher state that Tune saves
    with every experiment snapshot holds one copy of the shared config, not one per trial."""
    first, rest = items[0].config, [i.config for i in items[1:]]
    space = {k: v for k, v in first.items() if all(k in c and c[k] == v for c in rest)}
    for item in items:
        item.config = {k: v for k, v in item.config.items() if k not in space}
    return space


def _trial_dirname(trial: Any) -> str:
    """``ray/<variant>_seed<seed>_<trial id>``: Tune's default name is built from the whole
    config (the fork path first) and cut off before the variant."""
    config = dict(trial.config)
    return f"{config.get('variant', 'trial')}_seed{config.get('seed', '')}_{trial.trial_id}"


def _check_warmups(study_dir: Path) -> None:
    """Raise naming the warm-ups that failed for good (their seeds' variants never ran)."""
    path = study_dir / WARMUP_FAILED
    failed = json.loads(path.read_text()) if path.exists() else {}
    if failed:
        raise RuntimeError("; ".join(failed.values()) + " (its seed's variant trials did not "
                           "run)")


def run_ablation(opts: StudyOptions, variants: list[str]) -> Path:
    """Run (or resume) the variants x seeds grid; return the local study directory.

    One Tune experiment holds every trial: each seed's shared warm-up (when the variants fork
    one) and the variant trials, started longest first, each variant as soon as its seed's
    warm-up is done (:class:`ctt.tune.grid.GridSearcher`, restored with the experiment on
    ``--resume``).

    SIGINT/SIGTERM in any phase raises :class:`~ctt.interrupts.Interrupted` (with ``where`` and
    ``resumable``) once Tune has stopped; finished trials and warm-ups are kept for --resume."""
    with study_session(opts) as session:
        # variant/--set conflicts fail first (cheap), then the data root (it may generate data)
        configs = ablation_trials(opts, variants)
        base = check_inputs(opts)
        session.total = len(configs)
        payload = {
            "name": opts.name, "kind": "ablation", "variants": variants, "seeds": opts.seeds,
            "preset": opts.preset, "options": asdict(opts), "base_config": base.to_flat(),
            "command": sys.argv, "created": time.time(), "env": environment()}
        check_resume(opts, session.study_dir, payload)  # Tune would keep the old grid
        restoring = session.open(payload)
        study_dir, storage_path = session.study_dir, session.storage_path
        fork = (opts.fork_warmup and base.method.warmup_iters > 0
                and base.method.warmup_iters < base.optim.iters and len(variants) > 1)
        session.warmups = len(opts.seeds) if fork else 0
        t0 = time.time()
        callbacks = [_VariantTrialLogger(study_dir)]
        session.phase = "trials"
        reporter = session.reporter(total=len(configs), trials=configs, warmup_fork=fork)
        plan = plan_of(opts)
        extra = extra_seeds(opts.seeds, opts.max_seeds - len(opts.seeds)) if plan else []
        if restoring:
            tuner = restore(session.exp_dir, opts, reporter, resume_errored=True)
        else:
            items = _grid_items(opts, configs, storage_path, fork)
            reserve = [(s, _grid_items(opts, ablation_trials(opts, variants, [s]), storage_path,
                                       fork, [s])) for s in extra]
            space = _common_space(items + [i for _, later in reserve for i in later])
            searcher = PlannedGridSearcher(
                items, reserve=reserve, questions=opts.questions, plan=plan, seeds=opts.seeds,
                budget=opts.budget, unit=budget_unit(opts.gpus_per_trial),
                per_trial=opts.gpus_per_trial or opts.cpus_per_trial,
                step_s=step_seconds(opts, variants, fork) if opts.budget else {},
                plan_record=str(study_dir / PLAN_RECORD),
                max_concurrent=opts.max_concurrent, record=str(study_dir / WARMUP_RECORD),
                failures=str(study_dir / WARMUP_FAILED))
            tuner = tune.Tuner(
                trainable(opts), param_space=space,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    num_samples=len(items) + sum(len(later) for _, later in reserve),
                    reuse_actors=True, trial_dirname_creator=_trial_dirname),
                run_config=run_config(opts, storage_path, EXPERIMENT, callbacks, reporter))
        # Tune keeps one trial pending at a time for a custom searcher, so a second slot (or
        # node) would wait for the first trial to start, and a short trial may finish and
        # hand its actor on first: allow one pending trial per grid trial.
        most = session.total + len(extra) * (len(variants) + (1 if fork else 0))
        with tune_env({"TUNE_MAX_PENDING_TRIALS_PG": str(opts.max_concurrent or most)}):
            session.fit(tuner)
        session.stop_if_interrupted()  # no report of an unfinished grid
        _check_warmups(study_dir)
        session.phase = "results"
        finish_study(study_dir, opts, time.time() - t0)
        return study_dir


