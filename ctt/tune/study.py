"""Studies: an ablation grid (variants x seeds) or an Optuna sweep, run by Ray Tune.

Study directory ``<storage>/<name>/`` (local path; with a URI storage the same tree is staged
locally and uploaded through ``pyarrow.fs`` at the end, while Tune writes its experiment and
checkpoints straight to the URI)::

    study.json        resolved definition, command, package versions, git commit
    ray/              the Tune experiment (trial checkpoints; resumable with --resume)
    warmup-<t>/       the shared supervised warm-up of each seed (ablations; warmup.json maps
                      seed -> its checkpoint, warmup-pending.json names the running one)
    .study.lock       held while a study runs (pid, host, start time; ctt.rundir)
    trials/<id>/      trial.json and metrics.jsonl, written by the driver callback
    tb/<run>/         TensorBoard scalars + one HParams entry per trial
    trials.parquet, metrics.parquet, report.md, *.png
    optuna.db         the sweep's Optuna study (sqlite, copied from the driver's disk)

One study per directory, one process per study: the directory is locked before anything else
(before Ray starts) until the study ends, so a second study on it fails at once naming the
holder. A fresh start refuses a directory that already holds a study (``StudyExistsError``: the
trials would mix); ``--resume`` continues it and refuses a directory without one
(``NoStudyError``), and ``--smoke-test`` replaces its own ``*_smoke`` directory.

SIGINT/SIGTERM in any phase (Ray start, shared warm-up, trials, test evaluation, results)
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
import hashlib
import json
import logging
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
from ctt.fileio import atomic_write_text
from ctt.interrupts import Interrupted, SignalGuard
from ctt.rundir import STUDY_LOCK, DirLock
from ctt.tune.callbacks import StudyLoggerCallback
from ctt.tune.layout import write_json
from ctt.tune.report import summary_table
from ctt.tune.results import build_results
from ctt.tune.schedulers import PruningAwareOptunaSearch, make_scheduler
from ctt.tune.space import ONE_MINUS, resolve_config
from ctt.tune.tables import load_trials
from ctt.tune.trainable import CHECKPOINT_FILE, train_ctt, trial_resources

__all__ = ["NoStudyError", "StorageError", "StudyExistsError", "StudyFailedError",
           "StudyOptions", "check_inputs", "check_storage", "init_ray", "run_ablation",
           "run_sweep"]

EXPERIMENT = "ray"
WARMUP = "warmup"
OBJECT_STORE_BYTES = 300 * 1024**2
RAY_ENV_DEFAULTS = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0",
                    "RAY_USAGE_STATS_ENABLED": "0", "TUNE_GLOBAL_CHECKPOINT_S": "5"}


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
    logging, the classic progress output, no usage stats, experiment state synced every 5 s."""
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
    if "://" in storage or shared:
        return
    n = alive_nodes()
    if n > 1:
        raise StorageError(
            f"--storage {storage!r} is a node-local path but the cluster has {n} alive nodes; "
            "trials restarted on another node would lose their checkpoints. Pass shared "
            "storage (--storage s3://bucket/prefix, gs://..., or an NFS path with "
            "--storage-shared).")


def study_paths(opts: StudyOptions) -> tuple[Path, str]:
    """(local study dir for driver files, Tune storage path for experiments)."""
    if "://" in opts.storage:
        local = Path(os.environ.get("CTT_STAGING", Path.home() / ".cache" / "ctt" / "studies"))
        return (local / opts.name).resolve(), f"{opts.storage.rstrip('/')}/{opts.name}"
    study_dir = (Path(opts.storage) / opts.name).resolve()
    return study_dir, str(study_dir)


def _upload(study_dir: Path, opts: StudyOptions) -> None:
    if "://" not in opts.storage:
        return
    import pyarrow.fs

    dest = f"{opts.storage.rstrip('/')}/{opts.name}"
    fs, path = pyarrow.fs.FileSystem.from_uri(dest)
    pyarrow.fs.copy_files(str(study_dir), path, destination_filesystem=fs)


def _write_study_json(study_dir: Path, payload: dict[str, Any]) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    path = study_dir / "study.json"
    if path.exists():  # keep the original definition; record the resume
        old = json.loads(path.read_text())
        old.setdefault("resumed", []).append({"time": time.time(), "command": sys.argv})
        payload = old
    write_json(path, payload)


# --- Tune plumbing ---

def _reporter(extra_params: list[str]) -> tune.ProgressReporter:
    return tune.CLIReporter(
        metric_columns={"step": "step", "loss/total": "loss", "miou": "mIoU"},
        parameter_columns={"variant": "variant", "seed": "seed",
                           **{p: p.replace("method.", "") for p in extra_params}},
        max_report_frequency=30, sort_by_metric=False,
        # Ray decides this from the global verbosity when the reporter is built, which is the
        # previous fit's (warm-up) setting: without it the tables vanish after the first fit.
        print_intermediate_tables=True)


def _run_config(opts: StudyOptions, storage_path: str, name: str, callbacks: list,
                extra_params: list[str] | None = None) -> tune.RunConfig:
    # Ray's auto loggers are off (our callback owns TensorBoard); keep its JSON results so the
    # ResultGrid (best trial, restore) has metrics.
    from ray.tune.logger import JsonLoggerCallback

    return tune.RunConfig(
        name=name, storage_path=storage_path, callbacks=[*callbacks, JsonLoggerCallback()],
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=3),
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
    return f"{storage_path.rstrip('/')}/{name}"


def _can_restore(path: str) -> bool:
    try:
        return tune.Tuner.can_restore(path)
    except Exception:  # noqa: BLE001 - missing bucket/dir means "nothing to restore"
        return False


def _start_or_resume(opts: StudyOptions, study_dir: Path, exp_dir: str) -> bool:
    """True to restore the Tune experiment. A fresh start needs an unused study directory:
    Tune would add trials to the old experiment and the results would mix both studies.
    ``--resume`` needs a study there: its ``study.json`` (then, with no Tune experiment yet, the
    study starts from its recorded warm-ups) or a restorable experiment. Call with the study
    directory locked."""
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
        if opts.replace_existing and "://" not in opts.storage:
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
        self.phase = "start"
        self.total = 0  # trials of the study
        self.warm = (0, 0)  # warm-up seeds done, to do

    def open(self, payload: dict[str, Any]) -> bool:
        """Lock the study directory, check start vs resume, start Ray, write study.json.
        Returns whether the Tune experiment is restored."""
        if (self.opts.resume and "://" not in self.opts.storage
                and not self.study_dir.is_dir()):  # refused before the lock creates it
            _start_or_resume(self.opts, self.study_dir, self.exp_dir)
        self.lock.acquire()
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
        if self.phase == "warmup":
            done, todo = self.warm
            return f"during the shared warm-up ({done} of {todo} seeds done, kept)"
        trials = load_trials(self.study_dir) if (self.study_dir / "trials").is_dir() else []
        done = sum(t.get("status") in ("TERMINATED", "ERROR") for t in trials)
        total = max(self.total, len(trials))
        if self.phase == "trials":
            return f"during the trials ({done} of {total} finished, kept)"
        if self.phase == "test":
            return f"while evaluating the best trial on the test split ({done} trials finished)"
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
                session.lock.release()


# --- ablation ---

def ablation_trials(opts: StudyOptions, variants: list[str]) -> list[dict[str, Any]]:
    """Every (variant, seed) trial config, seed-major so paired trials run close together."""
    base = opts.base_config()
    for v in variants:  # a setting a variant cannot honour is refused here, before Ray starts
        warn_all(check_semantics(apply_variant(base, v), v, study=True))
    return [_trial_config(apply_variant(base.override({"run.seed": s}), v), v)
            for s in opts.seeds for v in variants]


def _run_warmups(opts: StudyOptions, session: _Session) -> dict[int, str]:
    """One supervised warm-up per seed (2 pairs, banks on), checkpointed at warmup_iters.

    ``warmup.json`` maps each finished seed to its checkpoint, also when the warm-up phase is
    interrupted; ``warmup-pending.json`` names the warm-up experiment while it runs, so a
    resume continues its unfinished trials from their checkpoints instead of starting over."""
    study_dir, storage_path = session.study_dir, session.storage_path
    record, pending = study_dir / "warmup.json", study_dir / "warmup-pending.json"
    done: dict[int, str] = ({int(k): v for k, v in json.loads(record.read_text()).items()}
                            if record.exists() else {})
    todo = [s for s in opts.seeds if s not in done]
    if not todo:
        return done
    session.phase, session.warm = "warmup", (len(opts.seeds) - len(todo), len(opts.seeds))
    base = opts.base_config()
    until = base.method.warmup_iters
    name = json.loads(pending.read_text()).get("experiment") if pending.exists() else None
    if name and _can_restore(_experiment_dir(storage_path, name)):
        tuner = tune.Tuner.restore(_experiment_dir(storage_path, name), _trainable(opts),
                                   resume_unfinished=True, resume_errored=True)
    else:
        name = f"{WARMUP}-{int(time.time())}"
        atomic_write_text(pending, json.dumps({"experiment": name}) + "\n")
        configs = [_trial_config(apply_variant(base.override({"run.seed": s}), "ctt"), "warmup",
                                 _until=until) for s in todo]
        space, gen = _points(configs, opts.max_concurrent)
        tuner = tune.Tuner(
            _trainable(opts), param_space=space,
            tune_config=tune.TuneConfig(
                search_alg=gen, num_samples=len(configs), reuse_actors=True),
            run_config=_run_config(opts, storage_path, name, []))
    grid = session.fit(tuner)
    failed = []
    scheme = "" if "://" not in opts.storage else opts.storage.split("://")[0] + "://"
    for res in grid:
        step = (res.metrics or {}).get("step")
        if res.error is None and res.checkpoint is not None and step is not None \
                and int(step) >= until:
            done[int(res.config["seed"])] = scheme + res.checkpoint.path
        else:
            failed.append(res)
    atomic_write_text(record, json.dumps({str(k): v for k, v in sorted(done.items())}, indent=2))
    session.warm = (sum(s in done for s in opts.seeds), len(opts.seeds))
    session.stop_if_interrupted()
    if failed:
        raise RuntimeError(f"warm-up trial failed: {failed[0].error}")
    pending.unlink(missing_ok=True)
    return done


def run_ablation(opts: StudyOptions, variants: list[str]) -> Path:
    """Run (or resume) the variants x seeds grid; return the local study directory.

    SIGINT/SIGTERM in any phase raises :class:`~ctt.interrupts.Interrupted` (with ``where`` and
    ``resumable``) once Tune has stopped; finished trials and warm-ups are kept for --resume."""
    with _session(opts) as session:
        # variant/--set conflicts fail first (cheap), then the data root (it may generate data)
        configs = ablation_trials(opts, variants)
        base = check_inputs(opts)
        session.total = len(configs)
        restoring = session.open({
            "name": opts.name, "kind": "ablation", "variants": variants, "seeds": opts.seeds,
            "preset": opts.preset, "options": asdict(opts), "base_config": base.to_flat(),
            "command": sys.argv, "created": time.time(), "env": environment()})
        study_dir, storage_path = session.study_dir, session.storage_path
        t0 = time.time()
        callbacks = [StudyLoggerCallback(study_dir)]
        if restoring:
            tuner = tune.Tuner.restore(session.exp_dir, _trainable(opts),
                                       resume_unfinished=True, resume_errored=True)
        else:
            fork = (opts.fork_warmup and base.method.warmup_iters > 0
                    and base.method.warmup_iters < base.optim.iters and len(variants) > 1)
            if fork:
                warm = _run_warmups(opts, session)
                configs = [{**c, "_fork_from": warm[int(c["seed"])]} for c in configs]
            session.phase = "trials"
            space, gen = _points(configs, opts.max_concurrent)
            tuner = tune.Tuner(
                _trainable(opts), param_space=space,
                tune_config=tune.TuneConfig(
                    search_alg=gen, num_samples=len(configs), reuse_actors=True),
                run_config=_run_config(opts, storage_path, EXPERIMENT, callbacks))
        session.phase = "trials"
        session.fit(tuner)
        session.stop_if_interrupted()  # no report of an unfinished grid
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
    _upload(study_dir, opts)
    _check_outcome(study_dir)


# --- sweep ---

def run_sweep(opts: StudyOptions, variant: str, space: dict[str, Any], *, num_samples: int,
              scheduler: str = "optuna-median", metric: str = "miou", grace_period: int = 0,
              sampler_seed: int = 0) -> Path:
    """Optuna TPE search over ``space`` (Tune domains keyed by flat config keys) with pruning;
    the best trial is re-evaluated on the held-out test split."""
    import optuna

    with _session(opts) as session:
        warn_all(check_semantics(apply_variant(opts.base_config(), variant), variant, study=True))
        base = apply_variant(check_inputs(opts).override({"run.seed": opts.seeds[0]}), variant)
        for key in space:
            real = key.removeprefix(ONE_MINUS)
            if real not in base.to_flat():
                CTTConfig.from_flat({real: 0})  # raises the unknown-key error with valid keys
        session.total = num_samples
        restoring = session.open({
            "name": opts.name, "kind": "sweep", "variant": variant, "seeds": opts.seeds[:1],
            "space": {k: repr(v) for k, v in space.items()}, "metric": metric,
            "scheduler": scheduler, "num_samples": num_samples, "preset": opts.preset,
            "options": asdict(opts), "base_config": base.to_flat(), "command": sys.argv,
            "created": time.time(), "env": environment()})
        study_dir, storage_path = session.study_dir, session.storage_path
        db_local = Path(os.environ.get("CTT_OPTUNA_DIR",
                                       Path.home() / ".cache" / "ctt" / "optuna"))
        db_local.mkdir(parents=True, exist_ok=True)
        # sqlite must not live on S3/NFS. One file per study directory (the same name under
        # another --storage is another study), reset on a fresh start: OptunaSearch loads an
        # existing study of that name, and old trials would steer TPE and the importances.
        key = hashlib.sha1(storage_path.encode()).hexdigest()[:10]
        db_path = db_local / f"{opts.name}-{key}.db"
        if not restoring:
            db_path.unlink(missing_ok=True)
        storage = optuna.storages.RDBStorage(f"sqlite:///{db_path}")
        searcher = PruningAwareOptunaSearch(
            metric=metric, mode="max", sampler=optuna.samplers.TPESampler(seed=sampler_seed),
            storage=storage, study_name=opts.name, time_attr="step")
        sched = make_scheduler(scheduler, metric=metric, mode="max", time_attr="step",
                               max_t=base.optim.iters,
                               grace_period=grace_period or base.run.eval_every,
                               searcher=searcher if scheduler.startswith("optuna") else None)
        param_space = {**_trial_config(base, variant), **space}
        callbacks = [StudyLoggerCallback(study_dir)]
        t0 = time.time()
        if restoring:
            tuner = tune.Tuner.restore(session.exp_dir, _trainable(opts),
                                       resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                _trainable(opts), param_space=param_space,
                tune_config=tune.TuneConfig(
                    search_alg=searcher, scheduler=sched, num_samples=num_samples,
                    max_concurrent_trials=opts.max_concurrent or None, reuse_actors=True),
                run_config=_run_config(opts, storage_path, EXPERIMENT, callbacks, list(space)))
        session.phase = "trials"
        grid = session.fit(tuner)
        session.stop_if_interrupted()  # no best trial of an unfinished sweep
        session.phase = "test"
        best = _evaluate_best(grid, metric, base, opts)
        session.phase = "results"
        shutil.copyfile(db_path, study_dir / "optuna.db")
        _finish(study_dir, opts, time.time() - t0, {"best": best})
        return study_dir


def _test_eval(config: dict[str, Any], checkpoint: tune.Checkpoint) -> dict[str, float]:
    """Load a trial checkpoint and evaluate every network on the test split (runs as a Ray
    task with the trial's resources, so a GPU study evaluates on a GPU worker, not the head)."""
    from ctt.state import TrainState
    from ctt.train import Trainer
    from ctt.tune.trainable import split_config

    cfg, _ = split_config(config)
    with checkpoint.as_directory() as d:
        state = TrainState.load(Path(d) / CHECKPOINT_FILE, cfg)
    trainer = Trainer(cfg, state)
    return trainer.evaluate("test") if "test" in trainer.datasets else {}


def _evaluate_best(grid: Any, metric: str, base: CTTConfig, opts: StudyOptions
                   ) -> dict[str, Any] | None:
    """The best trial by ``metric`` (its best reported value); its final checkpoint is
    re-evaluated on the held-out test split."""
    try:
        res = grid.get_best_result(metric=metric, mode="max", scope="all")
    except RuntimeError:
        return None
    out: dict[str, Any] = {"trial_id": res.metrics.get("trial_id"),
                           "val_" + metric: res.metrics.get(metric),
                           "config": {k: v for k, v in resolve_config(res.config).items()
                                      if k in base.to_flat() and base.to_flat()[k] != v}}
    if res.checkpoint is None or base.data.test_split == "none":
        return out
    task = ray.remote(num_cpus=opts.cpus_per_trial, num_gpus=opts.gpus_per_trial)(_test_eval)
    out["test"] = ray.get(task.remote(res.config, res.checkpoint))
    return out
