"""Tune plumbing every study shares: the run config (callbacks, failures, checkpoints,
progress output), the trainable with its resources, fixed trial lists, and where an experiment
lives and whether it can be restored."""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.search import BasicVariantGenerator

from ctt.config import CTTConfig
from ctt.tune import storage as study_storage
from ctt.tune.callbacks import CheckpointRepairCallback, StudySyncCallback
from ctt.tune.trainable import train_ctt, trial_resources

__all__ = ["can_restore", "experiment_dir", "fixed_trials", "ray_status_table", "restore",
           "run_config", "trainable", "trial_config"]

# Seconds between two of Ray's status tables (``--verbose``).
RAY_TABLE_EVERY_S = 30


def ray_status_table(extra_params: list[str]) -> tune.ProgressReporter:
    """Ray's own status table (``--verbose``): every trial with its step, loss and mIoU."""
    return tune.CLIReporter(
        metric_columns={"step": "step", "loss/total": "loss", "miou": "mIoU"},
        parameter_columns={"variant": "variant", "seed": "seed",
                           **{p: p.replace("method.", "") for p in extra_params}},
        max_report_frequency=RAY_TABLE_EVERY_S, sort_by_metric=False,
        # Ray decides this from the global verbosity when the reporter is built, which may be
        # an earlier fit's setting in this process: without it the tables can vanish.
        print_intermediate_tables=True)


def run_config(opts: Any, storage_path: str, name: str, callbacks: list,
               reporter: tune.ProgressReporter,
               checkpoint_config: tune.CheckpointConfig | None = None) -> tune.RunConfig:
    """The ``RunConfig`` of one of the study's experiments (``opts``: its
    :class:`~ctt.tune.runtime.StudyOptions`)."""
    # Ray's auto loggers are off (our callback owns TensorBoard); keep its JSON results so the
    # ResultGrid (best trial, restore) has metrics.
    from ray.tune.logger import JsonLoggerCallback

    # A URI study's files go to storage after the loggers wrote them (ctt.tune.storage).
    if study_storage.is_uri(opts.storage):
        callbacks = [*callbacks, StudySyncCallback(opts.name)]
    return tune.RunConfig(
        name=name, storage_path=storage_path,
        callbacks=[CheckpointRepairCallback(), *callbacks, JsonLoggerCallback()],
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        checkpoint_config=checkpoint_config or tune.CheckpointConfig(num_to_keep=3),
        sync_config=tune.SyncConfig(sync_artifacts=True, sync_period=60),
        progress_reporter=reporter, verbose=opts.verbose)


def restore(exp_dir: str, opts: Any, reporter: tune.ProgressReporter, *,
            resume_errored: bool) -> tune.Tuner:
    """``Tuner.restore`` of an interrupted experiment, unfinished trials resumed, printing
    through this run's ``reporter`` at this run's verbosity: Tune would reuse the run config
    pickled by the first run, whose reporter measured another process's clock."""
    tuner = tune.Tuner.restore(exp_dir, trainable(opts), resume_unfinished=True,
                               resume_errored=resume_errored)
    # Tuner.restore takes no RunConfig; the restored one is the Tuner's own to adjust.
    restored = tuner._local_tuner.get_run_config()
    restored.progress_reporter, restored.verbose = reporter, opts.verbose
    return tuner


def trainable(opts: Any) -> Any:
    """:func:`ctt.tune.trainable.train_ctt` with one trial's CPUs and GPUs."""
    return tune.with_resources(train_ctt, trial_resources(opts.cpus_per_trial,
                                                          opts.gpus_per_trial))


def trial_config(cfg: CTTConfig, variant: str, **meta: Any) -> dict[str, Any]:
    """A trial's flat config: ``cfg`` with its ``variant`` and ``seed`` (and ``meta``)."""
    return {**cfg.to_flat(), "variant": variant, "seed": cfg.run.seed, **meta}


def fixed_trials(configs: list[dict[str, Any]], max_concurrent: int = 0
                 ) -> tuple[dict[str, Any], BasicVariantGenerator]:
    """A param space and generator that yield exactly ``configs`` (Tune requires every preset
    key in the space: keys that vary become a ``tune.choice`` the points override).
    ``max_concurrent`` (0 = no limit) lives here: Tune ignores ``max_concurrent_trials`` with a
    ``BasicVariantGenerator``."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    # A point missing a key would get a random sample of that key's choice: fill with None.
    configs = [{k: c.get(k) for k in keys} for c in configs]
    space: dict[str, Any] = {}
    for key in keys:
        values = list(dict.fromkeys(c.get(key) for c in configs))
        space[key] = values[0] if len(values) == 1 else tune.choice(values)
    return space, BasicVariantGenerator(points_to_evaluate=configs,
                                        max_concurrent=max_concurrent)


def experiment_dir(storage_path: str, name: str) -> str:
    """Where Tune keeps the experiment ``name`` of a study stored at ``storage_path``."""
    return study_storage.join_uri(storage_path, name)


def can_restore(path: str) -> bool:
    """Whether ``path`` holds a Tune experiment that ``Tuner.restore`` can continue."""
    try:
        return tune.Tuner.can_restore(path)
    except Exception:  # noqa: BLE001 - missing bucket/dir means "nothing to restore"
        return False
