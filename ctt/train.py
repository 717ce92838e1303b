"""A single CTT run: ``python -m ctt.train --preset tiny --variant ctt --out runs/x``.

The :class:`Trainer` owns the data streams, the :class:`~ctt.state.TrainState`, evaluation and
checkpointing; the CLI and the Ray Tune trainable (``ctt.tune.trainable``) both drive it, so a
study trial and a CLI run of the same config compute the same numbers (at the same thread
count).

Outputs in ``--out``: ``config.json`` (resolved flat config + versions + git commit),
``metrics.jsonl`` (one record per log/eval step; the metric names of
docs/method.md#metric-names, wall-clock values only under ``time/``), ``tb/`` (TensorBoard
scalars), ``checkpoints/step_XXXXXXXX.pt`` (the last few; written atomically), ``.run.lock``
(:mod:`ctt.rundir`).

One run per directory: ``--out`` is locked while the run lasts (a second run on it fails at
once, naming the holder); a fresh run refuses a non-empty ``--out`` unless ``--overwrite``, which
deletes only the files above and refuses a directory holding anything else; ``--resume`` needs a
run there (its ``config.json``; with no checkpoint yet it starts again from step 0) and refuses
``--iters`` below the checkpoint's step. ``metrics.jsonl`` and TensorBoard hold one history:
records past the resumed checkpoint are dropped, and TensorBoard's ``purge_step`` hides them.

SIGINT/SIGTERM (:mod:`ctt.interrupts`) stop the run between two steps (an evaluation is cut
short), save a checkpoint of the last completed step, and exit 130/143 with one line on stderr:
where it stopped, the last checkpoint and the command that continues it.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # python -m ctt.train: importing torch takes seconds
    from ctt.interrupts import exit_quietly_while_loading

    exit_quietly_while_loading()

import torch  # noqa: E402

from ctt.config import (  # noqa: E402
    PRESETS,
    CTTConfig,
    apply_variant,
    check_semantics,
    get_preset,
    parse_set_args,
)
from ctt.data.loader import BatchStream, build_datasets, dataset_root, eval_loader  # noqa: E402
from ctt.envinfo import environment  # noqa: E402
from ctt.errors import UserError, guarded, warn, warn_all  # noqa: E402
from ctt.evaluate import evaluate_many  # noqa: E402
from ctt.fileio import TEMP_SUFFIX, append_record, truncate_records  # noqa: E402
from ctt.interrupts import Interrupted, SignalGuard, continue_command  # noqa: E402
from ctt.rundir import RUN_LOCK, DirLock  # noqa: E402
from ctt.state import (  # noqa: E402
    SEED_LABELED_ORDER,
    SEED_UNLABELED_ORDER,
    CheckpointError,
    TrainState,
    derive_seed,
)
from ctt.step import NonFiniteLossError, train_step  # noqa: E402

__all__ = ["Trainer", "latest_checkpoint", "main", "resolve_config"]

CKPT_GLOB = "step_*.pt"
# Images per evaluation forward (evaluation is independent of batch mates: ctt.evaluate).
EVAL_BATCH_SIZE = 16


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
        self._warned_unlabelled: set[str] = set()  # splits whose every label pixel is 255
        d = cfg.data
        self.streams = {"labeled": BatchStream(self.datasets["labeled"], d.batch_size,
                                               seed=derive_seed(cfg.run.seed, SEED_LABELED_ORDER),
                                               num_workers=d.num_workers)}
        if cfg.method.unsup != "none":
            self.streams["unlabeled"] = BatchStream(
                self.datasets["unlabeled"], d.batch_size_u,
                seed=derive_seed(cfg.run.seed, SEED_UNLABELED_ORDER), num_workers=d.num_workers)
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
    def evaluate(self, split: str = "val", *, teachers: bool = True) -> dict[str, float]:
        """mIoU of every student (``miou/student{k}``) and, with ``teachers``, every teacher
        (``miou/teacher{k}``) on ``split``, in one pass over its images; ``miou`` = mean over
        the students."""
        loader = eval_loader(self.datasets[split], batch_size=EVAL_BATCH_SIZE)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16,
                             enabled=self.cfg.run.amp == "bf16")
        names = [f"miou/student{k}" for k in range(len(self.state.students))]
        nets = list(self.state.students)
        if teachers:
            names += [f"miou/teacher{k}" for k in range(len(self.state.teachers))]
            nets += list(self.state.teachers)
        # DataLoader iterators draw a seed from the global RNG; fork it so that the evaluation
        # cadence (which may change on resume) cannot shift anything that trains.
        with torch.random.fork_rng(devices=[]), torch.no_grad(), amp:
            results = evaluate_many(nets, loader, self.cfg.data.num_classes, self.device)
        if int(results[0]["confusion"].sum()) == 0 and split not in self._warned_unlabelled:
            # every pixel is ignore (255): the mIoU below is 0 by construction, not a result
            self._warned_unlabelled.add(split)
            warn(f"the {split} split has no labelled pixel (every label value is 255, "
                 "ignore): its mIoU means nothing; check its label files")
        out = {name: res["miou"] for name, res in zip(names, results, strict=True)}
        students = [out[name] for name in names[:len(self.state.students)]]
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

        The periodic evaluations measure the students only (``miou`` is theirs, and it is
        what schedulers, curves and reports read); the teachers are evaluated once, at the
        run's last iteration (``optim.iters``), where the per-network table needs them. That
        halves the evaluation time of the two-pair variants.
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
                last = {**metrics,
                        **self.evaluate("val", teachers=step == self.cfg.optim.iters)}
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


RUN_FILES = ("config.json", "metrics.jsonl", "tb", "checkpoints")  # all that ctt.train writes
# What a run writes inside its two directories: TensorBoard event files, step checkpoints and,
# from a write cut short, an atomic write's temporary. --overwrite deletes these and no other.
RUN_DIR_FILES = {"tb": ("events.out.tfevents.*",),
                 "checkpoints": (CKPT_GLOB, f".{CKPT_GLOB}.*{TEMP_SUFFIX}")}


def _not_run_written(out: Path) -> list[Path]:
    """What ``out`` holds that no run wrote (a user's files, links, subdirectories)."""
    foreign = []
    for p in sorted(out.iterdir()):
        if p.name == RUN_LOCK:
            continue
        if p.name not in RUN_FILES or p.is_symlink():
            foreign.append(p)
        elif p.is_dir() != (p.name in RUN_DIR_FILES):
            foreign.append(p)
        elif p.is_dir():
            foreign += [q for q in sorted(p.iterdir())
                        if q.is_symlink() or not q.is_file()
                        or not any(fnmatch.fnmatchcase(q.name, g) for g in RUN_DIR_FILES[p.name])]
    return foreign


class _RunFiles:
    """``metrics.jsonl``, TensorBoard and checkpoints of a CLI run.

    ``start_step`` is the step the run (re)starts after: records past it (written after the
    checkpoint we resume from, by a run that was killed) are dropped from ``metrics.jsonl``, and
    TensorBoard gets a ``purge_step`` so its reader hides the same steps of the old event files.
    The new event file is named after ``start_step``: two writers opened within one second
    would otherwise get the same name, and tensorboardX truncates an existing file.
    """

    def __init__(self, out: Path, keep: int = 3, start_step: int = 0):
        from tensorboardX import SummaryWriter

        self.out, self.keep = out, keep
        self.ckpt_dir = out / "checkpoints"
        self.metrics_path = out / "metrics.jsonl"
        self.last_checkpoint = start_step
        self.truncate_after(start_step)
        self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None,
                                filename_suffix=f".from{start_step:09d}")
        self._tb_held: dict[str, float] | None = None

    @staticmethod
    def clear(out: Path, names: tuple[str, ...] = RUN_FILES) -> None:
        """Delete what ctt.train wrote in ``out`` (of ``names``) and nothing else
        (``--overwrite`` after :func:`_check_out_dir` found nothing foreign, or a restart;
        the caller holds the lock): its files by name, the event files and checkpoints in its
        two directories, then those directories if that left them empty."""
        for name in names:
            path = out / name
            if name in RUN_DIR_FILES and path.is_dir() and not path.is_symlink():
                for pattern in RUN_DIR_FILES[name]:
                    for f in path.glob(pattern):
                        f.unlink()
                with contextlib.suppress(OSError):  # not empty: something appeared meanwhile
                    path.rmdir()
            elif path.is_file() and not path.is_symlink():
                path.unlink()

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint we resume from)."""
        truncate_records(self.metrics_path, step + 1)

    def record(self, m: dict[str, float], *, tb: bool = True) -> None:
        """Append ``m`` to metrics.jsonl; and to TensorBoard unless ``tb`` is False (an
        evaluation of the same step follows and carries these values: one point per step)."""
        append_record(self.metrics_path, m)
        self._tb_held = None if tb else m
        if tb:
            self._add_scalars(m)

    def flush_held(self) -> None:
        """Write a record held back from TensorBoard (its evaluation was interrupted)."""
        if self._tb_held is not None:
            self._add_scalars(self._tb_held)
            self._tb_held = None

    def _add_scalars(self, m: dict[str, float]) -> None:
        for k, v in m.items():
            if k != "step":
                self.tb.add_scalar(k, v, int(m["step"]))
        self.tb.flush()

    def checkpoint(self, state: TrainState) -> None:
        state.save(self.ckpt_dir / f"step_{state.step:08d}.pt")
        self.last_checkpoint = state.step
        for old in sorted(self.ckpt_dir.glob(CKPT_GLOB))[:-self.keep]:
            old.unlink()

    def close(self) -> None:
        self.tb.close()


def _listing(paths: list[Path], limit: int = 4, relative_to: Path | None = None) -> str:
    names = sorted(str(p.relative_to(relative_to) if relative_to else p.name)
                   + ("/" if p.is_dir() else "") for p in paths)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit
                                        else "")


def _check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an --out that is not ours to write (checked before and again under the lock)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: choose another --out")
    if resume:
        if not (out / "config.json").is_file():
            raise UserError(f"nothing to resume in {out}: it holds no run (no config.json); "
                            "check --out, or start the run without --resume")
        return
    present = [p for p in out.iterdir() if p.name != RUN_LOCK] if out.is_dir() else []
    if not present:
        return
    if not overwrite:
        raise UserError(f"--out {out} is not empty ({_listing(present)}): pass --resume to "
                        "continue the run in it, --overwrite to replace it, or choose another "
                        "--out")
    if not (out / "config.json").is_file():
        raise UserError(f"--overwrite replaces a run, but --out {out} holds no run (no "
                        f"config.json; it holds {_listing(present)}): choose another --out")
    foreign = _not_run_written(out)
    if foreign:
        raise UserError(f"--overwrite clears only a run's own files ({', '.join(RUN_FILES)}), "
                        f"but --out {out} also holds {_listing(foreign, relative_to=out)}: "
                        "choose another --out")


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
    p.add_argument("--out", default="runs/train", help="output directory (one run; locked "
                   "while it trains)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in --out from its latest checkpoint")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete the run files in --out (config.json, metrics.jsonl, tb/, "
                      "checkpoints/) and start afresh; refused if --out holds anything else")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="run.device")
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    with SignalGuard() as guard:
        try:
            a = p.parse_args(argv)
            return _run(a, guard, argv)
        except Interrupted as e:  # before the run directory was locked
            again = continue_command(argv, ["python", "-m", "ctt.train"], resume=False)
            print(f"interrupted ({e.name}) before the run started; nothing was written; run "
                  f"again with: {again}", file=sys.stderr, flush=True)
            return e.exit_code


def _run(a: argparse.Namespace, guard: SignalGuard, argv: list[str] | None) -> int:
    overrides = parse_set_args(a.overrides)
    for key, val in (("data.root", a.data_root), ("data.labeled_split", a.split),
                     ("optim.iters", a.iters),
                     ("run.eval_every", a.eval_every), ("run.device", a.device)):
        if val is not None:
            overrides[key] = val
    cfg = resolve_config(a.preset, a.variant, overrides)
    warn_all(check_semantics(cfg, a.variant, set_keys=list(overrides), local=True))
    dataset_root(cfg)  # a missing or mismatched data root fails before anything is written
    out = Path(a.out)
    # Checked before the lock adds a file to --out (a refused directory stays as it was) unless
    # a run left its lock file there (then a run still going is named first), and again under
    # the lock (another run may have started meanwhile).
    if not (out / RUN_LOCK).is_file():
        _check_out_dir(out, resume=a.resume, overwrite=a.overwrite)
    with DirLock(out, RUN_LOCK, "run"):
        _check_out_dir(out, resume=a.resume, overwrite=a.overwrite)
        if a.overwrite:
            with guard.deferred():  # cleared whole or not at all
                _RunFiles.clear(out)
            guard.check()
        return _train(a, cfg, out, guard, argv)


def _train(a: argparse.Namespace, cfg: CTTConfig, out: Path, guard: SignalGuard,
           argv: list[str] | None) -> int:
    state: TrainState | None = None
    trainer: Trainer | None = None
    files: _RunFiles | None = None
    where = {"evaluating": False}
    total = cfg.optim.iters
    try:
        ckpt = latest_checkpoint(out / "checkpoints") if a.resume else None
        if ckpt is not None:
            try:
                saved = TrainState.read_checkpoint(ckpt)
                saved_step, saved_iters = int(saved["step"]), saved["config"]["optim.iters"]
                del saved
                if total < saved_step:
                    raise UserError(
                        f"--iters {total} is below the step of the checkpoint to resume "
                        f"({saved_step}, {ckpt}): a run cannot be shortened; pass --iters "
                        f"{saved_step} or more (the run's total was {saved_iters})")
                state = TrainState.load(ckpt, cfg)
            except CheckpointError as e:
                if "different config" not in str(e):
                    raise  # truncated, foreign: the message says what to do with the file
                raise UserError(f"{e}: the run's original --variant and --set options, in "
                                f"{out / 'config.json'}") from e
            print(f"resumed from {ckpt} (step {state.step})")
            if saved_iters != total:
                print(f"note: optim.iters changed from {saved_iters} to {total}; the poly "
                      "lr schedule follows the new total from here on")
        elif a.resume:
            # stopped before its first checkpoint: start over, without the old records
            print(f"note: {out} holds no checkpoint yet; the run starts again from step 0")
            _RunFiles.clear(out, ("metrics.jsonl", "tb"))
        cfg.to_json(out / "config.json", variant=a.variant, preset=a.preset, env=environment())
        files = _RunFiles(out, start_step=state.step if state is not None else 0)
        trainer = Trainer(cfg, state)
        print(f"training {a.variant} ({a.preset}) for {total} iterations on {trainer.device}; "
              f"output in {out}", flush=True)
        last = _fit(trainer, files, cfg, guard, where)
    except Interrupted as e:
        print(_interrupted_line(e, out, trainer, files, guard, argv, total, where["evaluating"]),
              file=sys.stderr, flush=True)
        return e.exit_code
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except UserError:
        # Refused before its first checkpoint (a data file found bad in the first batches):
        # nothing it wrote may block the same command once the input is fixed.
        if not a.resume and (files is None or files.last_checkpoint == 0):
            if files is not None:
                files.close()
                files = None
            _RunFiles.clear(out)
        raise
    finally:
        if files is not None:
            files.close()
    if last:
        print(f"done: mIoU {last['miou']:.2f} at step {int(last['step'])}")
    return 0


def _fit(trainer: Trainer, files: _RunFiles, cfg: CTTConfig, guard: SignalGuard,
         where: dict[str, bool]) -> dict[str, float]:
    """``trainer.fit`` with the CLI's records, stoppable by SIGINT/SIGTERM between steps.

    Signals are held while training and raised at the start of the next step, so the state,
    its records and checkpoints always describe the same completed step; an evaluation (which
    changes no state) is cut short at once.
    """
    total = cfg.optim.iters
    real_step, real_evaluate = trainer.step, trainer.evaluate

    def step() -> dict[str, float]:
        guard.check()
        return real_step()

    def evaluate(split: str = "val", **kwargs: Any) -> dict[str, float]:
        where["evaluating"] = True
        with guard.immediate():
            out = real_evaluate(split, **kwargs)
        where["evaluating"] = False
        return out

    trainer.step, trainer.evaluate = step, evaluate  # type: ignore[method-assign]

    def evaluated(s: int) -> bool:  # Trainer.fit's rule
        return s % cfg.run.eval_every == 0 or s == total

    def on_log(m: dict[str, float]) -> None:
        s = int(m["step"])
        files.record(m, tb=not evaluated(s))  # TensorBoard gets the evaluated record instead
        if not evaluated(s):
            print(_log_line(m, total), flush=True)

    def on_eval(m: dict[str, float]) -> None:
        s = int(m["step"])
        if s % cfg.run.log_every == 0 or s == total:  # replace the plain record of this step
            files.truncate_after(s - 1)
        files.record(m)
        print(_log_line(m, total), flush=True)

    with guard.deferred():
        last = trainer.fit(on_log=on_log, on_eval=on_eval,
                           on_checkpoint=lambda _s: files.checkpoint(trainer.state))
    guard.check()
    return last


def _interrupted_line(e: Interrupted, out: Path, trainer: Trainer | None,
                      files: _RunFiles | None, guard: SignalGuard, argv: list[str] | None,
                      total: int, evaluating: bool) -> str:
    """Save what can be saved and say where the run stopped and how to continue it."""
    failed = ""
    if trainer is not None and e.forced:  # cut short inside a step: the state may be torn
        where = (f"near step {trainer.state.step} of {total} by a second signal, at once "
                 "(that state is not saved)")
    elif trainer is not None and files is not None:
        with guard.deferred(forcible=False):  # the last save is not cut short
            try:
                files.flush_held()
                if trainer.state.step > files.last_checkpoint:
                    trainer.sync_streams()
                    files.checkpoint(trainer.state)
            except Exception as err:  # noqa: BLE001 - reported in the line; older ckpt kept
                failed = f" (saving step {trainer.state.step} failed: {err})"
        where = f"at step {trainer.state.step} of {total}" + (" during evaluation"
                                                              if evaluating else "")
    else:
        where = "before training started"
    ckpt = latest_checkpoint(out / "checkpoints")
    saved = f"last checkpoint step {int(ckpt.stem[5:])}" if ckpt else "no checkpoint yet"
    cmd = continue_command(argv, ["python", "-m", "ctt.train"],
                           resume=(out / "config.json").is_file(), drop=("--overwrite",))
    return f"interrupted ({e.name}) {where}; {saved}{failed}; continue with: {cmd}"
if __name__ == "__main__":
    sys.exit(main())
