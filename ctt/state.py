"""``TrainState``: everything a CTT run needs to continue bit for bit, saved and loaded whole.

Holds the students ``S_k``, teachers ``T_k`` (EMA copies), one optimiser per student (SGD or
AdamW, head lr x ``head_lr_mult``, poly schedule applied each step), one memory bank per
teacher, the iteration counter, the latched ``contrast_on`` flag, the data-stream positions and
every RNG state (torch global, the augmentation generator). A checkpoint holds only tensors,
numbers, strings, lists and dicts, so :func:`torch.load` with ``weights_only=True`` accepts it:
RNG states are uint8 tensors and the config is its flat dict.

Initialisation is a pure function of ``(run.seed, k)`` per student, so the students of one
seed start identically in every variant (the paired design of the studies).
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ctt.config import CTTConfig
from ctt.ema import make_teacher, set_teacher_mode
from ctt.errors import DeviceError, UserError
from ctt.fileio import atomic_open
from ctt.memory_bank import MemoryBank
from ctt.models import build_model

__all__ = ["CHECKPOINT_FORMAT", "SEED_AUGMENT", "SEED_GLOBAL", "SEED_INIT", "SEED_LABELED_ORDER",
           "SEED_STEP", "SEED_UNLABELED_ORDER", "CheckpointError", "TrainState", "derive_seed",
           "resolve_device"]

CHECKPOINT_FORMAT = "ctt-trainstate-v1"

# Keys that do not influence the supervised warm-up, so a warm-up checkpoint of one variant may
# seed another (see ``TrainState.fork``).
FORKABLE_KEYS = frozenset({
    "method.unsup", "method.pairs", "method.lambda_u", "method.lambda_h", "method.lambda_l",
    "method.tau_h", "method.tau_l", "method.tau_p", "method.tau_high_conf", "method.mix",
    "method.shared_aug", "method.weighting", "method.low_gate", "method.max_anchors",
    "run.eval_every", "run.checkpoint_every", "run.log_every", "run.device", "run.num_threads",
    "data.num_workers", "data.test_split", "data.val_split",
})

# Keys a resumed run may change: run-only settings, and the total iteration count (extending a
# run; the poly schedule follows the new total from the resumed step on).
RESUMABLE_KEYS = frozenset({"run.eval_every", "run.checkpoint_every", "run.log_every",
                            "run.device", "data.num_workers", "optim.iters"})


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, truncated, foreign or does not match the config."""


# Seed streams: ``derive_seed(run.seed, STREAM, ...)`` gives each consumer of randomness its own
# stream, so drawing more from one never shifts another.
SEED_INIT = 1  # each student's initialisation (per student k)
SEED_AUGMENT = 2  # the CPU generator of the strong augmentation
SEED_GLOBAL = 3  # torch's global generator after construction
SEED_STEP = 4  # a forward with randomness in it (per step, role and network)
SEED_LABELED_ORDER = 10  # the labeled stream's order
SEED_UNLABELED_ORDER = 11  # the unlabeled stream's order


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (hashing, not addition)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("run.device='cuda' but no CUDA device is available: use --device cpu")
    return torch.device(name)


def _param_groups(model: nn.Module, cfg: CTTConfig) -> list[dict[str, Any]]:
    o = cfg.optim
    return [
        {"params": list(model.backbone_parameters()), "lr": o.lr, "base_lr": o.lr},
        {"params": list(model.head_parameters()), "lr": o.lr * o.head_lr_mult,
         "base_lr": o.lr * o.head_lr_mult},
    ]


def make_optimizer(model: nn.Module, cfg: CTTConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = _param_groups(model, cfg)
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


def poly_lr(optimizer: torch.optim.Optimizer, step: int, total: int, power: float) -> float:
    """Set every group's lr to ``base_lr * (1 - step/total)^power``; return the backbone lr."""
    factor = max(0.0, 1.0 - step / total) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


class TrainState:
    """The complete training state of one run (see module docstring).

    Attributes:
        cfg: the resolved config.
        students, teachers, banks: ``nn.ModuleList`` of length ``pairs`` (teachers empty when
            ``method.unsup == "none"``; banks empty when both contrast weights are 0).
        optimizers: one per student.
        step: completed iterations.
        contrast_on: latched once the banks are ready.
        generator: CPU generator for the strong augmentation.
        streams: ``{"labeled": {...}, "unlabeled": {...}}`` stream positions.
    """

    def __init__(self, cfg: CTTConfig, device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.run.device) if device is None else torch.device(device)
        m = cfg.method
        pairs = m.pairs
        self.students = nn.ModuleList()
        for k in range(pairs):
            torch.manual_seed(derive_seed(cfg.run.seed, SEED_INIT, k))
            self.students.append(build_model(cfg, student=k).to(self.device))
        self.teachers = nn.ModuleList()
        if m.unsup != "none":
            for s in self.students:
                t = make_teacher(s)
                set_teacher_mode(t, m.teacher_mode)
                self.teachers.append(t)
        self.banks = nn.ModuleList()
        if m.unsup != "none" and (m.lambda_h > 0 or m.lambda_l > 0):
            for _ in range(pairs):
                self.banks.append(MemoryBank(cfg.data.num_classes, m.bank_size,
                                             cfg.model.feat_dim).to(self.device))
        self.optimizers = [make_optimizer(s, cfg) for s in self.students]
        self.step = 0
        self.contrast_on = False
        # Size of the labeled set (sets the bank's per-class top-k); the runner fills it in.
        self.num_labeled = 1 << 30
        self.generator = torch.Generator().manual_seed(derive_seed(cfg.run.seed, SEED_AUGMENT))
        self.streams: dict[str, dict[str, int]] = {"labeled": {"consumed": 0},
                                                   "unlabeled": {"consumed": 0}}
        torch.manual_seed(derive_seed(cfg.run.seed, SEED_GLOBAL))

    # --- (de)serialisation ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(),
                               "aug": self.generator.get_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_flat(),
            "step": self.step,
            "contrast_on": self.contrast_on,
            "students": [s.state_dict() for s in self.students],
            "teachers": [t.state_dict() for t in self.teachers],
            "banks": [b.state_dict() for b in self.banks],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "streams": {k: dict(v) for k, v in self.streams.items()},
            "rng": rng,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temp file in the same directory, fsync, then ``os.replace``, so
        the final name never holds a half-written checkpoint."""
        path = Path(path)
        with atomic_open(path, "wb", fsync=True) as f:
            torch.save(self.state_dict(), f)
        return path

    @staticmethod
    def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
        """Load and sanity-check a checkpoint file (``weights_only=True``)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message goes on to suggest weights_only=False, which would run whatever
            # code the file holds: never repeated to a user.
            raise CheckpointError(
                f"cannot read checkpoint {path}: it holds Python objects beyond tensors and "
                "plain data, which ctt never writes, so it was refused unread (a file from "
                "another program, or altered); use a checkpoint that ctt wrote") from e
        except Exception as e:  # truncated or corrupt zip, not a torch file, ...
            raise CheckpointError(
                f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}. "
                "The file is truncated, corrupt or not a ctt checkpoint; delete it to restart "
                "from the previous one.") from e
        if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path} is not a ctt TrainState checkpoint (expected format "
                f"{CHECKPOINT_FORMAT!r}); was it written by another program?")
        return obj

    @classmethod
    def load(cls, path: str | os.PathLike, cfg: CTTConfig | None = None,
             device: torch.device | str | None = None) -> TrainState:
        """Restore a state saved by :meth:`save`. ``cfg`` (optional) must equal the saved
        config except for :data:`RESUMABLE_KEYS` (device, cadence, ``optim.iters``)."""
        obj = cls.read_checkpoint(path)
        saved = CTTConfig.from_flat(obj["config"])
        if cfg is not None:
            diff = _config_diff(saved, cfg, ignore=RESUMABLE_KEYS)
            if diff:
                raise CheckpointError(f"checkpoint {path} was written with a different config: "
                                      f"{diff}; use the config it was written with")
        state = cls(cfg or saved, device)
        state._load_obj(obj, path)
        return state

    def _load_obj(self, obj: dict[str, Any], path: Any, *, fork: bool = False) -> None:
        try:
            n = len(self.students)
            for s, sd in zip(self.students, obj["students"][:n], strict=True):
                s.load_state_dict(sd)
            if self.teachers:
                for t, sd in zip(self.teachers, obj["teachers"][:n], strict=True):
                    t.load_state_dict(sd)
            if self.banks:
                for b, sd in zip(self.banks, obj["banks"][:n], strict=True):
                    b.load_state_dict(sd)
            for o, sd in zip(self.optimizers, obj["optimizers"][:n], strict=True):
                o.load_state_dict(sd)
            self.step = int(obj["step"])
            self.contrast_on = bool(obj["contrast_on"]) and bool(self.banks)
            self.streams = {k: {kk: int(vv) for kk, vv in v.items()}
                            for k, v in obj["streams"].items()}
            self.generator.set_state(obj["rng"]["aug"])
            torch.set_rng_state(obj["rng"]["torch"])
            if "cuda" in obj["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(obj["rng"]["cuda"], self.device)
        except (KeyError, ValueError, RuntimeError) as e:
            what = "fork from" if fork else "load"
            raise CheckpointError(f"cannot {what} checkpoint {path}: {e}") from e

    @classmethod
    def fork(cls, path: str | os.PathLike, cfg: CTTConfig,
             device: torch.device | str | None = None) -> TrainState:
        """Start ``cfg`` from a shared warm-up checkpoint of another variant of the same seed.

        Valid when the checkpoint is still inside the supervised warm-up
        (``step <= method.warmup_iters``) and its config differs from ``cfg`` only in keys that
        the warm-up does not read (:data:`FORKABLE_KEYS`). The checkpoint must hold at least
        as many students/teachers/banks as ``cfg`` needs; extra ones are dropped. Because
        each student's randomness is its own (see ``ctt.step``), the result equals training
        ``cfg`` from scratch to the same step.
        """
        obj = cls.read_checkpoint(path)
        saved = CTTConfig.from_flat(obj["config"])
        diff = _config_diff(saved, cfg, ignore=FORKABLE_KEYS)
        if diff:
            raise CheckpointError(f"cannot fork {path}: configs differ in {diff}")
        if int(obj["step"]) > cfg.method.warmup_iters:
            raise CheckpointError(f"cannot fork {path}: step {obj['step']} is past the warm-up "
                                  f"({cfg.method.warmup_iters} iterations)")
        state = cls(cfg, device)
        need = {"students": len(state.students), "teachers": len(state.teachers),
                "banks": len(state.banks)}
        for key, n in need.items():
            if len(obj[key]) < n:
                raise CheckpointError(f"cannot fork {path}: it has {len(obj[key])} {key}, "
                                      f"{cfg.method.pairs} needed")
        state._load_obj(obj, path, fork=True)
        return state

    # --- helpers ----------------------------------------------------------------------------
    def set_lr(self) -> float:
        o = self.cfg.optim
        lr = math.nan
        for opt in self.optimizers:
            lr = poly_lr(opt, self.step, o.iters, o.poly_power)
        return lr


def _config_diff(a: CTTConfig, b: CTTConfig, ignore: frozenset | set) -> dict[str, tuple]:
    fa, fb = a.to_flat(), b.to_flat()
    return {k: (fa[k], fb[k]) for k in fa if k not in ignore and fa[k] != fb[k]}
