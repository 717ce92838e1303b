"""The runtime every study shares: its options, Ray, its storage and directory, and one run of
it (the session: lock, signals, phase).

One study per directory, one process per study: :class:`StudySession` locks the directory
before anything else (before Ray starts) until the study ends, so a second study on it fails
at once naming the holder. A fresh start refuses a directory that already holds a study
(:class:`StudyExistsError`: the trials would mix); ``--resume`` continues it and refuses a
directory without one (:class:`NoStudyError`), and ``--smoke-test`` replaces its own
``*_smoke`` directory. The files of a study directory are named in :mod:`ctt.tune.layout`.

SIGINT/SIGTERM in any phase (Ray start, trials and shared warm-ups, test evaluation, results)
leaves the study as :class:`~ctt.interrupts.Interrupted` with ``where`` and ``resumable`` set,
after Tune's graceful stop (last experiment snapshot, trial actors stopped): finished trials
and warm-ups are kept and ``--resume`` continues the rest.

Ray is started or joined by :mod:`ctt.tune.ray_setup`.

Every refusal here is a :class:`~ctt.errors.UserError`: the study's entry point prints it as
one line (:func:`ctt.tune.cli.run_study`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctt.config import CTTConfig, get_preset
from ctt.data.loader import dataset_root
from ctt.errors import UserError
from ctt.interrupts import Interrupted, SignalGuard
from ctt.rundir import STUDY_LOCK, DirLock
from ctt.tune import storage as study_storage
from ctt.tune.cluster_capacity import check_cluster_fits
from ctt.tune.experiment import can_restore, experiment_dir
from ctt.tune.layout import (
    EXPERIMENT,
    PLAN_RECORD,
    STORAGE_ONLY,
    STUDY_JSON,
    TRIALS_DIR,
    WARMUP_RECORD,
    write_json,
)
from ctt.tune.optuna_storage import mask_url
from ctt.tune.ray_setup import (
    QuietTuneInterrupt,
    init_ray,
    own_ray_processes,
    ray_keeps_our_sigterm,
    stop_ray_left_by,
    tune_catches_sigint,
)
from ctt.tune.report import questions_summary, summary_table
from ctt.tune.results import build_results
from ctt.tune.resume import check_resume
from ctt.tune.tables import load_trials

if TYPE_CHECKING:
    from ray import tune

__all__ = ["NoStudyError", "StudyExistsError", "StudyFailedError", "StudyOptions",
           "StudySession", "check_inputs", "check_trial_fits", "finish_study", "study_paths",
           "study_session", "tune_env"]

log = logging.getLogger(__name__)

class StudyExistsError(UserError, RuntimeError):
    """A fresh (not ``--resume``) study would mix its trials with an existing study's."""


class StudyFailedError(UserError, RuntimeError):
    """Every trial of the study errored: there is nothing to compare (exit code 1, not 2)."""

    exit_code = 1


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
    # The comparisons an ablation exists to answer ("a/b": a - b paired by seed) and the
    # smallest difference of interest (mIoU points), ctt.tune.sequential.
    questions: tuple[str, ...] = ()
    delta: float = 1.0
    # --adaptive: seeds added in rounds to the variants an open question needs, up to
    # max_seeds per variant (ctt.tune.adaptive).
    adaptive: bool = False
    max_seeds: int = 10
    # --budget: the most compute the study may commit, in core-hours (GPU-hours when
    # gpus_per_trial > 0), by the dry run's cost model; None: no cap.
    budget: float | None = None
    # 1: the study's start and progress lines; 2 (--verbose): Ray's status table and the
    # trials' own output instead
    verbose: int = 1
    # seconds between two progress lines (ctt.tune.progress)
    progress_every: float = 30.0
    # A fresh start deletes an existing local study directory of this name instead of refusing
    # (--smoke-test: throwaway results).
    replace_existing: bool = False

    @cached_property
    def base(self) -> CTTConfig:
        """Preset + data root/split/iters/device + ``--set`` overrides: the study's base
        config, built once (every phase reads this one object)."""
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

def check_inputs(opts: StudyOptions) -> CTTConfig:
    """Validate the study's config and data on the driver, before Ray starts: a bad key or a
    missing or mismatched data root is one error line, not 21 errored trials. Returns the base
    config. On a cluster (``address``) a data root that is absent on the driver's node is left
    to the trials, which run on nodes that may hold it."""
    base = opts.base
    if opts.address is None:
        check_trial_fits(opts)
    root = base.data.root
    if opts.address and root != "none" and not Path(root).expanduser().exists():
        print(f"note: data root {root} is not on this (driver) node; each trial checks it on "
              "its own node", flush=True)
    else:
        dataset_root(base)
    return base


def check_trial_fits(opts: StudyOptions) -> None:
    """Refuse trial resources this machine cannot give, for a study that runs here (no
    ``address``): Ray would keep such trials pending forever, warning once a minute."""
    cores = os.cpu_count() or 1
    if opts.cpus_per_trial > cores:
        raise UserError(f"--cpus-per-trial {opts.cpus_per_trial:g}: this machine has {cores} "
                        "cores, so no trial could ever start; pass at most that")
    if opts.gpus_per_trial > 0:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < opts.gpus_per_trial:
            raise UserError(
                f"--gpus-per-trial {opts.gpus_per_trial:g}: this machine has {gpus} GPU(s) and "
                "the study runs on it (no --address), so no trial could ever start; pass "
                "--gpus-per-trial 0 to train on the CPU, or join a GPU cluster with --address")


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
                           f"{study_dir / TRIALS_DIR}/<id>/trial.json)")


def study_paths(opts: StudyOptions) -> tuple[Path, str]:
    """(local study dir for driver files, Tune storage path for experiments)."""
    if study_storage.is_uri(opts.storage):
        local = study_storage.staging_root()
        return (local / opts.name).resolve(), study_storage.join_uri(opts.storage, opts.name)
    study_dir = (Path(opts.storage) / opts.name).resolve()
    return study_dir, str(study_dir)


def write_study_json(study_dir: Path, payload: dict[str, Any]) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    path = study_dir / STUDY_JSON
    if path.exists():  # keep the original definition; record the resume
        old = json.loads(path.read_text())
        old.setdefault("resumed", []).append({"time": time.time(),
                                              "command": [mask_url(a) for a in sys.argv]})
        payload = old
    write_json(path, payload)


# --- Tune plumbing ---



def _start_or_resume(opts: StudyOptions, study_dir: Path, exp_dir: str) -> bool:
    """True to restore the Tune experiment. A fresh start needs an unused study directory:
    Tune would add trials to the old experiment and the results would mix both studies.
    ``--resume`` needs a study there: its ``study.json`` (then, with no Tune experiment yet, the
    study starts again, keeping any warm-up checkpoint already published) or a restorable
    experiment. Call with the study directory locked."""
    restorable = can_restore(exp_dir)
    exists = (study_dir / STUDY_JSON).exists() or restorable
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

class StudySession:
    """One run of a study: the study directory's lock, the SIGINT/SIGTERM guard and the phase
    (for the line an interrupt prints)."""

    def __init__(self, opts: StudyOptions, guard: SignalGuard):
        self.opts, self.guard = opts, guard
        self.study_dir, self.storage_path = study_paths(opts)
        self.exp_dir = experiment_dir(self.storage_path, EXPERIMENT)
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
        study_storage.check_job_storage(self.opts.storage)  # before the lock creates a directory
        if (self.opts.resume and not study_storage.is_uri(self.opts.storage)
                and not self.study_dir.is_dir()):  # refused before the lock creates it
            _start_or_resume(self.opts, self.study_dir, self.exp_dir)
        self.lock.acquire()
        if self.sync is not None:
            try:
                self._pull(payload)
            except OSError as e:  # no bucket, no credentials, no endpoint: one error line
                raise study_storage.StorageError(
                    f"cannot use the study's storage {self.storage_path}: {e}") from e
            study_storage.register(self.opts.name, self.sync)
        self.phase = "ray"
        restoring = _start_or_resume(self.opts, self.study_dir, self.exp_dir)
        stop_ray_left_by(self.lock.previous)
        # Held while Ray starts: raised inside ray.init, an interrupt can land in an at-fork
        # hook (where Python prints and drops exceptions) or leave Ray half started. A second
        # signal still stops a start that hangs.
        with ray_keeps_our_sigterm(), self.guard.deferred():
            init_ray(self.opts)
            if not self.opts.address:  # a killed driver's successor stops what it leaves
                self.lock.annotate(ray_processes=own_ray_processes())
        self.guard.install()
        self.guard.check()
        autoscaler = (check_cluster_fits(self.opts.cpus_per_trial, self.opts.gpus_per_trial)
                      if self.opts.address else None)
        study_storage.check_storage(self.opts.storage, self.opts.storage_shared, autoscaler)
        write_study_json(self.study_dir, payload)
        return restoring

    def _pull(self, payload: dict[str, Any]) -> None:
        """``--resume`` of a URI study whose staging directory lacks it (a new head): bring
        its driver-side files back from storage, then check the resume's flags against the
        restored study.json. A staging directory that holds the study is newer than (or as
        new as) what it pushed, and is kept. A fresh start refuses a storage that holds a
        study (:class:`StudyExistsError`), as it refuses a local directory that does."""
        if not self.opts.resume:
            if self.sync.exists(STUDY_JSON):  # the staging dir may just be another head's
                raise StudyExistsError(
                    f"{self.storage_path} already holds a study; pass --resume to continue it, "
                    "--out NAME to start another one, or delete it from the storage")
            return
        if (self.study_dir / STUDY_JSON).exists():
            return
        n = self.sync.pull(skip=STORAGE_ONLY)
        if n:
            print(f"restored {n} study files from {self.storage_path} into {self.study_dir}",
                  flush=True)
        check_resume(self.opts, self.study_dir, payload)

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

    def reporter(self, **kwargs: Any) -> tune.ProgressReporter:
        """Print the start line and return the progress reporter of this study's next fit
        (:func:`ctt.tune.progress.study_reporter`)."""
        from ctt.tune.progress import study_reporter

        warmups = 0 if kwargs.get("what") else self.warmups
        return study_reporter(self.opts, str(self.study_dir), warmups=warmups, **kwargs)

    def fit(self, tuner: tune.Tuner) -> Any:
        """``tuner.fit()``. On SIGINT Tune's own handler stops it gracefully (last experiment
        snapshot written, trial actors stopped) and fit returns; SIGTERM is handed to that
        handler. Either way ``self.guard.signum`` is set afterwards."""
        self.guard.check()
        quiet = QuietTuneInterrupt()
        tune_log = logging.getLogger("ray.tune.tune")
        tune_log.addFilter(quiet)
        try:
            with self.guard.delegating():
                grid = tuner.fit()
        finally:
            tune_log.removeFilter(quiet)
        # Tune's handler reinstalls the one it replaced (ours) when it fires, and stays
        # installed after a fit it did not stop.
        tune_stopped = self.guard.is_installed(signal.SIGINT) and tune_catches_sigint()
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
            warm = warmups_done(self.study_dir)
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
        return (self.study_dir / STUDY_JSON).exists()


def warmups_done(study_dir: Path) -> int:
    """How many seeds' shared warm-ups the study's record lists as done."""
    try:
        return len(json.loads((study_dir / WARMUP_RECORD).read_text()))
    except (OSError, ValueError):
        return 0


@contextlib.contextmanager
def study_session(opts: StudyOptions) -> Iterator[StudySession]:
    """A :class:`StudySession` whose guard and lock last as long as the block. An interrupt leaves
    as :class:`~ctt.interrupts.Interrupted` with ``where`` and ``resumable`` set."""
    with SignalGuard() as guard:
        session = StudySession(opts, guard)
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
def tune_env(values: dict[str, str]) -> Iterator[None]:
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


def finish_study(study_dir: Path, opts: StudyOptions, wall_s: float,
                 extra: dict[str, Any] | None = None) -> None:
    """Record the run's wall time (and ``extra``, and ``plan.json``: the spend against
    ``--budget`` next to its estimate) in study.json, build the tables, report and
    plots, print the summary, push a URI study's files; raise :class:`StudyFailedError` when
    every trial failed."""
    info = json.loads((study_dir / STUDY_JSON).read_text())
    info.setdefault("wall_s_runs", []).append(wall_s)
    info.update(extra or {})
    with contextlib.suppress(OSError, ValueError):  # the rounds, why it stopped, the spend
        info["plan"] = json.loads((study_dir / PLAN_RECORD).read_text())
    write_json(study_dir / STUDY_JSON, info)
    build_results(study_dir)
    print(summary_table(study_dir), flush=True)
    questions = questions_summary(study_dir)
    if questions:
        print("\n".join(questions), flush=True)
    print(f"study wall time {wall_s / 60:.1f} min; results in {study_dir}", flush=True)
    study_storage.push_study_files(opts.name)
    _check_outcome(study_dir)
