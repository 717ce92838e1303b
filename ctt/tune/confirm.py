"""After a sweep: its best configs rerun on fresh seeds, and trials evaluated on the held-out
test split.

A search ranks configs on one seed, where a lucky seed can win: :func:`confirm_winners` reruns
the best few (:func:`confirm_candidates`) on fresh seeds in their own Tune experiment
(``ray-confirm``, resumable), logged under ``confirm/`` apart from the search's trials, and
names the winner by the confirmed mean (``confirm.json``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ctt.config import CTTConfig
from ctt.tune.callbacks import StudyLoggerCallback
from ctt.tune.experiment import (
    can_restore,
    experiment_dir,
    fixed_trials,
    restore,
    run_config,
    trainable,
    trial_config,
)
from ctt.tune.layout import CONFIRM_DIR, CONFIRM_EXPERIMENT, CONFIRM_JSON, finite, write_json
from ctt.tune.optuna_search import TUNE_TRIAL_ID_ATTR
from ctt.tune.stats import mean_std
from ctt.tune.trainable import CHECKPOINT_FILE

__all__ = ["confirm_candidates", "confirm_seed_list", "confirm_winners", "mean_and_std",
           "test_eval"]

def test_eval(config: dict[str, Any], checkpoint: tune.Checkpoint) -> dict[str, Any]:
    """Load a trial checkpoint and evaluate every network on the test split (runs as a Ray
    task with the trial's resources, so a GPU study evaluates on a GPU worker, not the head).
    Returns ``{"test": metrics, "checkpoint_step": the checkpoint's step}``."""
    from ctt.state import TrainState
    from ctt.train import Trainer
    from ctt.tune.trainable import split_config

    cfg, _ = split_config(config)
    with checkpoint.as_directory() as d:
        state = TrainState.load(Path(d) / CHECKPOINT_FILE, cfg)
    trainer = Trainer(cfg, state)
    return {"test": trainer.evaluate("test") if "test" in trainer.datasets else {},
            "checkpoint_step": int(state.step)}


def mean_and_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (:func:`ctt.tune.stats.mean_std`) as ``confirm.json`` records
    them: None where undefined (no value; one value's std)."""
    mean, std = mean_std(values)
    return finite(mean), finite(std)


def confirm_seed_list(search_seed: int, n_seeds: int) -> list[int]:
    """Fresh seeds for the confirmation runs: the ones after the search's seed."""
    return [search_seed + 1 + i for i in range(n_seeds)]


def confirm_candidates(study: Any, top: int) -> list[tuple[Any, float, int | None]]:
    """The search trials a confirmation reruns: ``(trial, search value, step)`` of the ``top``
    best COMPLETE trials by value (step None: the full budget), then, while fewer than
    ``top`` ran to the end, the PRUNED trials by their last intermediate value (step: Optuna's
    step of that value), best first.

    Why pruned ones: a pruner stops every trial it forecasts below the best, so a sweep with
    one strong early trial can finish just that one (a 16-trial ``voc_sweep.py`` finished 1 and
    pruned 15), and "top 3" would confirm nothing but it. Their last value is the furthest
    evidence the search holds; a confirmation trains them in full on fresh seeds, which also
    rescues a slow starter the pruner misjudged. Failed trials are never candidates."""
    from optuna.trial import TrialState

    complete = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                       if t.value is not None and math.isfinite(t.value)),
                      key=lambda t: t.value, reverse=True)
    out: list[tuple[Any, float, int | None]] = [(t, float(t.value), None)
                                                for t in complete[:top]]
    pruned = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        seen = [(s, v) for s, v in t.intermediate_values.items() if math.isfinite(v)]
        if seen:
            step, value = max(seen)
            pruned.append((t, float(value), int(step)))
    # best last value first; a tie goes to the trial that got further, then the earlier one
    pruned.sort(key=lambda c: (-c[1], -c[2], c[0].number))
    return out + pruned[:max(0, top - len(out))]


def confirm_winners(session: Any, grid: Any, study: Any, base: CTTConfig, variant: str,
                    metric: str, *, top: int, n_seeds: int, ranking: str,
                    step_offset: int) -> dict[str, Any] | None:
    """Rerun the ``top`` best configs of the search (:func:`confirm_candidates`: COMPLETE
    trials by the sweep's ``ranking`` value, topped up with PRUNED ones by their last
    value) on ``n_seeds`` fresh seeds and name the winner by the confirmed mean: a search
    ranks configs on one seed, where a lucky seed can win.

    The runs are a small grid (variant label ``<variant>-top<rank>``, seeds
    :func:`confirm_seed_list`) in their own Tune experiment (``ray-confirm``, resumable) and
    logged under ``confirm/`` (``trials/``, ``tb/``), apart from the search's trials. Writes
    and returns the ``confirm.json`` record: per candidate its search value and its confirmed
    values, mean, sample std, n and failures; the winner, with the test-split mean ± std of
    its confirmation runs' final checkpoints when the data has a test split. None when the
    search has no candidate (every trial failed). ``session``: the sweep's
    :class:`~ctt.tune.runtime.StudySession`; ``step_offset``: where Optuna's steps start
    (:func:`ctt.tune.sweep.sweep_step_offset`)."""
    from ctt.tune.trainable import split_config

    opts, study_dir = session.opts, session.study_dir
    results = {(r.metrics or {}).get("trial_id"): r for r in grid}
    seeds = confirm_seed_list(opts.seeds[0], n_seeds)
    flat_base = base.to_flat()
    candidates, configs = [], []
    for rank, (ft, value, step) in enumerate(confirm_candidates(study, top), 1):
        res = results.get(ft.user_attrs.get(TUNE_TRIAL_ID_ATTR))
        if res is None:
            continue
        cfg, _ = split_config(res.config)
        label = f"{variant}-top{rank}"
        candidates.append({
            "rank": rank, "label": label, "trial_id": ft.user_attrs.get(TUNE_TRIAL_ID_ATTR),
            "optuna_trial": ft.number, "search_seed": opts.seeds[0], "search_value": value,
            # a pruned candidate's value is its last one, at this training step
            "search_state": ft.state.name,
            "search_step": base.optim.iters if step is None else step + step_offset,
            "config": {k: v for k, v in cfg.to_flat().items()
                       if k != "run.seed" and flat_base.get(k) != v}})
        configs += [trial_config(cfg.override({"run.seed": s}), label) for s in seeds]
    if not candidates:
        return None
    exp_dir = experiment_dir(session.storage_path, CONFIRM_EXPERIMENT)
    reporter = session.reporter(trials=configs, warmup_fork=False, metric=metric,
                                what="confirmation")
    if can_restore(exp_dir):
        tuner = restore(exp_dir, opts, reporter, resume_errored=False)
    else:
        space, gen = fixed_trials(configs, opts.max_concurrent)
        tuner = tune.Tuner(
            trainable(opts), param_space=space,
            tune_config=tune.TuneConfig(search_alg=gen, num_samples=len(configs),
                                        reuse_actors=True),
            run_config=run_config(opts, session.storage_path, CONFIRM_EXPERIMENT,
                                  [StudyLoggerCallback(study_dir / CONFIRM_DIR)], reporter))
    confirm_grid = session.fit(tuner)
    session.stop_if_interrupted()
    values: dict[str, list[tuple[int, float]]] = {c["label"]: [] for c in candidates}
    failed: dict[str, int] = dict.fromkeys(values, 0)
    finished: dict[str, list[Any]] = {label: [] for label in values}
    for res in confirm_grid:
        m, label = res.metrics or {}, res.config.get("variant")
        if label not in values:
            continue
        value = m.get(metric)
        ok = (res.error is None and not m.get("error") and m.get("step") == base.optim.iters
              and finite(value) is not None)
        if ok:
            values[label].append((int(res.config["seed"]), float(value)))
            finished[label].append(res)
        else:
            failed[label] += 1
    for c in candidates:
        got = sorted(values[c["label"]])
        mean, std = mean_and_std([v for _, v in got])
        c.update({"confirm_seeds": [s for s, _ in got], "confirm_values": [v for _, v in got],
                  "confirm_mean": mean, "confirm_std": std, "confirm_n": len(got),
                  "confirm_failed": failed[c["label"]]})
    scored = [c for c in candidates if c["confirm_mean"] is not None]
    winner = max(scored, key=lambda c: c["confirm_mean"]) if scored else None
    out = {"metric": metric, "ranking": ranking, "top": top,
           "seeds": seeds, "candidates": candidates,
           "winner": None if winner is None else {
               k: winner[k] for k in ("rank", "label", "trial_id", "search_value",
                                      "search_state", "search_step", "confirm_mean",
                                      "confirm_std", "confirm_n")}}
    runs = [r for r in finished.get(winner["label"], []) if r.checkpoint is not None] \
        if winner else []
    if runs and base.data.test_split != "none":
        # the winner's confirmation runs on the held-out test split (final checkpoints)
        task = ray.remote(num_cpus=opts.cpus_per_trial,
                          num_gpus=opts.gpus_per_trial)(test_eval)
        tested = ray.get([task.remote(r.config, r.checkpoint) for r in runs])
        test_values = [t["test"][metric] for t in tested if metric in t["test"]]
        mean, std = mean_and_std(test_values)
        out["winner"].update({"test_mean": mean, "test_std": std, "test_n": len(test_values)})
    write_json(study_dir / CONFIRM_JSON, out)
    return out
