"""The sweep: an Optuna TPE search (seeded) over a space of flat config keys for one variant,
weak trials pruned on their val mIoU, the best trial evaluated on the held-out test split and,
optionally, the best configs confirmed on fresh seeds (:mod:`ctt.tune.confirm`).

Optuna's study lives in ``<study_dir>/optuna.journal`` or, with ``--optuna-storage``, in that
database (:mod:`ctt.tune.optuna_storage`, opened before Ray starts); ``optuna.db`` is a sqlite
snapshot of it written at the end. On ``--resume`` the restored searcher is reconciled with it
(:meth:`ctt.tune.optuna_search.PruningAwareOptunaSearch.reconcile`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ctt.config import CTTConfig, apply_variant, check_semantics
from ctt.envinfo import environment
from ctt.errors import UserError, warn_all
from ctt.tune.adaptive import ComputeBudget, budget_unit
from ctt.tune.callbacks import StudyLoggerCallback
from ctt.tune.confirm import confirm_winners, test_eval
from ctt.tune.experiment import (
    can_restore,
    experiment_dir,
    fixed_trials,
    restore,
    run_config,
    trainable,
    trial_config,
)
from ctt.tune.grid import WARMUP_VARIANT, published, warmup_dir
from ctt.tune.layout import (
    EXPERIMENT,
    OPTUNA_DB,
    OPTUNA_JOURNAL,
    PLAN_RECORD,
    SWEEP_WARMUP_EXPERIMENT,
)
from ctt.tune.optuna_search import TUNE_TRIAL_ID_ATTR, PruningAwareOptunaSearch
from ctt.tune.optuna_storage import (
    OptunaStorageError,
    export_sqlite,
    mask_url,
    open_journal,
    open_url,
)
from ctt.tune.resume import check_resume
from ctt.tune.runtime import (
    StudyOptions,
    StudySession,
    check_inputs,
    finish_study,
    study_session,
)
from ctt.tune.schedulers import DEFAULT_SCHEDULER, make_pruner, make_scheduler
from ctt.tune.space import ONE_MINUS, resolve_one_minus

__all__ = ["RANKING", "best_result", "domain_text", "pruner_record", "run_sweep",
           "sweep_step_offset", "sweep_warmup_plan", "tpe_startup_trials"]

log = logging.getLogger(__name__)

# Characters of a failure's text quoted in a one-line message (the full text is in its file).
QUOTED_ERROR_CHARS = 300

RANKING = ("final: the trial's val {metric} at its last evaluation (step = optim.iters); "
           "pruned and failed trials are not ranked")
# Checkpoints a sweep trial keeps: the best by the metric and, always (Ray keeps the latest),
# the final one, which is the checkpoint of the ranking value.
SWEEP_CHECKPOINTS_KEPT = 3

def tpe_startup_trials(num_samples: int) -> int:
    """Random trials before TPE models the space: a quarter of the budget, at least 3 (TPE's
    default of 10 would spend most of a 16-trial sweep at random)."""
    return max(3, num_samples // 4)


def sweep_step_offset(cfg: CTTConfig) -> int:
    """Where the pruning clock starts: the end of the supervised warm-up (every trial is the
    same network until then, as no swept parameter acts during it), or 0 without one."""
    warm = cfg.method.warmup_iters
    return warm if 0 < warm < cfg.optim.iters else 0


def pruner_record(pruner: Any) -> dict[str, Any] | None:
    """The sweep's Optuna pruner as ``study.json`` records it: class and its settings."""
    if pruner is None:
        return None
    fields = {k.lstrip("_"): v for k, v in vars(pruner).items()
              if isinstance(v, (bool, int, float, str)) or v is None}
    return {"class": type(pruner).__name__, **fields}


def domain_text(domain: Any) -> str:
    """A stable text for a Tune search domain (its repr holds a memory address)."""
    from ray.tune.search.sample import Categorical, Domain

    if isinstance(domain, Categorical):
        return f"choice({list(domain.categories)!r})"
    if not isinstance(domain, Domain):
        return repr(domain)
    sampler, parts = domain.get_sampler(), []
    while sampler is not None:
        parts.append(type(sampler).__name__ + "".join(
            f" {k}={getattr(sampler, k)}" for k in ("base", "q", "mean", "sd")
            if hasattr(sampler, k)))
        sampler = getattr(sampler, "sampler", None)
    return (f"{type(domain).__name__}({getattr(domain, 'lower', None)}, "
            f"{getattr(domain, 'upper', None)}, {'/'.join(parts)})")



# Sampled keys that change which networks and banks a trial has: a shared warm-up trained with
# the base value could not serve every sample, so they count as acting during it.
_STRUCTURE_KEYS = frozenset({"method.unsup", "method.pairs"})


def sweep_warmup_plan(base: CTTConfig, space: dict[str, Any], fork: bool = True
                      ) -> tuple[bool, str]:
    """(share, why): whether every trial of a sweep over ``space`` can fork one shared
    supervised warm-up of ``base`` (the variant's config at the search seed) instead of
    training its own. It can when the variant has a warm-up and no sampled key is read
    during it: every sampled key is in :data:`ctt.state.FORKABLE_KEYS` (the keys
    :meth:`TrainState.fork` lets differ; a forked trial equals its run from scratch) and none
    changes the variant's networks (``method.unsup``, ``method.pairs``)."""
    from ctt.state import FORKABLE_KEYS

    m = base.method
    if not fork:
        return False, "--no-fork: each trial runs its own warm-up"
    if m.unsup == "none" or m.warmup_iters <= 0 or m.warmup_iters >= base.optim.iters:
        return False, "the variant has no supervised warm-up to share"
    acting = sorted(k.removeprefix(ONE_MINUS) for k in space
                    if k.removeprefix(ONE_MINUS) not in FORKABLE_KEYS - _STRUCTURE_KEYS)
    if acting:
        return False, (f"sampled {', '.join(acting)} act{'s' if len(acting) == 1 else ''} "
                       "during the warm-up: each trial runs its own")
    return True, (f"no sampled parameter acts during the {m.warmup_iters}-iteration warm-up: "
                  "one warm-up at the search seed, forked by every trial")


def _sweep_warmup(session: StudySession, opts: StudyOptions, base: CTTConfig,
                  reporter: tune.ProgressReporter) -> str:
    """Train the sweep's shared warm-up (one trial, ``base`` to ``method.warmup_iters``, in
    its own Tune experiment ``ray-warmup``, resumable) unless its checkpoint is already
    published; returns where it is published (:func:`~ctt.tune.grid.warmup_dir`), the trials'
    ``_fork_from``. Not a result: no ``trials/`` entry, no Optuna trial."""
    publish = warmup_dir(session.storage_path, base.run.seed)
    if published(publish):
        return publish
    session.phase = "warm-up"
    exp_dir = experiment_dir(session.storage_path, SWEEP_WARMUP_EXPERIMENT)
    if can_restore(exp_dir):
        tuner = restore(exp_dir, opts, reporter, resume_errored=True)
    else:
        config = trial_config(base, WARMUP_VARIANT, _until=base.method.warmup_iters,
                              _publish=publish)
        space, gen = fixed_trials([config])
        tuner = tune.Tuner(
            trainable(opts), param_space=space,
            tune_config=tune.TuneConfig(search_alg=gen, num_samples=1),
            run_config=run_config(opts, session.storage_path, SWEEP_WARMUP_EXPERIMENT, [],
                                  reporter))
    grid = session.fit(tuner)
    session.stop_if_interrupted()
    if not published(publish):
        res = grid[0] if len(grid) else None
        why = str(res and (res.error or (res.metrics or {}).get("error")))[:QUOTED_ERROR_CHARS]
        raise RuntimeError(f"the sweep's shared warm-up failed ({why}); see "
                           f"{exp_dir}. Rerun with --resume, or pass --no-fork to give each "
                           "trial its own warm-up")
    return publish


def run_sweep(opts: StudyOptions, variant: str, space: dict[str, Any], *, num_samples: int,
              scheduler: str = DEFAULT_SCHEDULER, metric: str = "miou",
              grace_period: int | None = None, sampler_seed: int = 0,
              confirm_top: int = 0, confirm_seeds: int = 0,
              optuna_storage: str | None = None) -> Path:
    """Optuna TPE search over ``space`` (Tune domains keyed by flat config keys) with pruning;
    the best trial is re-evaluated on the held-out test split.

    Pruning counts from the end of the supervised warm-up (:func:`sweep_step_offset`):
    ``grace_period`` (default ``run.eval_every``) iterations after it come before the first
    decision, and rungs count from there. Trials are ranked by :data:`RANKING`. ``--resume``
    with other flags raises :class:`~ctt.tune.resume.StudyFlagsError`. With ``confirm_top`` and
    ``confirm_seeds`` the best configs are then rerun on fresh seeds
    (:func:`ctt.tune.confirm.confirm_winners`, ``confirm.json``)."""
    import optuna

    from ctt.metric_names import METRIC_NAMES

    mious = [m for m in METRIC_NAMES if m.startswith("miou")]
    if metric not in mious:  # with strict metric checks off, a typo would rank nothing
        raise UserError(f"--metric {metric!r}: a sweep maximises a val mIoU that every "
                        f"evaluation reports; choose one of {', '.join(mious)}")
    with study_session(opts) as session:
        warn_all(check_semantics(apply_variant(opts.base, variant), variant, study=True))
        base = apply_variant(check_inputs(opts).override({"run.seed": opts.seeds[0]}), variant)
        for key in space:
            real = key.removeprefix(ONE_MINUS)
            if real not in base.to_flat():
                CTTConfig.from_flat({real: 0})  # raises the unknown-key error with valid keys
        iters, offset = base.optim.iters, sweep_step_offset(base)
        grace = base.run.eval_every if grace_period is None else grace_period
        share, share_why = sweep_warmup_plan(base, space, opts.fork_warmup)
        pruner = make_pruner(scheduler, max_t=iters, grace_period=grace, step_offset=offset)
        session.total = num_samples
        payload = {
            "name": opts.name, "kind": "sweep", "variant": variant, "seeds": opts.seeds[:1],
            "space": {k: domain_text(v) for k, v in space.items()}, "metric": metric,
            "ranking": RANKING.format(metric=metric), "scheduler": scheduler,
            # the report's top-trials table ranks like Optuna and the best trial: final value
            "rank_by": "miou_final" if metric == "miou" else metric,
            "grace_period": grace, "step_offset": offset, "sampler_seed": sampler_seed,
            "tpe_startup_trials": tpe_startup_trials(num_samples), "num_samples": num_samples,
            "confirm_top": confirm_top, "confirm_seeds": confirm_seeds,
            "pruner": pruner_record(pruner),
            "warmup": {"shared": share, "why": share_why},
            "optuna_storage": mask_url(optuna_storage) if optuna_storage else OPTUNA_JOURNAL,
            "preset": opts.preset, "options": asdict(opts), "base_config": base.to_flat(),
            # an --optuna-storage password stays out of the record
            "command": [mask_url(a) for a in sys.argv], "created": time.time(),
            "env": environment()}
        check_resume(opts, session.study_dir, payload)
        db = _open_optuna_database(optuna_storage, opts) if optuna_storage else None
        restoring = session.open(payload)
        study_dir = session.study_dir
        storage = _sweep_optuna_storage(db, study_dir, opts.name, restoring)
        # The pruner is the study's from its creation (TPE sees it from the first trial).
        searcher = PruningAwareOptunaSearch(
            metric=metric, mode="max",
            sampler=optuna.samplers.TPESampler(
                seed=sampler_seed, n_startup_trials=tpe_startup_trials(num_samples)),
            storage=storage, study_name=opts.name, pruner=pruner, time_attr="step",
            max_t=iters, step_offset=offset,
            budget=_budget(opts, base, variant, iters, offset if share else 0, study_dir))
        sched = make_scheduler(scheduler, metric=metric, mode="max", time_attr="step",
                               max_t=iters, grace_period=grace, step_offset=offset,
                               searcher=searcher)
        param_space = {**trial_config(base, variant), **space}
        callbacks = [StudyLoggerCallback(study_dir)]
        t0 = time.time()
        session.warmups = int(share)
        reporter = session.reporter(
            trials=[{**param_space, "seed": base.run.seed}] * num_samples, warmup_fork=share,
            swept=list(space), metric=metric)
        if share:
            param_space["_fork_from"] = _sweep_warmup(session, opts, base, reporter)
        if restoring:
            # Tune's ERROR trials stay failed: Optuna holds them FAIL (final), and Tune retried
            # their crashes (--max-failures) before giving up on them.
            tuner = restore(session.exp_dir, opts, reporter, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable(opts), param_space=param_space,
                tune_config=tune.TuneConfig(
                    search_alg=searcher, scheduler=sched, num_samples=num_samples,
                    max_concurrent_trials=opts.max_concurrent or None, reuse_actors=True),
                run_config=run_config(
                    opts, session.storage_path, EXPERIMENT, callbacks, reporter,
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=SWEEP_CHECKPOINTS_KEPT, checkpoint_score_attribute=metric,
                        checkpoint_score_order="max")))
        session.phase = "trials"
        # A restored searcher is bound to the storage opened here and reconciled with it.
        with PruningAwareOptunaSearch.restoring_into(storage):
            grid = session.fit(tuner)
        session.stop_if_interrupted()  # no best trial of an unfinished sweep
        session.phase = "test"
        ot_study = optuna.load_study(study_name=opts.name, storage=storage)
        best = _evaluate_best(grid, metric, base, opts, ot_study)
        extra: dict[str, Any] = {"best": best}
        if confirm_top > 0 and confirm_seeds > 0:
            session.phase = "confirm"
            extra["confirm"] = confirm_winners(
                session, grid, ot_study, base, variant, metric, top=confirm_top,
                n_seeds=confirm_seeds, ranking=RANKING.format(metric=metric),
                step_offset=offset)
        session.phase = "results"
        export_sqlite(storage, opts.name, study_dir / OPTUNA_DB)
        finish_study(study_dir, opts, time.time() - t0, extra)
        return study_dir


def _budget(opts: StudyOptions, base: CTTConfig, variant: str, iters: int, offset: int,
            study_dir: Path) -> ComputeBudget | None:
    """``--budget`` of a sweep: its search trials, estimated at the cost model's seconds per
    step of ``variant`` (none when the trials' device is not on this machine: the first ended
    trial's measurement then sets it). The shared warm-up and the confirmation runs are not
    counted against it."""
    if opts.budget is None:
        return None
    from ctt.state import resolve_device
    from ctt.tune.dry_run import estimate_seconds_per_step

    try:
        resolve_device(base.run.device)
        step_s: float | None = estimate_seconds_per_step(apply_variant(base, variant))
    except UserError:
        step_s = None
    return ComputeBudget(opts.budget, unit=budget_unit(opts.gpus_per_trial),
                         per_trial=opts.gpus_per_trial or opts.cpus_per_trial, iters=iters,
                         step_s=step_s, offset=offset, record=str(study_dir / PLAN_RECORD))


def _open_optuna_database(url: str, opts: StudyOptions) -> Any:
    """The ``--optuna-storage`` database, opened before Ray starts (an
    :class:`~ctt.tune.optuna_storage.OptunaStorageError` line if it cannot be). A fresh start
    refuses one that already holds a study of this name (its trials would steer TPE), except
    the throwaway smoke study, whose old record is deleted once the study starts."""
    import optuna

    storage = open_url(url)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if not opts.resume and not opts.replace_existing and opts.name in names:
        raise OptunaStorageError(
            f"--optuna-storage {mask_url(url)!r} already holds an Optuna study named "
            f"{opts.name!r}; pass --resume to continue it, --out NAME to start another, or "
            f"delete it (optuna delete-study --study-name {opts.name} --storage URL)")
    return storage


def _sweep_optuna_storage(db: Any, study_dir: Path, name: str, restoring: bool) -> Any:
    """The sweep's Optuna storage: the database ``db`` or the study directory's journal. A
    start that restores no Tune experiment starts Optuna's study afresh too: a record left by
    a run killed before Tune's first snapshot would steer TPE with trials Tune never kept."""
    import optuna

    if db is None:
        path = study_dir / OPTUNA_JOURNAL
        if not restoring:
            path.unlink(missing_ok=True)
        return open_journal(path)
    if not restoring and name in {s.study_name for s in optuna.get_all_study_summaries(db)}:
        optuna.delete_study(study_name=name, storage=db)
    return db


def best_result(grid: Any, study: Any) -> tuple[Any, Any] | None:
    """(Tune ``Result``, Optuna ``FrozenTrial``) of the sweep's best trial: Optuna's best
    COMPLETE trial, i.e. the highest final val metric at the full budget (:data:`RANKING`).
    Tune's ``get_best_result`` is not used: over pruned trials' last results or over the
    whole history it would rank by another "best". None when no trial completed."""
    try:
        ft = study.best_trial
    except ValueError:
        return None
    trial_id = ft.user_attrs.get(TUNE_TRIAL_ID_ATTR)
    for res in grid:
        if (res.metrics or {}).get("trial_id") == trial_id:
            return res, ft
    return None


def _evaluate_best(grid: Any, metric: str, base: CTTConfig, opts: StudyOptions, study: Any
                   ) -> dict[str, Any] | None:
    """The best trial (:func:`best_result`); its final checkpoint, the one its ranking value
    was measured on, is re-evaluated on the held-out test split."""
    found = best_result(grid, study)
    if found is None:
        return None
    res, ft = found
    out: dict[str, Any] = {"trial_id": ft.user_attrs.get(TUNE_TRIAL_ID_ATTR),
                           "optuna_trial": ft.number, "ranking": RANKING.format(metric=metric),
                           "val_" + metric: ft.value, "step": res.metrics.get("step"),
                           "config": {k: v for k, v in resolve_one_minus(res.config).items()
                                      if k in base.to_flat() and base.to_flat()[k] != v}}
    if res.checkpoint is None or base.data.test_split == "none":
        return out
    if res.error is not None:
        # Optuna finished it before the driver was lost; Tune's restored run then failed, so
        # its checkpoint is not the one the ranking value was measured on.
        why = str(res.error)[:QUOTED_ERROR_CHARS]
        out["test_skipped"] = f"the trial's restored run failed: {why}"
        log.warning("best trial %s: %s; no test evaluation", out["trial_id"],
                    out["test_skipped"])
        return out
    task = ray.remote(num_cpus=opts.cpus_per_trial, num_gpus=opts.gpus_per_trial)(test_eval)
    evaluated = ray.get(task.remote(res.config, res.checkpoint))
    out["test"], out["checkpoint_step"] = evaluated["test"], evaluated["checkpoint_step"]
    out["checkpoint"] = res.checkpoint.path
    return out
