"""Ray Tune function trainable around :class:`ctt.train.Trainer`.

A trial's ``config`` is a flat dict: every ``CTTConfig.to_flat()`` key plus ``variant`` and
``seed`` (= ``run.seed``), and optional private keys:

- ``_fork_from``: a warm-up checkpoint (local path or storage URI) to start from
  (:meth:`ctt.state.TrainState.fork`); used by ablations so the supervised warm-up shared by all
  variants of a seed is computed once.
- ``_until``: stop at this iteration instead of ``optim.iters`` (the warm-up trials).

Reporting: one ``tune.report`` per evaluation (``run.eval_every``), with a ``Checkpoint`` attached
whenever the step is a multiple of ``run.checkpoint_every`` and at the end. A NaN/inf loss is a
deterministic failure: the trial reports ``error`` and ``nan_step`` and returns (so
``FailureConfig`` does not retry it); the study callback records it as errored. Any other
exception propagates, and Tune restarts the trial from its last checkpoint.
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

from ctt.config import CTTConfig
from ctt.state import TrainState
from ctt.step import NonFiniteLossError
from ctt.train import Trainer
from ctt.tune.space import resolve_config

__all__ = ["CHECKPOINT_FILE", "META_KEYS", "split_config", "train_ctt"]

CHECKPOINT_FILE = "state.pt"
META_FILE = "trial_meta.json"
META_KEYS = ("variant", "seed", "_fork_from", "_until")


def split_config(config: dict[str, Any]) -> tuple[CTTConfig, dict[str, Any]]:
    """Trial config -> (``CTTConfig``, meta keys). Unknown dotted keys raise ConfigError."""
    config = resolve_config(config)
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


def train_ctt(config: dict[str, Any]) -> None:
    """Function trainable: build or restore a TrainState, train, report, checkpoint."""
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


def trial_resources(cpus_per_trial: float, gpus_per_trial: float) -> dict[str, float]:
    """Tune resource request; fractional GPUs pack several trials on one device."""
    res = {"cpu": float(cpus_per_trial)}
    if gpus_per_trial:
        res["gpu"] = float(gpus_per_trial)
    return res
