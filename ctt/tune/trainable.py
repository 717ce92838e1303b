"""Ray Tune function trainable around :class:`ctt.train.Trainer`.

A trial's ``config`` is a flat dict: every ``CTTConfig.to_flat()`` key plus ``variant`` and
``seed`` (= ``run.seed``), and optional private keys:

- ``_fork_from``: a warm-up checkpoint (local path or storage URI) to start from
  (:meth:`ctt.state.TrainState.fork`); used by ablations so the supervised warm-up shared by all
  variants of a seed is computed once.
- ``_until``: stop at this iteration instead of ``optim.iters`` (the warm-up trials).
- ``_publish``: a directory (local path or storage URI) the trial writes its state to, as
  ``state.pt``, when it reaches ``_until``, before its last report (a warm-up's checkpoint for
  the forks, at a place the study knows in advance; :mod:`ctt.tune.grid`).

Reporting: one ``tune.report`` per evaluation (``run.eval_every``), with a ``Checkpoint`` attached
whenever the step is a multiple of ``run.checkpoint_every`` and at the end. A NaN/inf loss is a
deterministic failure: the trial reports ``error`` and ``nan_step`` and returns (so
``FailureConfig`` does not retry it); the study callback records it as errored. So are the
other deterministic failures (:data:`DETERMINISTIC_ERRORS`: config, data file, checkpoint),
reported as ``error`` with the exception's type and message. Any other exception propagates,
and Tune restarts the trial from its last checkpoint (``--max-failures``).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from ctt.config import ConfigError, CTTConfig
from ctt.errors import DataError, one_line
from ctt.fileio import atomic_open
from ctt.state import CheckpointError, TrainState
from ctt.step import NonFiniteLossError
from ctt.train import Trainer
from ctt.tune.space import resolve_one_minus

__all__ = ["CHECKPOINT_FILE", "DETERMINISTIC_ERRORS", "META_KEYS", "split_config", "train_ctt"]

CHECKPOINT_FILE = "state.pt"
META_FILE = "trial_meta.json"
META_KEYS = ("variant", "seed", "_fork_from", "_until", "_publish")
# Failures that recur on every retry: a wrong config value, a wrong data file, a corrupt or
# mismatched checkpoint (and a NaN loss, below). The trial reports them as ``error`` and ends,
# so FailureConfig never retries them (Ray 2.60 has no per-exception retry filter); the study
# records the trial as failed at once. A missing data root or device may be one node's problem
# (DataRootError, MissingDataError, DeviceError) and stays a crash that Tune retries.
DETERMINISTIC_ERRORS = (ConfigError, DataError, CheckpointError)


def split_config(config: dict[str, Any]) -> tuple[CTTConfig, dict[str, Any]]:
    """Trial config -> (``CTTConfig``, meta keys). Unknown dotted keys raise ConfigError."""
    config = resolve_one_minus(config)
    flat = {k: v for k, v in config.items() if k not in META_KEYS}
    meta = {k: config[k] for k in META_KEYS if k in config}
    return CTTConfig.from_flat(flat), meta


def _checkpoint_state(ckpt: tune.Checkpoint, cfg: CTTConfig, *, fork: bool) -> TrainState:
    with ckpt.as_directory() as d:
        path = Path(d) / CHECKPOINT_FILE
        return TrainState.fork(path, cfg) if fork else TrainState.load(path, cfg)


def _fork_checkpoint(uri: str) -> tune.Checkpoint:
    if "://" in uri:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        return tune.Checkpoint(path=path, filesystem=fs)
    return tune.Checkpoint.from_directory(uri)


def _publish(state_file: Path, dest: str) -> None:
    """Copy a saved state to ``dest/state.pt``; readers never see a partial file (a local
    replace is atomic, an object store's put is)."""
    if "://" in dest:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(dest)
        fs.create_dir(path, recursive=True)
        pyarrow.fs.copy_files(str(state_file), f"{path.rstrip('/')}/{CHECKPOINT_FILE}",
                              destination_filesystem=fs)
        return
    target = Path(dest) / CHECKPOINT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(target, "wb", fsync=True) as f:
        f.write(state_file.read_bytes())


def _report_error(e: BaseException, step: int, config: dict[str, Any], **extra: Any) -> None:
    """The one result of a deterministic failure: ``error`` (one line) at ``step``."""
    tune.report({"step": int(step), "error": f"{type(e).__name__}: {one_line(e)}",
                 "variant": config.get("variant", ""), "seed": int(config.get("seed", 0)),
                 **extra})


def train_ctt(config: dict[str, Any]) -> None:
    """Function trainable: build or restore a TrainState, train, report, checkpoint. A
    deterministic failure (:data:`DETERMINISTIC_ERRORS`) while setting up is reported as
    ``error`` at step 0 and ends the trial without raising."""
    try:
        _train_ctt(config)
    except DETERMINISTIC_ERRORS as e:
        _report_error(e, 0, config)


def _train_ctt(config: dict[str, Any]) -> None:
    t_start = time.perf_counter()
    cfg, meta = split_config(config)
    torch.set_num_threads(cfg.run.num_threads)
    restored = tune.get_checkpoint()
    compute_s = 0.0  # trial compute before this (re)start, carried in the checkpoint
    if restored is not None:
        state = _checkpoint_state(restored, cfg, fork=False)
        with restored.as_directory() as d:
            meta_file = Path(d) / META_FILE
            if meta_file.exists():
                compute_s = float(json.loads(meta_file.read_text()).get("compute_s", 0.0))
    elif meta.get("_fork_from"):
        state = _checkpoint_state(_fork_checkpoint(str(meta["_fork_from"])), cfg, fork=True)
    else:
        state = None
    trainer = Trainer(cfg, state)
    until = int(meta.get("_until") or cfg.optim.iters)
    # Ray's node id (not the IP: several nodes may share one address, e.g. in tests).
    node_id = ray.get_runtime_context().get_node_id()

    def on_eval(metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        report = {**metrics, "step": step, "variant": meta.get("variant", ""),
                  "seed": int(meta.get("seed", cfg.run.seed)), "node_id": node_id}
        report["time/trial_compute_s"] = compute_s + time.perf_counter() - t_start
        if step % cfg.run.checkpoint_every == 0 or step >= until:
            with tempfile.TemporaryDirectory(prefix="ctt-ckpt-") as tmp:
                trainer.sync_streams()
                trainer.state.save(Path(tmp) / CHECKPOINT_FILE)
                if meta.get("_publish") and step >= until:
                    _publish(Path(tmp) / CHECKPOINT_FILE, str(meta["_publish"]))
                (Path(tmp) / META_FILE).write_text(json.dumps(
                    {"compute_s": report["time/trial_compute_s"], "step": step}))
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))
        else:
            tune.report(report)

    try:
        trainer.fit(until=until, on_eval=on_eval)
    except NonFiniteLossError as e:
        tune.report({"step": e.step, "error": str(e), "nan_step": e.step,
                     "variant": meta.get("variant", ""), "seed": int(meta.get("seed", 0)),
                     "node_id": node_id,
                     "time/trial_compute_s": compute_s + time.perf_counter() - t_start})
        return
    except DETERMINISTIC_ERRORS as e:  # e.g. a bad image met mid-training
        _report_error(e, trainer.state.step, config, node_id=node_id)
        return


def trial_resources(cpus_per_trial: float, gpus_per_trial: float) -> dict[str, float]:
    """Tune resource request; fractional GPUs pack several trials on one device."""
    res = {"cpu": float(cpus_per_trial)}
    if gpus_per_trial:
        res["gpu"] = float(gpus_per_trial)
    return res
