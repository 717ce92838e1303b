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
from ctt.errors import warn_all
from ctt.tune.callbacks import StudyLoggerCallback
from ctt.tune.experiment import restore, run_config, trainable, trial_config
from ctt.tune.grid import WARMUP_VARIANT, GridItem, GridSearcher, longest_first, warmup_dir
from ctt.tune.layout import EXPERIMENT, WARMUP, WARMUP_FAILED, WARMUP_RECORD
from ctt.tune.resume import check_resume
from ctt.tune.runtime import StudyOptions, check_inputs, finish_study, study_session, tune_env

__all__ = ["ablation_trials", "run_ablation"]


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


def ablation_trials(opts: StudyOptions, variants: list[str]) -> list[dict[str, Any]]:
    """Every (variant, seed) trial config, longest first (:func:`ctt.tune.grid.longest_first`:
    by estimated cost, seeds interleaved), the order the study starts them in."""
    base = opts.base
    for v in variants:  # a setting a variant cannot honour is refused here, before Ray starts
        warn_all(check_semantics(apply_variant(base, v), v, study=True))
    configs = [trial_config(apply_variant(base.override({"run.seed": s}), v), v)
               for s in opts.seeds for v in variants]
    return longest_first(configs, opts.seeds)


def _grid_items(opts: StudyOptions, configs: list[dict[str, Any]], storage_path: str,
                fork: bool) -> list[GridItem]:
    """The experiment's trials in start order: with ``fork``, one supervised warm-up per seed
    (2 pairs, banks on, stopped at ``method.warmup_iters``; it publishes its checkpoint to
    :func:`~ctt.tune.grid.warmup_dir`) first, then the variant trials, each forking its seed's
    warm-up."""
    items: list[GridItem] = []
    base = opts.base
    until = base.method.warmup_iters
    for s in opts.seeds if fork else []:
        publish = warmup_dir(storage_path, s)
        cfg = trial_config(apply_variant(base.override({"run.seed": s}), "ctt"),
                            WARMUP_VARIANT, _until=until, _publish=publish)
        items.append(GridItem(key=f"{WARMUP}/{s}", config=cfg, publish=publish, until=until,
                              seed=s))
    for c in configs:
        seed = int(c["seed"])
        if fork:
            c = {**c, "_fork_from": warmup_dir(storage_path, seed)}
        items.append(GridItem(key=f"{c['variant']}/{seed}", config=c, seed=seed,
                              after=f"{WARMUP}/{seed}" if fork else None))
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
        if restoring:
            tuner = restore(session.exp_dir, opts, reporter, resume_errored=True)
        else:
            items = _grid_items(opts, configs, storage_path, fork)
            space = _common_space(items)
            searcher = GridSearcher(items, max_concurrent=opts.max_concurrent,
                                    record=str(study_dir / WARMUP_RECORD),
                                    failures=str(study_dir / WARMUP_FAILED))
            tuner = tune.Tuner(
                trainable(opts), param_space=space,
                tune_config=tune.TuneConfig(
                    search_alg=searcher, num_samples=len(items), reuse_actors=True,
                    trial_dirname_creator=_trial_dirname),
                run_config=run_config(opts, storage_path, EXPERIMENT, callbacks, reporter))
        # Tune keeps one trial pending at a time for a custom searcher, so a second slot (or
        # node) would wait for the first trial to start, and a short trial may finish and
        # hand its actor on first: allow one pending trial per grid trial.
        with tune_env({"TUNE_MAX_PENDING_TRIALS_PG": str(opts.max_concurrent or session.total)}):
            session.fit(tuner)
        session.stop_if_interrupted()  # no report of an unfinished grid
        _check_warmups(study_dir)
        session.phase = "results"
        finish_study(study_dir, opts, time.time() - t0)
        return study_dir


