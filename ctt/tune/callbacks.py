"""Driver-side logging of a study: per-trial JSON files and TensorBoard (scalars + HParams).

Ray's automatic loggers are turned off (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``); this one
callback owns all logging, on the driver, so every file of a study is written by one process:

- ``<study_dir>/trials/<trial_id>/metrics.jsonl``: one JSON object per reported result: the
  trial's metric keys (docs/method.md#metric-names; ``time/*`` kept), ``trial_id``,
  ``step``, ``node_ip``/``hostname``, Ray's ``time_total_s`` as ``time/total_s``, and the
  ``error``/``pruned`` flags if the trial reported them. Ray's other bookkeeping keys are
  dropped.
- ``<study_dir>/trials/<trial_id>/trial.json``: ``trial_id, trial_name, tb_run, variant, seed,
  status, error, error_detail, pruned, step, wall_s, miou_final, miou_best, node_id,
  num_failures, config`` (the full flat config as the trial received it). ``status`` is
  RUNNING from start to end, then TERMINATED or ERROR.
- ``<study_dir>/tb/<variant>_seed<seed>_<trial_id>/``: scalars (tag = metric name, global
  step = ``step``) and, when the trial ends, one HParams session.

Status rules:
- ERROR: Ray reported the trial as failed, or the trial reported ``{"error": "..."}`` (a
  deterministic failure such as a NaN loss, which the trainable reports and then returns
  instead of raising so that Ray does not retry it).
- pruned: status TERMINATED and either a result said ``pruned: True`` or the last step is below
  ``config["optim.iters"]`` (a scheduler stopped it early).

TensorBoard HParams: every trial (finished, pruned or errored) gets one session
(:mod:`ctt.tune.hparams`: its columns, order and metrics).

Resume (``Tuner.restore`` / ``--resume``, or a trial restarted by ``FailureConfig``): the first
result a (re)started trial sends truncates its metrics.jsonl to the steps before it and opens
the TensorBoard writer with ``purge_step`` at it, so replayed steps are neither duplicated in
the files nor drawn twice; ``ctt.tune.results`` additionally deduplicates by (trial_id, step),
keeping the last record. Summaries (``miou_best`` ...) are recomputed from metrics.jsonl at the
end of a trial, so they survive a driver restart.

Robustness: no hook ever raises (Ray would abort the whole study); a failure is logged as a
warning and the study goes on.

URI storage: :class:`StudySyncCallback`, listed after this one, pushes the study's files to
storage on every trial end and every ``--sync-every`` seconds (:mod:`ctt.tune.storage`).

Paths and file formats are those of :mod:`ctt.tune.layout` (the reader uses the same module):
metrics.jsonl records go through :mod:`ctt.fileio`'s one encoder, trial.json is replaced
atomically.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

from ctt.fileio import append_record, truncate_records
from ctt.tune.hparams import HPARAMS_METRICS, STATUSES, hparams_columns, write_hparams_session
from ctt.tune.layout import (
    NON_METRIC_KEYS,
    list_trial_ids,
    metrics_jsonl_path,
    read_history,
    read_json,
    study_json_path,
    summarise_metrics,
    tb_dir,
    tb_run_name,
    trial_json_path,
    write_json,
)
from ctt.tune.space import ONE_MINUS, resolve_one_minus
from ctt.tune.storage import local_path, portable_path
from ctt.tune.trial_errors import ray_trial_error

log = logging.getLogger(__name__)

# Ray's per-result bookkeeping (ray.tune.result.AUTO_RESULT_KEYS and friends), dropped from
# metrics.jsonl. node_ip/hostname stay (they identify the node), time_total_s is renamed.
RAY_BOOKKEEPING_KEYS = frozenset({
    "done", "training_iteration", "trial_id", "experiment_id", "experiment_tag", "date",
    "timestamp", "pid", "config", "time_this_iter_s", "time_total_s", "time_since_restore",
    "timesteps_since_restore", "iterations_since_restore", "timesteps_total",
    "episodes_total", "timesteps_this_iter", "episodes_this_iter", "checkpoint_dir_name",
    "should_checkpoint", "trainable_name",
})


def clean_result(result: dict, trial_id: str) -> dict:
    """The record stored in metrics.jsonl for one Ray result (see module docstring)."""
    rec: dict[str, Any] = {"trial_id": trial_id}
    step = result.get("step", result.get("training_iteration"))
    rec["step"] = int(step) if step is not None else 0
    for k, v in result.items():
        if k in RAY_BOOKKEEPING_KEYS or k.startswith("__") or k == "step":
            continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            rec[k] = v
        elif hasattr(v, "item"):  # numpy / torch scalars
            rec[k] = v.item()
    if isinstance(result.get("time_total_s"), (int, float)):
        rec["time/total_s"] = float(result["time_total_s"])
    return rec


def _has_event_files(logdir: str) -> bool:
    return bool(glob.glob(os.path.join(glob.escape(logdir), "events.out.tfevents.*")))


def _never_raise(hook):
    """Ray aborts the study when a callback raises; logging must never do that."""

    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception:
            log.warning("StudyLoggerCallback.%s failed; the study continues",
                        hook.__name__, exc_info=True)
            return None

    return wrapper


@dataclass
class _TrialLog:
    """Driver-side state of one trial between its start and its end (not checkpointed)."""

    run_name: str
    restarted: bool = True  # the next result is the first after a (re)start
    writer: Any = None
    started_at: float = 0.0


class StudyLoggerCallback(Callback):
    """Writes trial.json, metrics.jsonl and TensorBoard files of a study (see module doc).

    Args:
        study_dir: the study directory (local path for now).
        flush_secs: how often TensorBoard event files are flushed while a trial runs.
    """

    def __init__(self, study_dir: str | os.PathLike, flush_secs: int = 10) -> None:
        self.study_dir = os.path.abspath(os.fspath(study_dir))
        self.flush_secs = flush_secs
        self._trials: dict[str, _TrialLog] = {}
        self._axes: tuple[list[str], list[str] | None] | None = None
        self._lost_checked = False

    # Tune pickles its callbacks with the experiment state; open writers must not travel. A
    # staged study's directory travels relative to the staging root: a resume on a new head
    # whose $CTT_STAGING differs writes to its own copy (ctt.tune.storage.portable_path).
    def __getstate__(self) -> dict:
        return {"study_dir": portable_path(self.study_dir), "flush_secs": self.flush_secs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(local_path(state["study_dir"]), state["flush_secs"])

    # ---- helpers -------------------------------------------------------------------------

    @staticmethod
    def _variant_seed(config: dict) -> tuple[str, Any]:
        variant = str(config.get("variant", "unknown"))
        seed = config.get("seed", config.get("run.seed"))
        return variant, seed

    def _log_for(self, trial: Any) -> _TrialLog:
        tl = self._trials.get(trial.trial_id)
        if tl is None:
            variant, seed = self._variant_seed(resolve_one_minus(dict(trial.config)))
            tl = _TrialLog(run_name=tb_run_name(variant, seed, trial.trial_id),
                           started_at=time.time())
            self._trials[trial.trial_id] = tl
        return tl

    def _study_axes(self) -> tuple[list[str], list[str] | None]:
        """(swept keys, every variant name or None) of the study, from its ``study.json``
        (read once it exists): the HParams columns shown first and the variant filter."""
        if self._axes is None:
            study = read_json(study_json_path(self.study_dir))
            if not isinstance(study, dict):
                return [], None  # no study.json (yet): plain columns, read again next time
            space = study.get("space")
            swept = [str(k).removeprefix(ONE_MINUS) for k in space] \
                if isinstance(space, (dict, list)) else []
            declared = study.get("variants")
            if isinstance(declared, dict):
                declared = list(declared)
            if not isinstance(declared, list) and isinstance(study.get("variant"), str):
                declared = [study["variant"]]
            variants = [str(v) for v in declared] if isinstance(declared, list) else None
            self._axes = (swept, variants)
        return self._axes

    def _close_writer(self, tl: _TrialLog) -> None:
        if tl.writer is not None:
            writer, tl.writer = tl.writer, None
            writer.close()

    def _write_trial_json(self, trial: Any, tl: Any, variant: Any, seed: Any,
                          config: dict, **fields: Any) -> None:
        """trial.json: the trial's identity, then ``fields`` (status, summary, times), then
        its config."""
        write_json(trial_json_path(self.study_dir, trial.trial_id), {
            "trial_id": trial.trial_id, "trial_name": str(trial), "tb_run": tl.run_name,
            "variant": variant, "seed": seed, **fields,
            "num_failures": getattr(trial, "num_failures", 0), "config": config})

    def _mark_restarted(self, trial: Any) -> None:
        tl = self._log_for(trial)
        self._close_writer(tl)
        tl.restarted = True

    # ---- Ray hooks -----------------------------------------------------------------------

    @_never_raise
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._mark_restarted(trial)
        tl = self._log_for(trial)
        config = resolve_one_minus(dict(trial.config))
        variant, seed = self._variant_seed(config)
        old = read_json(trial_json_path(self.study_dir, trial.trial_id)) or {}
        self._write_trial_json(
            trial, tl, variant, seed, config, status="RUNNING", error=None, pruned=False,
            step=None, wall_s=None, miou_final=None, miou_best=None, node_id=None,
            start_time=old.get("start_time", time.time()))

    @_never_raise
    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        # Tune's first loop turn holds every trial it restored, before it creates new ones.
        if not self._lost_checked:
            self._lost_checked = True
            self._mark_lost({t.trial_id for t in trials})

    def _mark_lost(self, known: set[str]) -> None:
        """A trial directory the experiment does not hold and whose trial.json still says
        RUNNING belongs to a trial lost with the driver (it started after the snapshot a resume
        restored): it becomes ERROR with :data:`LOST_ERROR`, so no table shows it running. A
        finished one (it ended before the driver was lost) is kept as it is."""
        for tid in list_trial_ids(self.study_dir):
            path = trial_json_path(self.study_dir, tid)
            info = read_json(path)
            if tid in known or not isinstance(info, dict) or info.get("status") != "RUNNING":
                continue
            write_json(path, {**info, "status": "ERROR", "error": LOST_ERROR,
                              "end_time": time.time()})
            log.warning("trial %s was lost with the driver before Tune's snapshot held it; "
                        "%s marks it ERROR", tid, path)

    @_never_raise
    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._mark_restarted(trial)

    @_never_raise
    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._mark_restarted(trial)

    @_never_raise
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        tl = self._log_for(trial)
        rec = clean_result(result, trial.trial_id)
        path = metrics_jsonl_path(self.study_dir, trial.trial_id)
        logdir = tb_dir(self.study_dir, tl.run_name)
        purge_step = None
        if tl.restarted:
            tl.restarted = False
            truncate_records(path, rec["step"])  # a restarted trial replays the later steps
            if _has_event_files(logdir):
                purge_step = rec["step"]
        append_record(path, rec)
        if tl.writer is None:
            from tensorboardX import SummaryWriter

            # tensorboardX names event files by the second; a trial restarted within the
            # same second would overwrite its earlier file without a unique suffix.
            tl.writer = SummaryWriter(logdir=logdir, purge_step=purge_step,
                                      flush_secs=self.flush_secs,
                                      filename_suffix=f".{time.time_ns()}")
        for k, v in rec.items():
            if k not in NON_METRIC_KEYS and isinstance(v, (bool, int, float)):
                tl.writer.add_scalar(k, float(v), rec["step"])

    @_never_raise
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, ray_error=None)

    @_never_raise
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, ray_error=ray_trial_error(trial))

    @_never_raise
    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for tl in self._trials.values():
            self._close_writer(tl)

    # ---- end of a trial ------------------------------------------------------------------

    def _finish(self, trial: Any, ray_error: tuple[str, str] | None) -> None:
        tl = self._log_for(trial)
        self._close_writer(tl)
        config = resolve_one_minus(dict(trial.config))
        variant, seed = self._variant_seed(config)
        s = summarise_metrics(read_history(metrics_jsonl_path(self.study_dir, trial.trial_id)))

        error = detail = None
        if s["error"] is not None:  # the trial's own diagnosis is the most precise
            error, detail = s["error"], ray_error[1] if ray_error else None
        elif ray_error is not None:
            error, detail = ray_error
        status = "ERROR" if error is not None else "TERMINATED"
        iters = config.get("optim.iters")
        pruned = status == "TERMINATED" and (
            s["pruned_flag"]
            or (isinstance(iters, int) and s["step"] is not None and s["step"] < iters))

        wall_s = s["wall_s"]
        if wall_s is None:
            wall_s = time.time() - tl.started_at
        node_id = s["node_id"] or getattr(trial, "node_ip", None)
        old = read_json(trial_json_path(self.study_dir, trial.trial_id)) or {}
        self._write_trial_json(
            trial, tl, variant, seed, config, status=status, error=error, error_detail=detail,
            pruned=bool(pruned), step=s["step"], wall_s=wall_s, miou_final=s["miou_final"],
            miou_best=s["miou_best"], node_id=node_id, start_time=old.get("start_time"),
            end_time=time.time())

        hp_status = "PRUNED" if pruned else status
        swept, variants = self._study_axes()
        hparams, lead = hparams_columns(config, variant, seed, hp_status, swept)
        domains: dict[str, Sequence[Any]] = {"status": STATUSES}
        if variants and variant in variants:
            domains["variant"] = variants
        # Only measured values (module doc): all for a finished trial, the best so far for a
        # pruned one, none for an errored one. summarise_metrics keeps finite values only.
        measured = {"TERMINATED": HPARAMS_METRICS, "PRUNED": ("miou_best",)}.get(hp_status, ())
        metrics = {k: float(s[k]) for k in measured if s[k] is not None}
        write_hparams_session(tb_dir(self.study_dir, tl.run_name), hparams, metrics,
                              hp_status, s["step"] or 0, lead=lead, domains=domains)
        del self._trials[trial.trial_id]


# What a trial directory under trials/ says when the restored experiment does not hold it.
LOST_ERROR = ("lost with the driver: the trial started after Tune's last snapshot of the "
              "experiment, which the resume restored, so it was not resumed; the study ran a "
              "new trial in its place")


def _exists(fs: Any, path: str) -> bool:
    from pyarrow.fs import FileType

    return fs.get_file_info(path).type != FileType.NotFound


class CheckpointRepairCallback(Callback):
    """Points a (re)starting trial at a checkpoint that exists, before Tune restores it.

    Tune 2.60 deletes a trial's surplus checkpoints (``CheckpointConfig(num_to_keep)``) as soon
    as a new one is registered, but records which one is the latest only in its next experiment
    snapshot. A driver lost in between leaves a snapshot whose latest checkpoint is gone: with a
    score-ordered retention one better checkpoint is enough (measured: killed with
    checkpoint_000009 just registered, the snapshot named the deleted checkpoint_000008), and
    Tune then fails the trial's restore ``max_failures`` times and marks it ERROR. Tune calls
    ``on_trial_start`` after the trial's actor started and before it schedules the restore; this
    hook replaces a missing latest checkpoint by the newest kept one that still holds its
    ``state.pt`` (``None``, a start from scratch, if none does), and forgets kept checkpoints
    that are gone (Tune would otherwise fail to delete them again, with an ERROR). The trial
    replays the steps after it; :class:`StudyLoggerCallback` truncates its files to the replayed
    step and Optuna keeps the values it already holds. Listed before the other callbacks.
    """

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            self.repair(trial)
        except Exception:  # noqa: BLE001 - Tune's own restore error is the fallback
            log.warning("checking trial %s's checkpoint before its restore failed",
                        trial, exc_info=True)

    @staticmethod
    def repair(trial: Any) -> bool:
        """Repair ``trial``'s checkpoint bookkeeping (see class doc); True if it changed."""
        from ray.train._internal.checkpoint_manager import _CheckpointManager

        from ctt.tune.trainable import CHECKPOINT_FILE

        manager = trial.run_metadata.checkpoint_manager
        latest = manager.latest_checkpoint_result
        if latest is None or latest.checkpoint is None:
            return False

        def whole(result: Any) -> bool:
            ckpt = result.checkpoint
            return _exists(ckpt.filesystem, f"{ckpt.path.rstrip('/')}/{CHECKPOINT_FILE}")

        results = manager.best_checkpoint_results
        kept = [r for r in results if whole(r)]
        if len(kept) == len(results) and whole(latest):
            return False
        kept.sort(key=lambda r: r.metrics.get("training_iteration", 0))
        # Registered oldest first, so the newest is the latest; no more than it keeps, so the
        # fresh manager deletes nothing.
        fresh = _CheckpointManager(manager.checkpoint_config)
        for result in kept:
            fresh.register_checkpoint(result)
        trial.run_metadata.checkpoint_manager = fresh
        if whole(latest):
            # Only older kept ones were deleted after the snapshot: Tune would try to delete
            # them again when the next checkpoint comes and log an ERROR with its traceback for
            # a file that is rightly gone. Nothing changes for the resume: no word of it.
            return True
        step = kept[-1].metrics.get("step") if kept else None
        log.warning("trial %s: its latest checkpoint %s was deleted after Tune's last "
                    "snapshot (Tune's checkpoint retention); it resumes from %s", trial,
                    os.path.basename(latest.checkpoint.path.rstrip("/")),
                    f"step {step} ({os.path.basename(kept[-1].checkpoint.path.rstrip('/'))})"
                    if kept else "the start (no kept checkpoint is left)")
        return True


class StudySyncCallback(Callback):
    """Pushes a URI study's driver-side files to storage (:class:`ctt.tune.storage.StudySync`)
    on every trial end and, from Tune's driver loop, whenever the study's ``--sync-every``
    interval has passed. Listed after :class:`StudyLoggerCallback`, so a trial's end is pushed
    after its files were written. Pickled with Tune's experiment, it holds only the study's
    name and pushes with the study's registered sync (:func:`ctt.tune.storage.active`), so a
    restored experiment pushes to wherever the resumed study stores. A failed push is a
    warning (the next one retries): it must not stop the study.
    """

    def __init__(self, study: str) -> None:
        self.study = study

    def _push(self, force: bool) -> None:
        from ctt.tune.storage import active

        sync = active(self.study)
        if sync is None or not (force or sync.due()):
            return
        try:
            sync.push()
        except Exception:  # noqa: BLE001 - storage trouble must not abort the study
            log.warning("syncing study %s to %s failed; retrying at the next trial end or "
                        "interval", self.study, sync.remote, exc_info=True)

    # Tune 2.60 calls on_step_end after each turn of its driver loop (an event handled, the
    # experiment snapshot taken): the timed push. There is no on_step hook to override.
    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._push(force=False)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._push(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._push(force=True)
