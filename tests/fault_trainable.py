"""Fault injection for the study tests: the real trainable with a crash or a NaN batch.

:func:`faulty_trainable` returns ``ctt.tune.trainable.train_ctt`` with faults chosen per variant.
A test puts it where the study looks the trainable up (``ctt.tune.experiment.train_ctt``, with
``monkeypatch.setattr``): the driver builds the Tuner from that name, and Ray ships the function
to its trial workers. Those workers cannot import this tests folder, so everything the trial
runs is defined inside :func:`faulty_trainable`: cloudpickle ships a nested function by value
(its module-level names, ``torch``, ``tune``, ``ctt.tune.trainable``, are imported by the
worker).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from ray import tune

from ctt.tune import trainable


def faulty_trainable(*, nan_at: Mapping[str, int] | None = None,
                     crash_at: Mapping[str, int] | None = None
                     ) -> Callable[[dict[str, Any]], None]:
    """``train_ctt`` with faults injected through ``Trainer.next_batch`` of the chosen variants
    (others, the shared warm-ups included, run unchanged).

    Args:
        nan_at: variant -> step whose labeled images are all NaN, so its loss is non-finite: a
            deterministic failure, reported as an error and never retried.
        crash_at: variant -> step after which the trial raises ``RuntimeError`` (before the
            next batch), like a lost node: Tune restarts it from its last checkpoint, and a
            trial restored from a checkpoint does not crash again.
    """
    nan_at, crash_at = dict(nan_at or {}), dict(crash_at or {})

    def faulty_train_ctt(config: dict[str, Any]) -> None:
        variant = config.get("variant")
        nan_step = nan_at.get(variant, 0)
        crash_step = crash_at.get(variant, 0) if tune.get_checkpoint() is None else 0

        class FaultyTrainer(trainable.Trainer):
            def next_batch(self) -> dict[str, torch.Tensor]:
                step = self.state.step  # completed iterations; this batch is for step + 1
                if crash_step and step == crash_step:
                    raise RuntimeError(f"injected crash after step {crash_step} (tests)")
                batch = super().next_batch()
                if step + 1 == nan_step:
                    batch["x_l"] = torch.full_like(batch["x_l"], float("nan"))
                return batch

        real = trainable.Trainer
        trainable.Trainer = FaultyTrainer  # what train_ctt builds, in this worker only
        try:
            trainable.train_ctt(config)
        finally:
            trainable.Trainer = real

    return faulty_train_ctt
