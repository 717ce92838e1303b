"""A single CTT run: ``python -m ctt.train --preset tiny --variant ctt --out runs/x``.

The :class:`Trainer` owns the data streams, the :class:`~ctt.state.TrainState`, evaluation and
checkpointing; the CLI and the Ray Tune trainable (``ctt.tune.trainable``) both drive it, so a
study trial and a CLI run of the same config compute the same numbers (at the same thread
count).

Outputs in ``--out``: ``config.json`` (resolved flat config + versions + git commit),
``metrics.jsonl`` (one record per log/eval step; metric names of architecture.md, wall-clock
values only under ``time/``), ``tb/`` (TensorBoard scalars), ``checkpoints/step_XXXXXXXX.pt``
(the last few; written atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ctt.config import PRESETS, CTTConfig, apply_variant, get_preset, parse_set_args
from ctt.data.loader import BatchStream, build_datasets, dataset_root, eval_loader
from ctt.envinfo import environment
from ctt.errors import guarded
from ctt.evaluate import evaluate
from ctt.state import CheckpointError, TrainState, derive_seed
from ctt.step import NonFiniteLossError, train_step

__all__ = ["Trainer", "latest_checkpoint", "main", "resolve_config"]

CKPT_GLOB = "step_*.pt"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``directory`` (``None`` if there is none)."""
    files = sorted(Path(directory).glob(CKPT_GLOB))
    return files[-1] if files else None


def resolve_config(preset: str = "tiny", variant: str | None = None,
                   overrides: dict[str, Any] | None = None) -> CTTConfig:
    """Preset, then variant, then ``--set`` overrides (the latter win)."""
    cfg = get_preset(preset)
    if variant:
        cfg = apply_variant(cfg, variant)
    return cfg.override(overrides or {})


class Trainer:
    """Drives :func:`ctt.step.train_step` over resumable data streams.

    Args:
        cfg: resolved config.
        state: an existing state (e.g. loaded or forked); default a fresh one.
        device: overrides ``run.device``.
        datasets: prebuilt datasets (``build_datasets`` output) to share between runs.
    """

    def __init__(self, cfg: CTTConfig, state: TrainState | None = None,
                 device: str | None = None, datasets: dict | None = None):
        torch.set_num_threads(cfg.run.num_threads)
        self.cfg = cfg
        self.datasets = datasets if datasets is not None else build_datasets(
            cfg, need_unlabeled=cfg.method.unsup != "none")
        self.state = state if state is not None else TrainState(cfg, device)
        self.device = self.state.device
        self.state.num_labeled = len(self.datasets["labeled"])
        d = cfg.data
        self.streams = {"labeled": BatchStream(self.datasets["labeled"], d.batch_size,
                                               seed=derive_seed(cfg.run.seed, 10),
                                               num_workers=d.num_workers)}
        if cfg.method.unsup != "none":
            self.streams["unlabeled"] = BatchStream(self.datasets["unlabeled"], d.batch_size_u,
                                                    seed=derive_seed(cfg.run.seed, 11),
                                                    num_workers=d.num_workers)
        for name, stream in self.streams.items():
            stream.load_state_dict(self.state.streams.get(name, {"consumed": 0}))

    # --- one iteration ----------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        x_l, y_l = self.streams["labeled"].next()
        batch = {"x_l": x_l.to(self.device), "y_l": y_l.to(self.device)}
        m = self.cfg.method
        if m.unsup != "none" and self.state.step >= m.warmup_iters:
            x_u, _ = self.streams["unlabeled"].next()
            batch["x_u"] = x_u.to(self.device)
        return batch

    def step(self) -> dict[str, float]:
        metrics = train_step(self.state, self.next_batch(), self.cfg)
        self.sync_streams()
        return metrics

    def sync_streams(self) -> None:
        for name, stream in self.streams.items():
            self.state.streams[name] = stream.state_dict()

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, split: str = "val") -> dict[str, float]:
        """mIoU of every student and teacher on ``split``; ``miou`` = mean over students."""
        loader = eval_loader(self.datasets[split], batch_size=16)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16,
                             enabled=self.cfg.run.amp == "bf16")
        out: dict[str, float] = {}
        # DataLoader iterators draw a seed from the global RNG; fork it so that the evaluation
        # cadence (which may change on resume) cannot shift anything that trains.
        with torch.random.fork_rng(devices=[]), torch.no_grad(), amp:
            for role, nets in (("student", self.state.students),
                               ("teacher", self.state.teachers)):
                for k, net in enumerate(nets):
                    res = evaluate(net, loader, self.cfg.data.num_classes, self.device)
                    out[f"miou/{role}{k}"] = res["miou"]
        students = [out[f"miou/student{k}"] for k in range(len(self.state.students))]
        out["miou"] = sum(students) / len(students)
        return out

    # --- the loop ---------------------------------------------------------------------------
    def fit(self, *, until: int | None = None,
            on_log: Callable[[dict[str, float]], None] | None = None,
            on_eval: Callable[[dict[str, float]], None] | None = None,
            on_checkpoint: Callable[[int], None] | None = None) -> dict[str, float]:
        """Train to ``until`` (default ``optim.iters``) total iterations.

        ``on_log`` gets the training metrics every ``run.log_every`` steps; ``on_eval`` the
        training metrics merged with the evaluation every ``run.eval_every`` steps and at the
        end; ``on_checkpoint(step)`` is called every ``run.checkpoint_every`` steps and at the
        end (the caller saves). Returns the last evaluation record.
        """
        r = self.cfg.run
        until = self.cfg.optim.iters if until is None else min(until, self.cfg.optim.iters)
        last: dict[str, float] = {}
        t_start, s_start = time.perf_counter(), self.state.step
        while self.state.step < until:
            t0 = time.perf_counter()
            metrics = self.step()
            step = self.state.step
            metrics["time/step_s"] = time.perf_counter() - t0
            rate = (step - s_start) / max(time.perf_counter() - t_start, 1e-9)
            metrics["time/it_per_s"] = rate
            metrics["time/eta_s"] = (until - step) / max(rate, 1e-9)
            if on_log is not None and (step % r.log_every == 0 or step == until):
                on_log(metrics)
            if step % r.eval_every == 0 or step == until:
                t0 = time.perf_counter()
                last = {**metrics, **self.evaluate("val")}
                last["time/eval_s"] = time.perf_counter() - t0
                if on_eval is not None:
                    on_eval(last)
            if on_checkpoint is not None and (step % r.checkpoint_every == 0 or step == until):
                on_checkpoint(step)
        return last


# --- CLI -------------------------------------------------------------------------------------

def _log_line(m: dict[str, float], total: int) -> str:
    parts = [f"it {int(m['step'])}/{total}", f"loss {m['loss/total']:.4f}",
             f"sup {m['loss/sup']:.4f}", f"unsup {m['loss/unsup']:.4f}",
             f"hc {m['loss/hc']:.4f}", f"lc {m['loss/lc']:.4f}"]
    if "miou" in m:
        parts.append(f"mIoU {m['miou']:.2f}")
    parts += [f"{m['time/it_per_s']:.1f} it/s", f"ETA {m['time/eta_s'] / 60:.1f} min"]
    return " | ".join(parts)


class _RunFiles:
    """``metrics.jsonl``, TensorBoard and checkpoints of a CLI run."""

    def __init__(self, out: Path, keep: int = 3):
        from tensorboardX import SummaryWriter

        self.out, self.keep = out, keep
        self.ckpt_dir = out / "checkpoints"
        self.metrics_path = out / "metrics.jsonl"
        self.tb = SummaryWriter(str(out / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint we resume from)."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def record(self, m: dict[str, float]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({k: (v if math.isfinite(v) else str(v)) for k, v in m.items()})
                    + "\n")
        for k, v in m.items():
            if k != "step":
                self.tb.add_scalar(k, v, int(m["step"]))
        self.tb.flush()

    def checkpoint(self, state: TrainState) -> None:
        state.save(self.ckpt_dir / f"step_{state.step:08d}.pt")
        for old in sorted(self.ckpt_dir.glob(CKPT_GLOB))[:-self.keep]:
            old.unlink()


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctt.train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--variant", default="ctt", help="ablation variant (ctt.config.VARIANTS)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override any flat config key (repeatable)")
    p.add_argument("--data-root", help="dataset root, read-only (tiny: default synthetic data, "
                   "generated once into ~/.cache/ctt)")
    p.add_argument("--split", help="labeled split name (data.labeled_split), e.g. 1464")
    p.add_argument("--iters", type=int, help="total iterations (optim.iters)")
    p.add_argument("--eval-every", type=int, help="run.eval_every")
    p.add_argument("--out", default="runs/train", help="output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="run.device")
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    a = p.parse_args(argv)

    overrides = parse_set_args(a.overrides)
    for key, val in (("data.root", a.data_root), ("data.labeled_split", a.split),
                     ("optim.iters", a.iters),
                     ("run.eval_every", a.eval_every), ("run.device", a.device)):
        if val is not None:
            overrides[key] = val
    cfg = resolve_config(a.preset, a.variant, overrides)
    dataset_root(cfg)  # a missing or mismatched data root fails before anything is written
    out = Path(a.out)
    files_existed = (out / "checkpoints").exists() and latest_checkpoint(out / "checkpoints")
    if files_existed and not a.resume:
        print(f"error: {out} already holds checkpoints; pass --resume to continue or choose "
              "another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    files = _RunFiles(out)
    state = None
    if a.resume and files_existed:
        ckpt = latest_checkpoint(files.ckpt_dir)
        try:
            saved_iters = TrainState.read_checkpoint(ckpt)["config"]["optim.iters"]
            state = TrainState.load(ckpt, cfg)
        except CheckpointError as e:
            print(f"error: {e}. Resume with the run's original --variant/--set options "
                  f"(see {out / 'config.json'}).", file=sys.stderr)
            return 1
        files.truncate_after(state.step)
        print(f"resumed from {ckpt} (step {state.step})")
        if saved_iters != cfg.optim.iters:
            print(f"note: optim.iters changed from {saved_iters} to {cfg.optim.iters}; the poly "
                  "lr schedule follows the new total from here on")
    cfg.to_json(out / "config.json", variant=a.variant, preset=a.preset, env=environment())
    trainer = Trainer(cfg, state)
    total = cfg.optim.iters
    print(f"training {a.variant} ({a.preset}) for {total} iterations on {trainer.device}; "
          f"output in {out}")

    def on_log(m: dict[str, float]) -> None:
        files.record(m)
        if int(m["step"]) % cfg.run.eval_every != 0 and int(m["step"]) != total:
            print(_log_line(m, total), flush=True)

    def on_eval(m: dict[str, float]) -> None:
        if int(m["step"]) % cfg.run.log_every != 0 and int(m["step"]) != total:
            files.record(m)
        else:  # replace the plain log record of this step with the evaluated one
            files.truncate_after(int(m["step"]) - 1)
            files.record(m)
        print(_log_line(m, total), flush=True)

    try:
        last = trainer.fit(on_log=on_log, on_eval=on_eval,
                           on_checkpoint=lambda _s: files.checkpoint(trainer.state))
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if last:
        print(f"done: mIoU {last['miou']:.2f} at step {int(last['step'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
