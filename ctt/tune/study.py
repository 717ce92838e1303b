"""Studies: an ablation grid (variants x seeds) or an Optuna sweep, run by Ray Tune.

Study directory ``<storage>/<name>/`` (local path; with a URI storage the driver's files are
staged locally in ``$CTT_STAGING/<name>`` and pushed through ``pyarrow.fs`` on every trial end,
at least every ``--sync-every`` seconds and at the end, while Tune writes its experiment and
checkpoints straight to the URI; a ``--resume`` whose staging lacks the study first pulls them
back: :mod:`ctt.tune.storage`)::

    study.json        resolved definition, command, package versions, git commit
    ray/              the Tune experiment (trial checkpoints; resumable with --resume)
    warmup/seed-<s>/  the shared supervised warm-up checkpoint of each seed (ablations that
                      fork; with a URI storage it lives there). Its trial runs in ray/ with
                      the variants (ctt.tune.grid); warmup.json maps each seed whose warm-up
                      is done to it, warmup-failed.json names a warm-up that failed for good
    .study.lock       held while a study runs (pid, host, start time; ctt.rundir)
    trials/<id>/      trial.json and metrics.jsonl, written by the driver callback
    tb/<run>/         TensorBoard scalars + one HParams entry per trial
    trials.parquet, metrics.parquet, report.md, *.png
    optuna.journal    the sweep's Optuna study, written as it runs (Optuna's journal storage;
                      with --optuna-storage URL it is in that database instead)
    optuna.db         a sqlite snapshot of the sweep's Optuna study, written at the end
    ray-confirm/, confirm/, confirm.json
                      a sweep's confirmation runs (its best configs on fresh seeds): their
                      Tune experiment, their trials/ and tb/, the summary naming the winner

One study per directory, one process per study: the directory is locked before anything else
(before Ray starts) until the study ends, so a second study on it fails at once naming the
holder. A fresh start refuses a directory that already holds a study (``StudyExistsError``: the
trials would mix); ``--resume`` continues it and refuses a directory without one
(``NoStudyError``), and ``--smoke-test`` replaces its own ``*_smoke`` directory.

SIGINT/SIGTERM in any phase (Ray start, trials and shared warm-ups, test evaluation, results)
leaves :func:`run_ablation` / :func:`run_sweep` as :class:`~ctt.interrupts.Interrupted` with
``where`` and ``resumable`` set, after Tune's graceful stop (last experiment snapshot, trial
actors stopped): finished trials and warm-ups are kept and ``--resume`` continues the rest. No
report is built from an unfinished grid.

Ray runs in-process on loopback (no dashboard, small object store, every server bound to
127.0.0.1; tests/test_tune_study.py checks the listening sockets) unless ``address`` joins a
running cluster. Environment defaults set here: Ray's automatic loggers off (our callback writes
TensorBoard and HParams), the classic progress table (its custom columns show on Ray 2.60).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.search import BasicVariantGenerator

from ctt.config import CTTConfig, apply_variant, check_semantics, get_preset
from ctt.data.loader import dataset_root
from ctt.envinfo import environment
from ctt.errors import UserError, warn_all
from ctt.interrupts import Interrupted, SignalGuard
from ctt.rundir import STUDY_LOCK, DirLock
from ctt.tune import storage as study_storage
from ctt.tune.callbacks import CheckpointRepairCallback, StudyLoggerCallback, StudySyncCallback
from ctt.tune.grid import WARMUP_VARIANT, GridItem, GridSearcher, longest_first, published
from ctt.tune.layout import write_json
from ctt.tune.optuna_storage import (
    JOURNAL,
    SQLITE_SNAPSHOT,
    OptunaStorageError,
    export_sqlite,
    mask_url,
    open_journal,
    open_url,
)
from ctt.tune.report import summary_table
from ctt.tune.results import build_results
from ctt.tune.schedulers import (
    DEFAULT_SCHEDULER,
    TUNE_TRIAL_ID_ATTR,
    PruningAwareOptunaSearch,
    make_pruner,
    make_scheduler,
)
from ctt.tune.space import ONE_MINUS, resolve_config
from ctt.tune.tables import load_trials
from ctt.tune.trainable import CHECKPOINT_FILE, train_ctt, trial_resources

__all__ = ["NoStudyError", "StorageError", "StudyExistsError", "StudyFailedError",
           "StudyFlagsError", "StudyOptions", "best_result", "check_inputs", "check_storage",
           "confirm_candidates", "init_ray", "resume_differences", "run_ablation", "run_sweep"]

log = logging.getLogger(__name__)

EXPERIMENT = "ray"
WARMUP = "warmup"
OBJECT_STORE_BYTES = 300 * 1024**2
RAY_ENV_DEFAULTS = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0",
                    "RAY_USAGE_STATS_ENABLED": "0", "TUNE_GLOBAL_CHECKPOINT_S": "5",
                    # A deterministic failure's one result carries `error`, not the metric;
                    # Tune's strict check would abort the whole study on it.
                    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}


class StorageError(RuntimeError):
    """Study storage is unusable for this cluster (e.g. node-local storage, several nodes)."""


class StudyExistsError(RuntimeError):
    """A fresh (not ``--resume``) study would mix its trials with an existing study's."""


class StudyFailedError(RuntimeError):
    """Every trial of the study errored: there is nothing to compare."""


class NoStudyError(UserError):
    """``--resume`` of a study directory that holds no study."""


@dataclass
class StudyOptions:
    """Options shared by every study (the common CLI flags of ``studies/*.py``)."""

    name: str
    preset: str = "tiny"
    data_root: str | None = None
    split: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    iters: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0
    max_failures: int = 2
    storage: str = "studies_out"
    storage_shared: bool = False
    # seconds between the timed pushes of a URI study's driver-side files (ctt.tune.storage)
    sync_every: float = 60.0
    resume: bool = False
    address: str | None = None
    num_cpus: int | None = None
    device: str | None = None
    fork_warmup: bool = True
    verbose: int = 1
    # A fresh start deletes an existing local study directory of this name instead of refusing
    # (--smoke-test: throwaway results).
    replace_existing: bool = False

    def base_config(self) -> CTTConfig:
        """Preset + data root/split/iters/device + ``--set`` overrides."""
        flat: dict[str, Any] = {}
        if self.data_root:
            flat["data.root"] = self.data_root
        if self.split:
            flat["data.labeled_split"] = self.split
        if self.iters:
            flat["optim.iters"] = self.iters
        device = self.device or ("cuda" if self.gpus_per_trial > 0 else None)
        if device:
            flat["run.device"] = device
        flat.update(self.overrides)
        return get_preset(self.preset).override(flat)


# --- Ray and storage ---

def init_ray(opts: StudyOptions) -> None:
    """Join ``opts.address`` or start Ray in-process on 127.0.0.1 (never a bare ``ray.init()``,
    which would attach to any running cluster).

    Sets our defaults for Ray's and Tune's environment variables first (a value the user set
    wins); Ray and Tune read them when a run starts, not at import: the study callback owns all
    logging, the classic progress output, no usage stats, experiment state synced every 5 s,
    results without the study's metric allowed (a failed trial's ``error`` result)."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    if opts.address:
        ray.init(address=opts.address, log_to_driver=opts.verbose > 1)
        return
    # Ray "resolves" _node_ip_address=127.0.0.1 to the machine's routable IP, and then GCS,
    # raylet and workers listen on every interface ("::"). With cluster support off (the
    # macOS/Windows default) the node IP stays 127.0.0.1 and every gRPC server binds loopback.
    # The constant is read when Ray is imported, so set it on the module for this process and
    # in the environment for the processes Ray spawns.
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", _node_ip_address="127.0.0.1",
             num_cpus=opts.num_cpus or os.cpu_count(),
             num_gpus=None if opts.gpus_per_trial else 0,
             object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
             log_to_driver=opts.verbose > 1)


def check_inputs(opts: StudyOptions) -> CTTConfig:
    """Validate the study's config and data on the driver, before Ray starts: a bad key or a
    missing or mismatched data root is one error line, not 21 errored trials. Returns the base
    config. On a cluster (``address``) a data root that is absent on the driver's node is left
    to the trials, which run on nodes that may hold it."""
    base = opts.base_config()
    root = base.data.root
    if opts.address and root != "none" and not Path(root).expanduser().exists():
        print(f"note: data root {root} is not on this (driver) node; each trial checks it on "
              "its own node", flush=True)
    else:
        dataset_root(base)
    return base


def _check_outcome(study_dir: Path) -> None:
    """Raise :class:`StudyFailedError` naming the distinct errors when every trial failed."""
    trials = load_trials(study_dir)
    failed = [t for t in trials if t.get("status") == "ERROR"]
    if not trials or len(failed) < len(trials):
        return
    reasons = dict.fromkeys((str(t.get("error") or "unknown").strip().splitlines() or ["?"])[-1]
                            for t in failed)
    shown = "; ".join(list(reasons)[:3]) + ("; ..." if len(reasons) > 3 else "")
    raise StudyFailedError(f"all {len(trials)} trials failed: {shown} (each trial's error is in "
                           f"{study_dir / 'trials'}/<id>/trial.json)")


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_storage(storage: str, shared: bool) -> None:
    """Refuse a plain local path on a multi-node cluster unless declared shared: trials that
    move between nodes must find their checkpoints (this cannot be probed on one machine)."""
    if study_storage.is_uri(storage) or shared:
        return
    n = alive_nodes()
    if n > 1:
        raise StorageError(
            f"--storage {storage!r} is a node-local path but the cluster has {n} alive nodes; "
            "trials restarted on another node would lose their checkpoints. Pass shared "
            "storage (--storage s3://bucket/prefix, gs://..., or an NFS path with "
            "--storage-shared).")


# Set by Ray's job supervisor for the entrypoint of `ray job submit` (only there).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_job_storage(storage: str) -> None:
    """Refuse a relative local ``--storage`` in a ``ray job submit`` driver: its working
    directory is Ray's temporary copy of ``--working-dir`` under the head's session directory
    (a new one per submission), so the study would be written where neither a ``--resume``
    nor a reader finds it, and lost with the head."""
    if (study_storage.is_uri(storage) or Path(storage).expanduser().is_absolute()
            or RAY_JOB_ENV not in os.environ):
        return
    raise StorageError(
        f"--storage {storage!r} is a relative path and this study runs as a Ray job: its "
        f"working directory {os.getcwd()} is Ray's (a temporary copy of --working-dir). "
        "Pass shared storage by an absolute path (an NFS mount, with --storage-shared) or a "
        "URI (s3://bucket/prefix).")


def study_paths(opts: StudyOptions) -> tuple[Path, str]:
    """(local study dir for driver files, Tune storage path for experiments)."""
    if study_storage.is_uri(opts.storage):
        local = study_storage.staging_root()
        return (local / opts.name).resolve(), study_storage.join_uri(opts.storage, opts.name)
    study_dir = (Path(opts.storage) / opts.name).resolve()
    return study_dir, str(study_dir)


def _push(opts: StudyOptions) -> None:
    """Push the changed driver-side files of a running URI study to storage (nothing for a
    local study, whose directory is the storage)."""
    sync = study_storage.active(opts.name)
    if sync is None:
        return
    try:
        sync.push()
    except OSError as e:
        raise StorageError(f"pushing the study's files to {sync.remote} failed ({e}); they "
                           f"are in {sync.local_dir}") from e


def _write_study_json(study_dir: Path, payload: dict[str, Any]) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    path = study_dir / "study.json"
    if path.exists():  # keep the original definition; record the resume
        old = json.loads(path.read_text())
        old.setdefault("resumed", []).append({"time": time.time(),
                                              "command": [mask_url(a) for a in sys.argv]})
        payload = old
    write_json(path, payload)


# --- Tune plumbing ---

def _reporter(extra_params: list[str]) -> tune.ProgressReporter:
    return tune.CLIReporter(
        metric_columns={"step": "step", "loss/total": "loss", "miou": "mIoU"},
        parameter_columns={"variant": "variant", "seed": "seed",
                           **{p: p.replace("method.", "") for p in extra_params}},
        max_report_frequency=30, sort_by_metric=False,
        # Ray decides this from the global verbosity when the reporter is built, which may be
        # an earlier fit's setting in this process: without it the tables can vanish.
        print_intermediate_tables=True)


def _run_config(opts: StudyOptions, storage_path: str, name: str, callbacks: list,
                extra_params: list[str] | None = None,
                checkpoint_config: tune.CheckpointConfig | None = None) -> tune.RunConfig:
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
        progress_reporter=_reporter(extra_params or []), verbose=opts.verbose)


def _trainable(opts: StudyOptions):
    return tune.with_resources(train_ctt, trial_resources(opts.cpus_per_trial,
                                                          opts.gpus_per_trial))


def _trial_config(cfg: CTTConfig, variant: str, **meta: Any) -> dict[str, Any]:
    return {**cfg.to_flat(), "variant": variant, "seed": cfg.run.seed, **meta}


def _points(configs: list[dict[str, Any]], max_concurrent: int = 0
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


def _experiment_dir(storage_path: str, name: str) -> str:
    return study_storage.join_uri(storage_path, name)


def _can_restore(path: str) -> bool:
    try:
        return tune.Tuner.can_restore(path)
    except Exception:  # noqa: BLE001 - missing bucket/dir means "nothing to restore"
        return False


def _start_or_resume(opts: StudyOptions, study_dir: Path, exp_dir: str) -> bool:
    """True to restore the Tune experiment. A fresh start needs an unused study directory:
    Tune would add trials to the old experiment and the results would mix both studies.
    ``--resume`` needs a study there: its ``study.json`` (then, with no Tune experiment yet, the
    study starts again, keeping any warm-up checkpoint already published) or a restorable
    experiment. Call with the study directory locked."""
    restorable = _can_restore(exp_dir)
    exists = (study_dir / "study.json").exists() or restorable
    if opts.resume:
        if not exists:
            raise NoStudyError(
                f"nothing to resume at {study_dir}: it holds no study (no study.json) and "
                f"{exp_dir} no Tune experiment; check --out/--storage, or start the study "
                "without --resume")
        return restorable
    if exists:
        if opts.replace_existing and not study_storage.is_uri(opts.storage):
            for child in study_dir.iterdir():  # all but the lock we hold
                if child.name == STUDY_LOCK:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        else:
            raise StudyExistsError(
                f"study directory {study_dir} already holds a study; pass --resume to continue "
                "it, --out NAME to start another one, or delete the directory")
    return False


# --- one run of a study: lock, signals, phases ---

# What Tune logs when its SIGINT handler stops a fit: a multi-line "Resume experiment with:
# Tuner.restore(...)" that is not how a study resumes. The study prints its own one line.
_TUNE_INTERRUPT_LOGS = ("Stop signal received", "Experiment has been interrupted",
                        "Training has been interrupted", "Trials did not complete")


class _QuietTuneInterrupt(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TUNE_INTERRUPT_LOGS)


def _tune_catches_sigint() -> bool:
    """Whether ``Tuner.fit`` installs its graceful SIGINT handler (ray.tune.tune)."""
    return (threading.current_thread() is threading.main_thread()
            and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") or 0))


@contextlib.contextmanager
def _ray_keeps_our_sigterm() -> Iterator[None]:
    """``ray.init`` installs SIGTERM handlers in the driver (``sys.exit(15)``, then the
    in-process head node's "stop Ray's processes, exit 1") that would replace the study's.
    Skip them while Ray starts: Ray's processes are still stopped at exit by its atexit hook
    and by fate-sharing with the driver."""
    from ray._private import utils as ray_utils

    real = getattr(ray_utils, "set_sigterm_handler", None)
    if real is None:
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = real


class _Session:
    """One run of a study: the study directory's lock, the SIGINT/SIGTERM guard and the phase
    (for the line an interrupt prints)."""

    def __init__(self, opts: StudyOptions, guard: SignalGuard):
        self.opts, self.guard = opts, guard
        self.study_dir, self.storage_path = study_paths(opts)
        self.exp_dir = _experiment_dir(self.storage_path, EXPERIMENT)
        self.lock = DirLock(self.study_dir, STUDY_LOCK, "study")
        # a URI study's driver-side files <-> <storage>/<name> (ctt.tune.storage)
        self.sync = (study_storage.StudySync(self.study_dir, self.storage_path,
                                             every=opts.sync_every)
                     if study_storage.is_uri(opts.storage) else None)
        self.phase = "start"
        self.total = 0  # trials of the study
        self.warmups = 0  # shared warm-ups of the study (ablations that fork; ctt.tune.grid)

    def open(self, payload: dict[str, Any]) -> bool:
        """Lock the study directory, check start vs resume, start Ray, write study.json.
        Returns whether the Tune experiment is restored."""
        check_job_storage(self.opts.storage)  # before the lock creates a directory
        if (self.opts.resume and "://" not in self.opts.storage
                and not self.study_dir.is_dir()):  # refused before the lock creates it
            _start_or_resume(self.opts, self.study_dir, self.exp_dir)
        self.lock.acquire()
        if self.sync is not None:
            try:
                self._pull(payload)
            except OSError as e:  # no bucket, no credentials, no endpoint: one error line
                raise StorageError(f"cannot use the study's storage {self.storage_path}: "
                                   f"{e}") from e
            study_storage.register(self.opts.name, self.sync)
        self.phase = "ray"
        restoring = _start_or_resume(self.opts, self.study_dir, self.exp_dir)
        # Held while Ray starts: raised inside ray.init, an interrupt can land in an at-fork
        # hook (where Python prints and drops exceptions) or leave Ray half started. A second
        # signal still stops a start that hangs.
        with _ray_keeps_our_sigterm(), self.guard.deferred():
            init_ray(self.opts)
        self.guard.install()
        self.guard.check()
        check_storage(self.opts.storage, self.opts.storage_shared)
        _write_study_json(self.study_dir, payload)
        return restoring

    def _pull(self, payload: dict[str, Any]) -> None:
        """``--resume`` of a URI study whose staging directory lacks it (a new head): bring
        its driver-side files back from storage, then check the resume's flags against the
        restored study.json. A staging directory that holds the study is newer than (or as
        new as) what it pushed, and is kept. A fresh start refuses a storage that holds a
        study (:class:`StudyExistsError`), as it refuses a local directory that does."""
        if not self.opts.resume:
            if self.sync.exists("study.json"):  # the staging dir may just be another head's
                raise StudyExistsError(
                    f"{self.storage_path} already holds a study; pass --resume to continue it, "
                    "--out NAME to start another one, or delete it from the storage")
            return
        if (self.study_dir / "study.json").exists():
            return
        n = self.sync.pull(skip=(EXPERIMENT, CONFIRM_EXPERIMENT, WARMUP))
        if n:
            print(f"restored {n} study files from {self.storage_path} into {self.study_dir}",
                  flush=True)
        _check_resume(self.opts, self.study_dir, payload)

    def close_sync(self) -> None:
        """Last push of a URI study that stops (done, failed or interrupted: what it wrote
        since the last push), then forget its sync. A failure here is a warning: the study's
        own outcome is what the caller reports."""
        if self.sync is None or study_storage.active(self.opts.name) is not self.sync:
            return
        try:
            self.sync.push()
        except Exception as e:  # noqa: BLE001 - reported, never masks the study's outcome
            print(f"warning: the last sync of {self.study_dir} to {self.storage_path} failed "
                  f"({e}); --resume from this machine pushes it", file=sys.stderr, flush=True)
        finally:
            study_storage.unregister(self.opts.name)

    def fit(self, tuner: tune.Tuner) -> Any:
        """``tuner.fit()``. On SIGINT Tune's own handler stops it gracefully (last experiment
        snapshot written, trial actors stopped) and fit returns; SIGTERM is handed to that
        handler. Either way ``self.guard.signum`` is set afterwards."""
        self.guard.check()
        quiet = _QuietTuneInterrupt()
        tune_log = logging.getLogger("ray.tune.tune")
        tune_log.addFilter(quiet)
        try:
            with self.guard.delegating():
                grid = tuner.fit()
        finally:
            tune_log.removeFilter(quiet)
        # Tune's handler reinstalls the one it replaced (ours) when it fires, and stays
        # installed after a fit it did not stop.
        tune_stopped = self.guard.is_installed(signal.SIGINT) and _tune_catches_sigint()
        self.guard.install()
        if self.guard.signum is None and tune_stopped:
            self.guard.signum = signal.SIGINT
        return grid

    def stop_if_interrupted(self) -> None:
        if self.guard.signum is not None:
            raise Interrupted(self.guard.signum)

    def where(self) -> str:
        if self.phase == "start":
            return "before the study started"
        if self.phase == "ray":
            return "while starting Ray"
        trials = load_trials(self.study_dir) if (self.study_dir / "trials").is_dir() else []
        done = sum(t.get("status") in ("TERMINATED", "ERROR") for t in trials)
        total = max(self.total, len(trials))
        if self.phase == "trials":
            warm = _warmups_done(self.study_dir)
            if warm < self.warmups:  # warm-ups and variants share one experiment
                return (f"during the shared warm-up ({warm} of {self.warmups} seeds done) and "
                        f"the trials ({done} of {total} finished), kept")
            return f"during the trials ({done} of {total} finished, kept)"
        if self.phase == "warm-up":
            return "during the sweep's shared warm-up (no trial started yet)"
        if self.phase == "test":
            return f"while evaluating the best trial on the test split ({done} trials finished)"
        if self.phase == "confirm":
            return ("while rerunning the best configs on fresh seeds (search done, "
                    f"{done} trials finished)")
        return f"while building the results ({done} trials finished)"

    def resumable(self) -> bool:
        """Whether ``--resume`` finds a study (else the same command starts it again)."""
        return (self.study_dir / "study.json").exists()


@contextlib.contextmanager
def _session(opts: StudyOptions) -> Iterator[_Session]:
    """A :class:`_Session` whose guard and lock last as long as the block. An interrupt leaves
    as :class:`~ctt.interrupts.Interrupted` with ``where`` and ``resumable`` set."""
    with SignalGuard() as guard:
        session = _Session(opts, guard)
        try:
            yield session
        except Interrupted as e:
            with guard.deferred(forcible=False):  # reading the trials for the message
                e.where = session.where()
                e.resumable = session.resumable()
            raise
        finally:
            with guard.deferred(forcible=False):
                try:
                    session.close_sync()
                finally:
                    session.lock.release()


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (Tune reads some when a fit starts); a value
    the user exported wins."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


# --- ablation ---

WARMUP_RECORD, WARMUP_FAILED = "warmup.json", "warmup-failed.json"


def _warmups_done(study_dir: Path) -> int:
    try:
        return len(json.loads((study_dir / WARMUP_RECORD).read_text()))
    except (OSError, ValueError):
        return 0


def warmup_dir(storage_path: str, seed: int) -> str:
    """Where the shared warm-up of ``seed`` publishes its checkpoint (``state.pt``)."""
    return study_storage.join_uri(storage_path, WARMUP, f"seed-{seed}")


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
    base = opts.base_config()
    for v in variants:  # a setting a variant cannot honour is refused here, before Ray starts
        warn_all(check_semantics(apply_variant(base, v), v, study=True))
    configs = [_trial_config(apply_variant(base.override({"run.seed": s}), v), v)
               for s in opts.seeds for v in variants]
    return longest_first(configs, opts.seeds)


def _grid_items(opts: StudyOptions, configs: list[dict[str, Any]], storage_path: str,
                fork: bool) -> list[GridItem]:
    """The experiment's trials in start order: with ``fork``, one supervised warm-up per seed
    (2 pairs, banks on, stopped at ``method.warmup_iters``; it publishes its checkpoint to
    :func:`warmup_dir`) first, then the variant trials, each forking its seed's warm-up."""
    items: list[GridItem] = []
    base = opts.base_config()
    until = base.method.warmup_iters
    for s in opts.seeds if fork else []:
        publish = warmup_dir(storage_path, s)
        cfg = _trial_config(apply_variant(base.override({"run.seed": s}), "ctt"),
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
    with _session(opts) as session:
        # variant/--set conflicts fail first (cheap), then the data root (it may generate data)
        configs = ablation_trials(opts, variants)
        base = check_inputs(opts)
        session.total = len(configs)
        payload = {
            "name": opts.name, "kind": "ablation", "variants": variants, "seeds": opts.seeds,
            "preset": opts.preset, "options": asdict(opts), "base_config": base.to_flat(),
            "command": sys.argv, "created": time.time(), "env": environment()}
        _check_resume(opts, session.study_dir, payload)  # Tune would keep the old grid
        restoring = session.open(payload)
        study_dir, storage_path = session.study_dir, session.storage_path
        fork = (opts.fork_warmup and base.method.warmup_iters > 0
                and base.method.warmup_iters < base.optim.iters and len(variants) > 1)
        session.warmups = len(opts.seeds) if fork else 0
        t0 = time.time()
        callbacks = [_VariantTrialLogger(study_dir)]
        session.phase = "trials"
        if restoring:
            tuner = tune.Tuner.restore(session.exp_dir, _trainable(opts),
                                       resume_unfinished=True, resume_errored=True)
        else:
            items = _grid_items(opts, configs, storage_path, fork)
            space = _common_space(items)
            searcher = GridSearcher(items, max_concurrent=opts.max_concurrent,
                                    record=str(study_dir / WARMUP_RECORD),
                                    failures=str(study_dir / WARMUP_FAILED))
            tuner = tune.Tuner(
                _trainable(opts), param_space=space,
                tune_config=tune.TuneConfig(
                    search_alg=searcher, num_samples=len(items), reuse_actors=True,
                    trial_dirname_creator=_trial_dirname),
                run_config=_run_config(opts, storage_path, EXPERIMENT, callbacks))
        # Tune keeps one trial pending at a time for a custom searcher, so a second slot (or
        # node) would wait for the first trial to start, and a short trial may finish and
        # hand its actor on first: allow one pending trial per grid trial.
        with _env({"TUNE_MAX_PENDING_TRIALS_PG": str(opts.max_concurrent or session.total)}):
            session.fit(tuner)
        session.stop_if_interrupted()  # no report of an unfinished grid
        _check_warmups(study_dir)
        session.phase = "results"
        _finish(study_dir, opts, time.time() - t0)
        return study_dir


def _finish(study_dir: Path, opts: StudyOptions, wall_s: float, extra: dict | None = None
            ) -> None:
    info = json.loads((study_dir / "study.json").read_text())
    info.setdefault("wall_s_runs", []).append(wall_s)
    info.update(extra or {})
    write_json(study_dir / "study.json", info)
    build_results(study_dir)
    print(summary_table(study_dir), flush=True)
    print(f"study wall time {wall_s / 60:.1f} min; results in {study_dir}", flush=True)
    _push(opts)
    _check_outcome(study_dir)


# --- sweep ---

# The one "best" of a sweep. Optuna's value of a COMPLETE trial, the best-trial lookup and the
# checkpoint evaluated on the test split all use it.
RANKING = ("final: the trial's val {metric} at its last evaluation (step = optim.iters); "
           "pruned and failed trials are not ranked")
# Checkpoints a sweep trial keeps: the best by the metric and, always (Ray keeps the latest),
# the final one, which is the checkpoint of the ranking value.
SWEEP_CHECKPOINTS_KEPT = 3
# Options a --resume may change: where Ray and the files are and how much is printed. Any
# other change would be silently ignored (Tuner.restore reuses the pickled searcher, scheduler
# and run config), so a --resume that changes one is refused.
RESUME_FREE_OPTIONS = frozenset({"resume", "address", "verbose", "replace_existing", "storage",
                                 "storage_shared", "num_cpus", "sync_every"})
_RESUME_IGNORED = frozenset({"command", "created", "env", "resumed", "wall_s_runs", "best",
                             "name"})
_RESUME_OPEN_DICTS = ("options.overrides.", "space.")


class StudyFlagsError(UserError):
    """``--resume`` with study flags other than those the study was started with."""


def tpe_startup_trials(num_samples: int) -> int:
    """Random trials before TPE models the space: a quarter of the budget, at least 3 (TPE's
    default of 10 would spend most of a 16-trial sweep at random)."""
    return max(3, num_samples // 4)


def sweep_step_offset(cfg: CTTConfig) -> int:
    """Where the pruning clock starts: the end of the supervised warm-up (every trial is the
    same network until then, as no swept parameter acts during it), or 0 without one."""
    warm = cfg.method.warmup_iters
    return warm if 0 < warm < cfg.optim.iters else 0


def _pruner_record(pruner: Any) -> dict[str, Any] | None:
    """The sweep's Optuna pruner as ``study.json`` records it: class and its settings."""
    if pruner is None:
        return None
    fields = {k.lstrip("_"): v for k, v in vars(pruner).items()
              if isinstance(v, (bool, int, float, str)) or v is None}
    return {"class": type(pruner).__name__, **fields}


def _domain_text(domain: Any) -> str:
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


def _flat_record(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}``."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat_record(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def resume_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every study flag a resume would change (keys of ``new`` the
    old record holds; :data:`RESUME_FREE_OPTIONS` and bookkeeping are ignored)."""
    new = json.loads(json.dumps(new, default=str))  # compare as study.json stores values

    def flat(record: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in record.items():
            if key in _RESUME_IGNORED:
                continue
            if key == "options":
                value = {k: v for k, v in value.items() if k not in RESUME_FREE_OPTIONS}
            out.update(_flat_record({key: value}))
        return out

    before, after = flat(old), flat(new)
    # A key the old record lacks is compared only inside the dict-valued flags (an override
    # or swept parameter added); elsewhere it is a field newer than the study's record.
    keys = sorted(set(before) | {k for k in after if k.startswith(_RESUME_OPEN_DICTS)})
    return [f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}"
            for k in keys if before.get(k, "(unset)") != after.get(k, "(unset)")]


def _check_resume(opts: StudyOptions, study_dir: Path, payload: dict[str, Any]) -> None:
    """Refuse a ``--resume`` whose flags differ from the study's (listing them), before Ray
    starts."""
    path = study_dir / "study.json"
    if not opts.resume or not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return  # a corrupt record is reported where the results are read
    diffs = resume_differences(old, payload)
    if diffs:
        raise StudyFlagsError(
            f"--resume of {study_dir} with flags that differ from the study's: "
            f"{'; '.join(diffs)}. A resumed study runs as it was started: repeat its original "
            "flags, or start a new study with --out NAME")


SWEEP_WARMUP_EXPERIMENT = "ray-warmup"
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


def _sweep_warmup(session: _Session, opts: StudyOptions, base: CTTConfig) -> str:
    """Train the sweep's shared warm-up (one trial, ``base`` to ``method.warmup_iters``, in
    its own Tune experiment ``ray-warmup``, resumable) unless its checkpoint is already
    published; returns where it is published (:func:`warmup_dir`), the trials'
    ``_fork_from``. Not a result: no ``trials/`` entry, no Optuna trial."""
    publish = warmup_dir(session.storage_path, base.run.seed)
    if published(publish):
        return publish
    session.phase = "warm-up"
    exp_dir = _experiment_dir(session.storage_path, SWEEP_WARMUP_EXPERIMENT)
    if _can_restore(exp_dir):
        tuner = tune.Tuner.restore(exp_dir, _trainable(opts), resume_unfinished=True,
                                   resume_errored=True)
    else:
        config = _trial_config(base, WARMUP_VARIANT, _until=base.method.warmup_iters,
                               _publish=publish)
        space, gen = _points([config])
        tuner = tune.Tuner(
            _trainable(opts), param_space=space,
            tune_config=tune.TuneConfig(search_alg=gen, num_samples=1),
            run_config=_run_config(opts, session.storage_path, SWEEP_WARMUP_EXPERIMENT, []))
    grid = session.fit(tuner)
    session.stop_if_interrupted()
    if not published(publish):
        res = grid[0] if len(grid) else None
        why = res and (res.error or (res.metrics or {}).get("error"))
        raise RuntimeError(f"the sweep's shared warm-up failed ({str(why)[:300]}); see "
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

    Optuna's study lives in ``<study_dir>/optuna.journal`` or, with ``optuna_storage``, in that
    database (:mod:`ctt.tune.optuna_storage`, opened before Ray starts); ``optuna.db`` is a
    sqlite snapshot of it written at the end. On ``--resume`` the restored searcher is
    reconciled with it (``PruningAwareOptunaSearch.reconcile``).

    Pruning counts from the end of the supervised warm-up (:func:`sweep_step_offset`):
    ``grace_period`` (default ``run.eval_every``) iterations after it come before the first
    decision, and rungs count from there. Trials are ranked by :data:`RANKING`. ``--resume``
    with other flags raises :class:`StudyFlagsError`. With ``confirm_top`` and
    ``confirm_seeds`` the best configs are then rerun on fresh seeds
    (:func:`_confirm_winners`, ``confirm.json``)."""
    import optuna

    from ctt.metric_names import METRIC_NAMES

    mious = [m for m in METRIC_NAMES if m.startswith("miou")]
    if metric not in mious:  # with strict metric checks off, a typo would rank nothing
        raise UserError(f"--metric {metric!r}: a sweep maximises a val mIoU that every "
                        f"evaluation reports; choose one of {', '.join(mious)}")
    with _session(opts) as session:
        warn_all(check_semantics(apply_variant(opts.base_config(), variant), variant, study=True))
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
            "space": {k: _domain_text(v) for k, v in space.items()}, "metric": metric,
            "ranking": RANKING.format(metric=metric), "scheduler": scheduler,
            # the report's top-trials table ranks like Optuna and the best trial: final value
            "rank_by": "miou_final" if metric == "miou" else metric,
            "grace_period": grace, "step_offset": offset, "sampler_seed": sampler_seed,
            "tpe_startup_trials": tpe_startup_trials(num_samples), "num_samples": num_samples,
            "confirm_top": confirm_top, "confirm_seeds": confirm_seeds,
            "pruner": _pruner_record(pruner),
            "warmup": {"shared": share, "why": share_why},
            "optuna_storage": mask_url(optuna_storage) if optuna_storage else JOURNAL,
            "preset": opts.preset, "options": asdict(opts), "base_config": base.to_flat(),
            # an --optuna-storage password stays out of the record
            "command": [mask_url(a) for a in sys.argv], "created": time.time(),
            "env": environment()}
        _check_resume(opts, session.study_dir, payload)
        db = _open_optuna_database(optuna_storage, opts) if optuna_storage else None
        restoring = session.open(payload)
        study_dir = session.study_dir
        storage = _sweep_optuna_storage(db, study_dir, opts.name, restoring,
                                        session.storage_path)
        # The pruner is the study's from its creation (TPE sees it from the first trial).
        searcher = PruningAwareOptunaSearch(
            metric=metric, mode="max",
            sampler=optuna.samplers.TPESampler(
                seed=sampler_seed, n_startup_trials=tpe_startup_trials(num_samples)),
            storage=storage, study_name=opts.name, pruner=pruner, time_attr="step",
            max_t=iters, step_offset=offset)
        sched = make_scheduler(scheduler, metric=metric, mode="max", time_attr="step",
                               max_t=iters, grace_period=grace, step_offset=offset,
                               searcher=searcher)
        param_space = {**_trial_config(base, variant), **space}
        callbacks = [StudyLoggerCallback(study_dir)]
        t0 = time.time()
        if share and _recorded_warmup_shared(study_dir):
            param_space["_fork_from"] = _sweep_warmup(session, opts, base)
        if restoring:
            # Tune's ERROR trials stay failed: Optuna holds them FAIL (final), and Tune retried
            # their crashes (--max-failures) before giving up on them.
            tuner = tune.Tuner.restore(session.exp_dir, _trainable(opts),
                                       resume_unfinished=True, resume_errored=False)
        else:
            tuner = tune.Tuner(
                _trainable(opts), param_space=param_space,
                tune_config=tune.TuneConfig(
                    search_alg=searcher, scheduler=sched, num_samples=num_samples,
                    max_concurrent_trials=opts.max_concurrent or None, reuse_actors=True),
                run_config=_run_config(
                    opts, session.storage_path, EXPERIMENT, callbacks, list(space),
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
            extra["confirm"] = _confirm_winners(session, grid, ot_study, base, variant, metric,
                                                top=confirm_top, n_seeds=confirm_seeds)
        session.phase = "results"
        export_sqlite(storage, opts.name, study_dir / SQLITE_SNAPSHOT)
        _finish(study_dir, opts, time.time() - t0, extra)
        return study_dir


def _recorded_warmup_shared(study_dir: Path) -> bool:
    """Whether the study's record says its trials fork a shared warm-up (a sweep started
    before sweeps could share one resumes with a warm-up per trial, as it began)."""
    try:
        info = json.loads((study_dir / "study.json").read_text())
    except (OSError, ValueError):
        return False
    return bool((info.get("warmup") or {}).get("shared"))


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


def _legacy_optuna_db(name: str, storage_path: str) -> Path:
    """Where sweeps started before the journal kept their Optuna study: the driver's disk."""
    import hashlib

    key = hashlib.sha1(storage_path.encode()).hexdigest()[:10]
    local = Path(os.environ.get("CTT_OPTUNA_DIR", Path.home() / ".cache" / "ctt" / "optuna"))
    return local / f"{name}-{key}.db"


def _sweep_optuna_storage(db: Any, study_dir: Path, name: str, restoring: bool,
                          storage_path: str) -> Any:
    """The sweep's Optuna storage: the database ``db`` or the study directory's journal. A
    start that restores no Tune experiment starts Optuna's study afresh too: a record left by
    a run killed before Tune's first snapshot would steer TPE with trials Tune never kept.
    A resume of a sweep started before the journal, on the head that ran it, first copies
    its study from the driver's sqlite file (:func:`_legacy_optuna_db`) into the journal."""
    import optuna

    if db is None:
        path = study_dir / JOURNAL
        if not restoring:
            path.unlink(missing_ok=True)
        legacy = _legacy_optuna_db(name, storage_path)
        fresh = not path.exists() or path.stat().st_size == 0
        storage = open_journal(path)
        if restoring and fresh and legacy.exists():
            optuna.copy_study(from_study_name=name, from_storage=f"sqlite:///{legacy}",
                              to_storage=storage, to_study_name=name)
        return storage
    if not restoring and name in {s.study_name for s in optuna.get_all_study_summaries(db)}:
        optuna.delete_study(study_name=name, storage=db)
    return db


def _test_eval(config: dict[str, Any], checkpoint: tune.Checkpoint) -> dict[str, Any]:
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
                           "config": {k: v for k, v in resolve_config(res.config).items()
                                      if k in base.to_flat() and base.to_flat()[k] != v}}
    if res.checkpoint is None or base.data.test_split == "none":
        return out
    if res.error is not None:
        # Optuna finished it before the driver was lost; Tune's restored run then failed, so
        # its checkpoint is not the one the ranking value was measured on.
        out["test_skipped"] = f"the trial's restored run failed: {str(res.error)[:200]}"
        log.warning("best trial %s: %s; no test evaluation", out["trial_id"],
                    out["test_skipped"])
        return out
    task = ray.remote(num_cpus=opts.cpus_per_trial, num_gpus=opts.gpus_per_trial)(_test_eval)
    evaluated = ray.get(task.remote(res.config, res.checkpoint))
    out["test"], out["checkpoint_step"] = evaluated["test"], evaluated["checkpoint_step"]
    out["checkpoint"] = res.checkpoint.path
    return out


CONFIRM_EXPERIMENT = "ray-confirm"
CONFIRM_DIR = "confirm"


def confirm_seed_list(search_seed: int, n_seeds: int) -> list[int]:
    """Fresh seeds for the confirmation runs: the ones after the search's seed."""
    return [search_seed + 1 + i for i in range(n_seeds)]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


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


def _confirm_winners(session: _Session, grid: Any, study: Any, base: CTTConfig, variant: str,
                     metric: str, *, top: int, n_seeds: int) -> dict[str, Any] | None:
    """Rerun the ``top`` best configs of the search (:func:`confirm_candidates`: COMPLETE
    trials by the ranking value, :data:`RANKING`, topped up with PRUNED ones by their last
    value) on ``n_seeds`` fresh seeds and name the winner by the confirmed mean: a search
    ranks configs on one seed, where a lucky seed can win.

    The runs are a small grid (variant label ``<variant>-top<rank>``, seeds
    :func:`confirm_seed_list`) in their own Tune experiment (``ray-confirm``, resumable) and
    logged under ``confirm/`` (``trials/``, ``tb/``), apart from the search's trials. Writes
    and returns the ``confirm.json`` record: per candidate its search value and its confirmed
    values, mean, sample std, n and failures; the winner, with the test-split mean ± std of
    its confirmation runs' final checkpoints when the data has a test split. None when the
    search has no candidate (every trial failed)."""
    from ctt.tune.trainable import split_config

    opts, study_dir = session.opts, session.study_dir
    results = {(r.metrics or {}).get("trial_id"): r for r in grid}
    seeds = confirm_seed_list(opts.seeds[0], n_seeds)
    flat_base = base.to_flat()
    offset = sweep_step_offset(base)  # Optuna's steps count from the warm-up's end
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
            "search_step": base.optim.iters if step is None else step + offset,
            "config": {k: v for k, v in cfg.to_flat().items()
                       if k != "run.seed" and flat_base.get(k) != v}})
        configs += [_trial_config(cfg.override({"run.seed": s}), label) for s in seeds]
    if not candidates:
        return None
    exp_dir = _experiment_dir(session.storage_path, CONFIRM_EXPERIMENT)
    if _can_restore(exp_dir):
        tuner = tune.Tuner.restore(exp_dir, _trainable(opts), resume_unfinished=True,
                                   resume_errored=False)
    else:
        space, gen = _points(configs, opts.max_concurrent)
        tuner = tune.Tuner(
            _trainable(opts), param_space=space,
            tune_config=tune.TuneConfig(search_alg=gen, num_samples=len(configs),
                                        reuse_actors=True),
            run_config=_run_config(opts, session.storage_path, CONFIRM_EXPERIMENT,
                                   [StudyLoggerCallback(study_dir / CONFIRM_DIR)]))
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
              and isinstance(value, (int, float)) and value == value)
        if ok:
            values[label].append((int(res.config["seed"]), float(value)))
            finished[label].append(res)
        else:
            failed[label] += 1
    for c in candidates:
        got = sorted(values[c["label"]])
        mean, std = _mean_std([v for _, v in got])
        c.update({"confirm_seeds": [s for s, _ in got], "confirm_values": [v for _, v in got],
                  "confirm_mean": mean, "confirm_std": std, "confirm_n": len(got),
                  "confirm_failed": failed[c["label"]]})
    scored = [c for c in candidates if c["confirm_mean"] is not None]
    winner = max(scored, key=lambda c: c["confirm_mean"]) if scored else None
    out = {"metric": metric, "ranking": RANKING.format(metric=metric), "top": top,
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
                          num_gpus=opts.gpus_per_trial)(_test_eval)
        tested = ray.get([task.remote(r.config, r.checkpoint) for r in runs])
        test_values = [t["test"][metric] for t in tested if metric in t["test"]]
        mean, std = _mean_std(test_values)
        out["winner"].update({"test_mean": mean, "test_std": std, "test_n": len(test_values)})
    write_json(study_dir / "confirm.json", out)
    return out
