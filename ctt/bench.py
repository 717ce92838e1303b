"""Step benchmark: ``python -m ctt.bench --preset tiny --variant ctt --iters 20``.

Measures, in one process on the same fixed synthetic batch:

* **Step overhead.** The median time of :func:`ctt.step.train_step` against the sum of the
  medians of the work it must do, each part timed on its own (same inputs, same state):
  teacher labelling (forward on ``x_u``, upsample, softmax), strong augmentation, student
  forward+backward on ``cat([x_l, x_s])`` (backward driven by fixed random output gradients,
  so the network's backward is timed without any loss), each loss term's forward+backward on
  detached copies of the student outputs (supervised CE, pseudo-label CE, high- and
  low-level contrast), the optimiser step, the EMA update and the bank update (teacher
  forward on ``x_l``, candidate selection, push). Step and parts run interleaved in one loop,
  so noise from other processes hits both alike. ``ratio = step / sum(parts)``; what exceeds
  1 is the step's own cost (per-role RNG forks, NaN guards, slicing, concatenation, one
  backward over the summed graph instead of many). The state has ``contrast_on = True``,
  banks full of random unit features and ``method.warmup_iters = 0``, so every term runs.
* **Peak memory of a step.** CUDA: ``torch.cuda.max_memory_allocated`` during the steps
  after a warm-up step, minus what was allocated before them. CPU: a child process builds
  the same state and batch, then reports (1) the growth of ``ru_maxrss`` (the process's peak
  resident set, KiB on Linux; it cannot be reset, so it only shows what exceeds the peak of
  importing torch and building the state) over ``n + 1`` steps; (2) where
  ``/proc/self/clear_refs`` is writable, the peak-RSS mark (``VmHWM``) is reset to the
  current RSS and ``VmHWM - VmRSS(before)`` is read after the first step (activations,
  gradients, autograd graph, optimiser state created on that step, allocator growth) and
  again after ``n`` further steps (the steady-state cost of a step).
* ``--all-variants``: seconds per iteration of every entry of :data:`ctt.config.VARIANTS`
  (1 thread by default), during the supervised warm-up and after it with contrast on: the
  numbers behind the studies' compute estimate. Data loading and evaluation are excluded.

Results are printed and written as JSON (``--json``; default
``benchmarks/results/step.json``, ``variants.json`` with ``--all-variants``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ctt.augment import strong_augment
from ctt.config import PRESETS, VARIANTS, CTTConfig, apply_variant, get_preset
from ctt.ema import ema_update
from ctt.errors import check_writable, guarded, int_at_least
from ctt.losses import high_level_contrast, low_level_contrast, pseudo_label_ce, supervised_ce
from ctt.memory_bank import bank_ready, select_bank_candidates
from ctt.state import TrainState, resolve_device

# The step's own resize/gather helpers, so the parts do exactly the work the step does.
from ctt.step import (
    IGNORE,
    PEER,
    _down,
    _up,
    high_level_anchors,
    low_level_anchors,
    train_step,
)

__all__ = ["COMPONENTS", "bench_config", "bench_step", "bench_variants", "main",
           "make_batch", "make_state", "peak_memory", "step_components"]

COMPONENTS = ("teacher_label", "augment", "student_fwd_bwd", "loss_sup", "loss_unsup",
              "loss_hc", "loss_lc", "optimizer", "ema", "bank")
CONTRAST = ("loss_hc", "loss_lc")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "benchmarks" / "results"
MIB = 2.0 ** 20


# --- setup ----------------------------------------------------------------------------------

def bench_config(preset: str = "tiny", variant: str | None = "ctt", *, amp: str = "none",
                 device: str = "cpu", threads: int | None = None,
                 warmup_iters: int = 0) -> CTTConfig:
    """Preset + variant with ``warmup_iters`` (0: every term from the first step), ``amp``
    and ``device``; ``threads`` defaults to the preset's ``run.num_threads``."""
    cfg = get_preset(preset)
    if variant:
        cfg = apply_variant(cfg, variant)
    flat: dict[str, Any] = {"method.warmup_iters": warmup_iters, "run.amp": amp,
                            "run.device": device}
    if threads is not None:
        flat["run.num_threads"] = threads
    return cfg.override(flat)


def make_batch(cfg: CTTConfig, device: torch.device | str, seed: int = 0
               ) -> dict[str, torch.Tensor]:
    """A fixed random batch: ``x_l [B,3,H,W]``, ``x_u [B_u,3,H,W]`` in ``[0, 1]`` and
    ``y_l [B,H,W]`` made of class blocks (as segmentation labels are) with a 2-pixel ignore
    (255) border, so every class and the ignore index occur."""
    d = cfg.data
    h, w = d.crop_size, d.crop_width or d.crop_size
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, d.num_classes, (d.batch_size, 1, h // 8 + 1, w // 8 + 1),
                         generator=g).float()
    y_l = F.interpolate(grid, scale_factor=8, mode="nearest")[:, 0, :h, :w].long()
    y_l[:, :2], y_l[:, -2:], y_l[:, :, :2], y_l[:, :, -2:] = IGNORE, IGNORE, IGNORE, IGNORE
    return {"x_l": torch.rand(d.batch_size, 3, h, w, generator=g).to(device),
            "y_l": y_l.to(device),
            "x_u": torch.rand(d.batch_size_u, 3, h, w, generator=g).to(device)}


def make_state(cfg: CTTConfig, device: torch.device | str, *, contrast_on: bool = True,
               seed: int = 0) -> TrainState:
    """A fresh :class:`TrainState` whose banks are full of random unit features and whose
    contrast flag is latched on (when the config has banks), so every term of the step runs."""
    state = TrainState(cfg, device)
    g = torch.Generator().manual_seed(seed)
    c, q, dim = cfg.data.num_classes, cfg.method.bank_size, cfg.model.feat_dim
    for bank in state.banks:
        feats = F.normalize(torch.randn(c * q, dim, generator=g), dim=1)
        bank.push(feats.to(state.device),
                  torch.arange(c).repeat_interleave(q).to(state.device))
    state.contrast_on = contrast_on and len(state.banks) > 0
    return state


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _amp(cfg: CTTConfig, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.run.amp == "bf16")


# --- the parts of one step ------------------------------------------------------------------

class _Timer:
    """Accumulates synchronised wall time and this process's CPU time per component name."""

    def __init__(self, device: torch.device):
        self.sync = _sync(device)
        self.times: dict[str, float] = {}
        self.cpu_times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        self.cpu_times[name] = self.cpu_times.get(name, 0.0) + time.process_time() - c0


def step_components(state: TrainState, batch: dict[str, torch.Tensor],
                    generator: torch.Generator) -> tuple[dict[str, float], dict[str, float]]:
    """Run the work of one :func:`train_step` as separate parts; ``(wall, cpu)`` seconds per
    part (``cpu`` = this process's CPU time, all threads).

    Mirrors ``ctt.step.train_step`` for ``state.cfg`` (same calls, same shapes) but times each
    part alone. The student's backward is driven by fixed-scale random gradients of
    ``(logits, feats)``; each loss term is differentiated on detached copies of those outputs.
    Parts the config does not run are absent. Mutates ``state`` (parameters, banks) like a
    step, except ``state.step``.
    """
    cfg = state.cfg
    m = cfg.method
    device = state.device
    amp = _amp(cfg, device)
    timer = _Timer(device)
    x_l, y_l = batch["x_l"], batch["y_l"]
    B, H, W = y_l.shape
    pairs = len(state.students)
    semi = m.unsup != "none" and state.step >= m.warmup_iters
    src = [PEER[k] if m.unsup == "cross" else k for k in range(pairs)]
    for s in state.students:
        s.train()

    views: list[tuple[torch.Tensor, torch.Tensor]] = []
    if semi:
        x_u = batch["x_u"]
        p_t = []
        with timer("teacher_label"):
            for teacher in state.teachers:
                with torch.no_grad(), amp:
                    p_t.append(torch.softmax(_up(teacher(x_u)[0].float(), (H, W)), dim=1))
        with timer("augment"):
            if m.shared_aug:
                aug = strong_augment(x_u, p_t, mix=m.mix, generator=generator)
                views = [(aug.images, aug.probs[src[k]]) for k in range(pairs)]
            else:
                for k in range(pairs):
                    aug = strong_augment(x_u, [p_t[src[k]]], mix=m.mix, generator=generator)
                    views.append((aug.images, aug.probs[0]))

    # Network forward+backward alone; the outputs' detached copies feed the loss parts.
    outs = []
    for k, student in enumerate(state.students):
        x = torch.cat([x_l, views[k][0]]) if semi else x_l
        with timer("student_fwd_bwd"):
            with amp:
                logits, feats = student(x)
        grads = [torch.randn_like(logits) * 1e-4, torch.randn_like(feats) * 1e-4]
        with timer("student_fwd_bwd"):
            torch.autograd.backward([logits, feats], grads)
        outs.append((logits.detach().requires_grad_(), feats.detach().requires_grad_()))

    banks = list(state.banks)
    use_contrast = semi and state.contrast_on
    for k in range(pairs):
        logits, feats = outs[k]
        with timer("loss_sup"):
            supervised_ce(_up(logits[:B].float(), (H, W)), y_l).backward()
        if not semi:
            continue
        with timer("loss_unsup"):
            conf, yhat = views[k][1].max(dim=1)
            loss, _ = pseudo_label_ce(_up(logits[B:].float(), (H, W)), yhat, conf,
                                      weighting=m.weighting, tau_p=m.tau_p)
            (m.lambda_u * loss).backward()
        if not use_contrast:
            continue
        max_anchors = m.max_anchors or None
        if m.lambda_h > 0:
            with timer("loss_hc"):
                anchors, classes = high_level_anchors(feats, y_l, conf, yhat, m.tau_high_conf)
                loss = high_level_contrast(anchors, classes, banks[k].features, banks[k].valid,
                                           m.tau_h, max_anchors=max_anchors, generator=generator)
                (m.lambda_h * loss).backward()
        if m.lambda_l > 0 and pairs == 2:
            with timer("loss_lc"):
                anchors, positives, classes = low_level_anchors(
                    outs[k], outs[PEER[k]], conf, m.tau_high_conf, m.low_gate)
                loss = low_level_contrast(
                    anchors, positives, classes,
                    torch.cat([b.features for b in banks], dim=1),
                    torch.cat([b.valid for b in banks], dim=1), m.tau_l,
                    max_anchors=max_anchors, generator=generator)
                (m.lambda_l * loss).backward()

    with timer("optimizer"):
        for opt in state.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    if len(state.teachers):
        with timer("ema"):
            for k, teacher in enumerate(state.teachers):
                ema_update(teacher, state.students[k], state.step, m.ema_decay,
                           buffers=m.ema_buffers)
    if banks:
        with timer("bank"):
            for k, bank in enumerate(banks):
                with torch.no_grad(), amp:
                    logits_t, feats_t = state.teachers[k](x_l)
                size = logits_t.shape[-2:]
                top_k = max(int(2 * m.bank_size / max(state.num_labeled, 1)), B)
                bank.push(*select_bank_candidates(
                    feats_t.float(), torch.softmax(logits_t.float(), 1), _down(y_l, size),
                    m.tau_bank, top_k))
            if not state.contrast_on:
                bank_ready(banks, m.bank_ready, m.bank_min_fill)
    return timer.times, timer.cpu_times


# --- benchmarks -----------------------------------------------------------------------------

def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def bench_step(cfg: CTTConfig, device: torch.device | str, *, iters: int = 20,
               warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    """Step time vs the sum of its parts (see the module docstring); medians in seconds.

    Returns ``{"step_s", "parts_s": {name: s}, "sum_s", "ratio", "ratio_per_iter_median",
    "contrast_s", "contrast_share", "shares": {name: part / step}, "cpu": {...}}``, where
    ``cpu`` holds the same step/parts/ratio on this process's CPU time, which other
    processes competing for the cores inflate far less than wall time (on CUDA it only
    counts the host side).
    """
    device = torch.device(device)
    torch.set_num_threads(cfg.run.num_threads)
    state = make_state(cfg, device, seed=seed)
    batch = make_batch(cfg, device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sync = _sync(device)
    step_t: dict[str, list[float]] = {"wall": [], "cpu": []}
    parts_t: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    ratios: dict[str, list[float]] = {"wall": [], "cpu": []}
    for i in range(warmup + iters):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(state, batch, cfg)
        sync()
        dt = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
        parts = dict(zip(("wall", "cpu"), step_components(state, batch, gen), strict=True))
        if i < warmup:
            continue
        for clock in ("wall", "cpu"):
            step_t[clock].append(dt[clock])
            ratios[clock].append(dt[clock] / max(sum(parts[clock].values()), 1e-12))
            for name, v in parts[clock].items():
                parts_t[clock].setdefault(name, []).append(v)

    def summary(clock: str) -> dict[str, Any]:
        step_s = _median(step_t[clock])
        parts_s = {n: _median(parts_t[clock][n]) for n in COMPONENTS if n in parts_t[clock]}
        sum_s = sum(parts_s.values())
        contrast_s = sum(parts_s.get(n, 0.0) for n in CONTRAST)
        return {"step_s": step_s, "parts_s": parts_s, "sum_s": sum_s, "ratio": step_s / sum_s,
                "ratio_per_iter_median": _median(ratios[clock]), "contrast_s": contrast_s,
                "contrast_share": contrast_s / step_s,
                "shares": {n: v / step_s for n, v in parts_s.items()},
                "step_s_all": step_t[clock]}

    return {**summary("wall"), "cpu": summary("cpu")}


def _read_proc_status(key: str) -> int | None:
    """``VmRSS``/``VmHWM`` of this process in bytes, or ``None`` without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB, macOS bytes


def _memory_in_process(cfg: CTTConfig, device: torch.device, steps: int) -> dict[str, Any]:
    torch.set_num_threads(cfg.run.num_threads)
    state = make_state(cfg, device)
    batch = make_batch(cfg, device)
    if device.type == "cuda":
        train_step(state, batch, cfg)  # warm-up: optimiser state, cuDNN plans
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            train_step(state, batch, cfg)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "torch.cuda.max_memory_allocated after 1 warm-up step",
                "resident_before_mib": base / MIB, "peak_mib": peak / MIB,
                "step_peak_delta_mib": (peak - base) / MIB,
                "reserved_mib": torch.cuda.max_memory_reserved(device) / MIB}
    # ru_maxrss cannot be reset, so its growth misses any step peak below an earlier peak
    # (importing torch, building the state); the VmHWM reset measures each phase on its own.
    before = _maxrss_bytes()
    rss0 = _reset_peak_rss()
    train_step(state, batch, cfg)
    first = _read_proc_status("VmHWM")
    rss1 = _reset_peak_rss()
    for _ in range(steps):
        train_step(state, batch, cfg)
    later = _read_proc_status("VmHWM")
    out: dict[str, Any] = {
        "method": f"CPU child process: ru_maxrss growth over {steps + 1} steps; peak RSS "
                  "(VmHWM, reset via /proc/self/clear_refs) minus RSS before, for the first "
                  f"step and for the {steps} steps after it",
        "maxrss_before_mib": before / MIB,
        "maxrss_growth_mib": (_maxrss_bytes() - before) / MIB}
    if rss0 is not None and first is not None:
        out["rss_before_mib"] = rss0 / MIB
        out["first_step_peak_delta_mib"] = (first - rss0) / MIB
    if rss1 is not None and later is not None:
        out["step_peak_delta_mib"] = (later - rss1) / MIB
    return out


def _reset_peak_rss() -> int | None:
    """Reset this process's VmHWM to its current RSS; return that RSS (bytes), or ``None``
    where /proc/self/clear_refs is missing or read-only."""
    rss = _read_proc_status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return rss


def peak_memory(cfg: CTTConfig, device: torch.device | str, steps: int = 3) -> dict[str, Any]:
    """Peak memory of a step (module docstring). On CPU it runs in a fresh child process
    (``python -m ctt.bench --memory-child``) so earlier allocations cannot hide the peak."""
    device = torch.device(device)
    if device.type == "cuda":
        return _memory_in_process(cfg, device, steps)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "ctt.bench", "--memory-child", json.dumps(cfg.to_flat()),
           "--memory-steps", str(steps)]
    if os.name == "posix" and Path("/bin/sh").exists():
        # Linux carries the parent's peak RSS into ru_maxrss across fork/exec; launching the
        # child from a forked shell (a small process) starts its ru_maxrss afresh.
        cmd = ["/bin/sh", "-c", shlex.join(cmd) + "; exit $?"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child process failed ({' '.join(cmd)[:200]} ...):\n"
                           f"{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_variants(preset: str = "tiny", *, device: str = "cpu", threads: int = 1,
                   iters: int = 10, warmup: int = 2, amp: str = "none",
                   variants: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Median seconds per :func:`train_step` for each variant: ``warmup_s`` during the
    supervised warm-up (``step < method.warmup_iters``) and ``s_per_iter`` after it with the
    contrast latched on and full banks (the steady state; an upper bound before the banks
    fill); ``cpu_warmup_s`` and ``cpu_s_per_iter`` are the same on this process's CPU time.
    All variants step round-robin, so a change in machine load hits them alike."""
    dev = torch.device(device)
    sync = _sync(dev)
    torch.set_num_threads(threads)
    runs = []  # (variant, key, cfg, state, batch); stepped round-robin so load drift is shared
    for name in variants or list(VARIANTS):
        for key, warmup_iters in (("warmup_s", 10 ** 9), ("s_per_iter", 0)):
            cfg = bench_config(preset, name, amp=amp, device=device, threads=threads,
                               warmup_iters=warmup_iters)
            runs.append((name, key, cfg, make_state(cfg, dev), make_batch(cfg, dev)))
    times: dict[tuple[str, str], list[float]] = {}
    for i in range(warmup + iters):
        for name, key, cfg, state, batch in runs:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(state, batch, cfg)
            sync()
            if i >= warmup:
                times.setdefault((name, key), []).append(time.perf_counter() - t0)
                times.setdefault((name, "cpu_" + key), []).append(time.process_time() - c0)
    out: dict[str, dict[str, float]] = {}
    for (name, key), ts in times.items():
        out.setdefault(name, {})[key] = _median(ts)
    return out


# --- reporting ------------------------------------------------------------------------------

def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def format_step_table(res: dict[str, Any]) -> str:
    """The per-component table of :func:`bench_step` as text."""
    lines = [f"{'component':<16}{'median ms':>11}{'% of sum':>10}{'% of step':>11}"]
    for name, v in res["parts_s"].items():
        lines.append(f"{name:<16}{v * 1e3:>11.2f}{100 * v / res['sum_s']:>9.1f}%"
                     f"{100 * v / res['step_s']:>10.1f}%")
    lines.append(f"{'sum of parts':<16}{res['sum_s'] * 1e3:>11.2f}")
    lines.append(f"{'train_step':<16}{res['step_s'] * 1e3:>11.2f}")
    lines.append(f"ratio step/sum = {res['ratio']:.3f} (median of per-iteration ratios "
                 f"{res['ratio_per_iter_median']:.3f}); contrastive losses (hc+lc) = "
                 f"{res['contrast_s'] * 1e3:.2f} ms = {100 * res['contrast_share']:.1f}% "
                 "of the step")
    if "cpu" in res:
        c = res["cpu"]
        lines.append(f"process CPU time: step {c['step_s'] * 1e3:.2f} ms, parts "
                     f"{c['sum_s'] * 1e3:.2f} ms, ratio {c['ratio']:.3f} (per-iteration "
                     f"median {c['ratio_per_iter_median']:.3f}), contrast share "
                     f"{100 * c['contrast_share']:.1f}%")
    return "\n".join(lines)


def format_memory(mem: dict[str, Any]) -> str:
    parts = [f"{k} = {v:.1f}" for k, v in mem.items() if isinstance(v, float)]
    return f"peak memory ({mem.get('method', '')}): " + ", ".join(parts)


def format_variants_table(rows: dict[str, dict[str, float]]) -> str:
    lines = [f"{'variant':<14}{'warm-up s/iter':>16}{'full s/iter':>13}"
             f"{'cpu warm-up':>13}{'cpu full':>10}"]
    for name, r in rows.items():
        lines.append(f"{name:<14}{r['warmup_s']:>16.4f}{r['s_per_iter']:>13.4f}"
                     f"{r['cpu_warmup_s']:>13.4f}{r['cpu_s_per_iter']:>10.4f}")
    return "\n".join(lines)


def _write_json(path: str | Path, obj: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def _meta(device: torch.device | str, threads: int) -> dict[str, Any]:
    return {"device": device_name(device), "torch": torch.__version__,
            "python": platform.python_version(), "threads": threads,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


@guarded
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result dict (2 after a one-line input error)."""
    p = argparse.ArgumentParser(prog="python -m ctt.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--variant", default="ctt", choices=list(VARIANTS),
                   help="a name in ctt.config.VARIANTS")
    p.add_argument("--iters", type=int_at_least(1), default=20,
                   help="timed iterations (median)")
    p.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed iterations first")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch threads (default: the preset's run.num_threads)")
    p.add_argument("--memory-steps", type=int_at_least(1), default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--all-variants", action="store_true",
                   help="only the seconds-per-iteration table of every variant")
    p.add_argument("--json", default=None, help="output file (default benchmarks/results/"
                   "step.json, or variants.json with --all-variants)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    args = p.parse_args(argv)

    if args.memory_child is not None:  # internal: the CPU peak-memory child process
        cfg = CTTConfig.from_flat(json.loads(args.memory_child))
        res = _memory_in_process(cfg, torch.device("cpu"), args.memory_steps)
        print(json.dumps(res))
        return res

    out_path = Path(args.json or DEFAULT_DIR / ("variants.json" if args.all_variants
                                                else "step.json"))
    check_writable(out_path, "--json")
    device = resolve_device(args.device)
    if args.all_variants:
        threads = args.threads or 1
        rows = bench_variants(args.preset, device=str(device), threads=threads,
                              iters=args.iters, warmup=args.warmup, amp=args.amp)
        print(f"{args.preset} on {device_name(device)}, {threads} thread(s), amp={args.amp}, "
              f"median of {args.iters} steps")
        print(format_variants_table(rows))
        out = {**_meta(device, threads), "preset": args.preset, "amp": args.amp,
               "iters": args.iters, "warmup": args.warmup, "variants": rows}
        path = _write_json(args.json or DEFAULT_DIR / "variants.json", out)
        print(f"wrote {path}")
        return out

    cfg = bench_config(args.preset, args.variant, amp=args.amp, device=str(device),
                       threads=args.threads)
    threads = cfg.run.num_threads
    res = bench_step(cfg, device, iters=args.iters, warmup=args.warmup)
    print(f"{args.preset}/{args.variant} on {device_name(device)}, {threads} thread(s), "
          f"amp={args.amp}, median of {args.iters} iterations after {args.warmup} warm-up")
    print(format_step_table(res))
    out = {**_meta(device, threads), "preset": args.preset, "variant": args.variant,
           "amp": args.amp, "iters": args.iters, "warmup": args.warmup,
           "config": cfg.to_flat(), **res}
    if not args.no_memory:
        out["memory"] = peak_memory(cfg, device, args.memory_steps)
        print(format_memory(out["memory"]))
    path = _write_json(args.json or DEFAULT_DIR / "step.json", out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
