"""Step benchmark: ``python benchmarks/bench_step.py [--preset tiny --variant ctt --iters 20]``.

Measures, in one process on one fixed synthetic batch, with every term of the variant on
(``method.warmup_iters = 0``, banks full of random unit features, contrast latched):

* **Step overhead.** The median time of :func:`ctt.step.train_step` against the sum of the
  medians of its phases (:data:`PHASES`: the public functions of :mod:`ctt.step` that
  ``train_step`` runs), which :func:`phased_step` calls one by one with a timer around each.
  ``train_step`` and ``phased_step`` alternate on the same state, so load from other processes
  hits both alike. ``ratio = step / sum(phases)``; what exceeds 1 is what ``train_step`` does
  around its phases (the NaN guard's snapshot of the BatchNorm buffers and augmentation RNG).
  tests/test_step.py checks that ``phased_step`` and ``train_step`` give identical results.
* **Share of the contrastive terms.** What switching them off saves: ``1 - t(without) / t``,
  where ``without`` is ``train_step`` on a state of the same config with ``method.lambda_h = 0``
  (``hc``), ``method.lambda_l = 0`` (``lc``) or both (``both``: no banks, so the bank upkeep is
  saved too), stepped in the same loop.
* **Peak memory of a step.** CUDA: ``torch.cuda.max_memory_allocated`` during the steps after a
  warm-up step, minus what was allocated before them. CPU: a child process builds the same
  state and batch, then reports (1) the growth of ``ru_maxrss`` over ``n + 1`` steps (it cannot
  be reset, so it only shows what exceeds the peak of importing torch and building the state);
  (2) where ``/proc/self/clear_refs`` is writable, the peak-RSS mark (``VmHWM``) is reset to the
  current RSS and ``VmHWM - VmRSS(before)`` read after the first step (activations, gradients,
  autograd graph, the optimiser state created on that step) and after ``n`` further steps.
* **FLOPs per step against this machine's floor.** ``torch.utils.flop_counter`` counts the
  matmul/convolution FLOPs (2 per multiply-add, forward and backward) of one step (the second,
  so the optimiser state exists); :func:`throughput` measures what this core does on a large
  matmul and on a 3x3 convolution shaped like the tiny net's; ``floor_s`` = FLOPs / the faster
  of the two, and ``step_s / floor_s`` is how far the step is from what the machine could do
  (element-wise work, which the counter leaves out, is part of that gap).
* **The network alone.** The student's parameter count and one forward + backward of a labeled
  batch, on 1 and 2 threads (:func:`network_cost`): the cost below everything the step adds.
* ``--all-variants``: seconds per iteration of every entry of :data:`ctt.config.VARIANTS`
  (1 thread by default), during the supervised warm-up and after it with contrast on, and the
  FLOPs of a step of each: the numbers behind the studies' compute estimate. Data loading and
  evaluation are excluded.

Results are printed and written as JSON (``--json``; default ``benchmarks/results/step.json``,
or ``variants.json`` with ``--all-variants``), with the machine, versions and ``--note``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import common  # benchmarks/common.py: a script's folder is on sys.path
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ctt import step
from ctt.config import PRESETS, VARIANTS, CTTConfig, apply_variant, get_preset
from ctt.data.transforms import IGNORE_INDEX
from ctt.envinfo import device_name
from ctt.errors import check_writable, guarded, int_at_least
from ctt.models import build_model
from ctt.state import TrainState, resolve_device

PHASES = ("label_and_augment", "student_forwards", "student_losses", "optimise_students",
          "update_teachers_and_banks")
# The contrastive terms switched off, for their share of the step.
WITHOUT = {"hc": {"method.lambda_h": 0.0}, "lc": {"method.lambda_l": 0.0},
           "both": {"method.lambda_h": 0.0, "method.lambda_l": 0.0}}


# --- setup --------------------------------------------------------------------------------------

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
    border, so every class and the ignore index occur."""
    d = cfg.data
    h, w = d.crop_size, d.crop_width or d.crop_size
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, d.num_classes, (d.batch_size, 1, h // 8 + 1, w // 8 + 1),
                         generator=g).float()
    y_l = F.interpolate(grid, scale_factor=8, mode="nearest")[:, 0, :h, :w].long()
    y_l[:, :2], y_l[:, -2:], y_l[:, :, :2], y_l[:, :, -2:] = (IGNORE_INDEX,) * 4
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


# --- the step, phase by phase -------------------------------------------------------------------

@contextlib.contextmanager
def _untimed(name: str) -> Iterator[None]:
    yield


def phased_step(state: TrainState, batch: dict[str, torch.Tensor],
                timer: Callable[[str], contextlib.AbstractContextManager] = _untimed
                ) -> dict[str, float]:
    """The phases of :func:`ctt.step.train_step` in its order, each inside ``timer(name)``;
    the same result as ``train_step(state, batch)`` without its NaN rollback."""
    cfg = state.cfg
    with timer("label_and_augment"):
        views = step.label_and_augment(state, cfg, batch)
    with timer("student_forwards"):
        outs = step.student_forwards(state, cfg, batch, views)
    with timer("student_losses"):
        total, metrics = step.student_losses(state, cfg, batch, views, outs)
    with timer("optimise_students"):
        lr = step.optimise_students(state, total)
    with timer("update_teachers_and_banks"):
        metrics.update(step.update_teachers_and_banks(state, cfg, batch))
    state.step += 1
    metrics.update({"lr": lr, "step": state.step})
    return metrics


# --- benchmarks ---------------------------------------------------------------------------------

def bench_step(cfg: CTTConfig, device: torch.device | str, *, iters: int = 20,
               warmup: int = 3, seed: int = 0, contrast_share: bool = True) -> dict[str, Any]:
    """Step time vs the sum of its phases, and the contrastive terms' share (module docstring);
    medians in seconds.

    Returns ``{"step_s", "phases_s": {phase: s}, "sum_s", "ratio", "ratio_per_iter_median",
    "shares": {phase: phase / step}, "without_s": {...}, "contrast_shares": {"hc", "lc",
    "both"}, "contrast_share" (= both), "step_s_all", "cpu": {the same on process CPU time}}``;
    the contrast entries only when the config has banks and ``contrast_share``.
    """
    device = torch.device(device)
    torch.set_num_threads(cfg.run.num_threads)
    state = make_state(cfg, device, seed=seed)
    batch = make_batch(cfg, device, seed=seed)
    twins = ({name: make_state(cfg.override(flat), device, seed=seed)
              for name, flat in WITHOUT.items()} if contrast_share and state.banks else {})
    timer = common.Timer(device)
    for i in range(warmup + iters):
        if i == warmup:
            timer.clear()
        with timer("train_step"):
            step.train_step(state, batch)
        phased_step(state, batch, timer)
        for name, twin in twins.items():
            with timer("without_" + name):
                step.train_step(twin, batch)

    def summary(times: dict[str, list[float]]) -> dict[str, Any]:
        step_s = common.median(times["train_step"])
        phases_s = {n: common.median(times[n]) for n in PHASES}
        sum_s = sum(phases_s.values())
        per_iter = [s / sum(p) for s, *p in zip(times["train_step"],
                                                 *(times[n] for n in PHASES), strict=True)]
        out = {"step_s": step_s, "phases_s": phases_s, "sum_s": sum_s, "ratio": step_s / sum_s,
               "ratio_per_iter_median": common.median(per_iter),
               "shares": {n: v / step_s for n, v in phases_s.items()},
               "step_s_all": times["train_step"]}
        if twins:
            out["without_s"] = {n: common.median(times["without_" + n]) for n in twins}
            out["contrast_shares"] = {n: 1 - v / step_s for n, v in out["without_s"].items()}
            out["contrast_share"] = out["contrast_shares"]["both"]
        return out

    return {**summary(timer.wall), "cpu": summary(timer.cpu)}


def count_flops(state: TrainState, batch: dict[str, torch.Tensor]) -> int:
    """Matmul/convolution FLOPs of one :func:`ctt.step.train_step` on ``state`` (which it
    advances), as ``torch.utils.flop_counter.FlopCounterMode`` counts them: 2 per multiply-add,
    forward and backward; element-wise work is not counted."""
    with FlopCounterMode(display=False) as counter:
        step.train_step(state, batch)
    return int(counter.get_total_flops())


def step_flops(cfg: CTTConfig, device: torch.device | str, seed: int = 0) -> int:
    """:func:`count_flops` of the second step of a fresh :func:`make_state` (every term on),
    so that the count does not depend on the first step creating the optimiser state."""
    state, batch = make_state(cfg, device, seed=seed), make_batch(cfg, device, seed=seed)
    step.train_step(state, batch)
    return count_flops(state, batch)


def throughput(device: torch.device | str = "cpu", threads: int = 1, *, reps: int = 10
               ) -> dict[str, float]:
    """This machine's measured GFLOP/s (best of ``reps``, fp32, ``threads`` threads) on a 512^3
    matmul and on the forward of a 3x3 convolution shaped like the tiny net's 1/4-resolution
    layers (batch 16, 32 -> 32 channels, 24 x 24): ``{"matmul_gflops", "conv_gflops",
    "peak_gflops"}`` (peak = the faster of the two, the floor's denominator)."""
    device = torch.device(device)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = common.synchronizer(device)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(512, 512, generator=g).to(device) for _ in range(2))
    x = torch.randn(16, 32, 24, 24, generator=g).to(device)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False).to(device)
    work = {"matmul_gflops": (lambda: a @ b, 2 * 512 ** 3),
            "conv_gflops": (lambda: conv(x), 2 * 16 * 24 * 24 * 32 * 32 * 9)}
    out = {}
    try:
        with torch.no_grad():
            for name, (fn, flops) in work.items():
                best = float("inf")
                for _ in range(reps + 2):
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    best = min(best, time.perf_counter() - t0)
                out[name] = flops / best / 1e9
    finally:
        torch.set_num_threads(old_threads)
    out["peak_gflops"] = max(out["matmul_gflops"], out["conv_gflops"])
    return out


def network_cost(cfg: CTTConfig, device: torch.device | str, threads: tuple[int, ...] = (1, 2),
                 *, reps: int = 20) -> dict[str, Any]:
    """The student network alone: its parameter count and the median seconds of one forward +
    backward (train mode, summed outputs as the loss) on a labeled batch ``[B, 3, H, W]`` of
    the config's size, per thread count in ``threads`` (CPU; on CUDA only the first is used)."""
    device = torch.device(device)
    net = build_model(cfg, student=0).to(device).train()
    d = cfg.data
    x = torch.rand(d.batch_size, 3, d.crop_size, d.crop_width or d.crop_size,
                   generator=torch.Generator().manual_seed(0)).to(device)
    sync = common.synchronizer(device)
    old_threads = torch.get_num_threads()
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in net.parameters()),
                           "batch": list(x.shape), "fwd_bwd_s": {}}
    try:
        for n in threads if device.type == "cpu" else threads[:1]:
            torch.set_num_threads(n)
            times = []
            for i in range(reps + 3):
                sync()
                t0 = time.perf_counter()
                logits, feats = net(x)
                (logits.sum() + feats.sum()).backward()
                sync()
                if i >= 3:  # the first calls pick kernels and allocate
                    times.append(time.perf_counter() - t0)
                net.zero_grad(set_to_none=True)
            out["fwd_bwd_s"][str(n)] = common.median(times)
    finally:
        torch.set_num_threads(old_threads)
    return out


def _memory_in_process(cfg: CTTConfig, device: torch.device, steps: int) -> dict[str, Any]:
    torch.set_num_threads(cfg.run.num_threads)
    state = make_state(cfg, device)
    batch = make_batch(cfg, device)
    mib = common.MIB
    if device.type == "cuda":
        step.train_step(state, batch)  # warm-up: optimiser state, cuDNN plans
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step.train_step(state, batch)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "torch.cuda.max_memory_allocated after 1 warm-up step",
                "resident_before_mib": base / mib, "peak_mib": peak / mib,
                "step_peak_delta_mib": (peak - base) / mib,
                "reserved_mib": torch.cuda.max_memory_reserved(device) / mib}
    before = common.maxrss_bytes()
    rss0 = common.reset_peak_rss()
    step.train_step(state, batch)
    first = common.proc_status_bytes("VmHWM")
    rss1 = common.reset_peak_rss()
    for _ in range(steps):
        step.train_step(state, batch)
    later = common.proc_status_bytes("VmHWM")
    out: dict[str, Any] = {
        "method": f"CPU child process: ru_maxrss growth over {steps + 1} steps; peak RSS "
                  "(VmHWM, reset via /proc/self/clear_refs) minus RSS before, for the first "
                  f"step and for the {steps} steps after it",
        "maxrss_before_mib": before / mib,
        "maxrss_growth_mib": (common.maxrss_bytes() - before) / mib}
    if rss0 is not None and first is not None:
        out["rss_before_mib"] = rss0 / mib
        out["first_step_peak_delta_mib"] = (first - rss0) / mib
    if rss1 is not None and later is not None:
        out["step_peak_delta_mib"] = (later - rss1) / mib
    return out


def peak_memory(cfg: CTTConfig, device: torch.device | str, steps: int = 3) -> dict[str, Any]:
    """Peak memory of a step (module docstring). On CPU it runs in a fresh child process (this
    script with ``--memory-child``) so earlier allocations cannot hide the peak."""
    device = torch.device(device)
    if device.type == "cuda":
        return _memory_in_process(cfg, device, steps)
    env = dict(os.environ)  # the child finds ctt whether or not it is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(common.ROOT), env.get("PYTHONPATH"))
                                        if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child",
           json.dumps(cfg.to_flat()), "--memory-steps", str(steps)]
    if os.name == "posix" and Path("/bin/sh").exists():
        # Linux carries the parent's peak RSS into ru_maxrss across fork/exec; launching the
        # child from a forked shell (a small process) starts its ru_maxrss afresh.
        cmd = ["/bin/sh", "-c", shlex.join(cmd) + "; exit $?"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child process failed ({' '.join(cmd)[:200]} ...):\n"
                           f"{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_variants(preset: str = "tiny", *, device: str = "cpu", threads: int = 1,
                   iters: int = 10, warmup: int = 2, amp: str = "none",
                   variants: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Median seconds per :func:`ctt.step.train_step` for each variant: ``warmup_s`` during the
    supervised warm-up (``step < method.warmup_iters``) and ``s_per_iter`` after it with the
    contrast latched on and full banks (the steady state; an upper bound before the banks
    fill); ``cpu_warmup_s`` and ``cpu_s_per_iter`` are the same on this process's CPU time;
    ``gflop_warmup_s`` and ``gflop_s_per_iter`` the :func:`count_flops` of a step of each
    (GFLOP). All variants step round-robin, so a change in machine load hits them alike."""
    dev = torch.device(device)
    torch.set_num_threads(threads)
    runs = []  # (variant, key, state, batch)
    for name in variants or list(VARIANTS):
        for key, warmup_iters in (("warmup_s", 10 ** 9), ("s_per_iter", 0)):
            cfg = bench_config(preset, name, amp=amp, device=device, threads=threads,
                               warmup_iters=warmup_iters)
            runs.append((name, key, make_state(cfg, dev), make_batch(cfg, dev)))
    timer = common.Timer(dev)
    for i in range(warmup + iters):
        if i == warmup:
            timer.clear()
        for name, key, state, batch in runs:
            with timer(f"{name}/{key}"):
                step.train_step(state, batch)
    out: dict[str, dict[str, float]] = {}
    for name, key, state, batch in runs:
        out.setdefault(name, {})[key] = common.median(timer.wall[f"{name}/{key}"])
        out[name]["cpu_" + key] = common.median(timer.cpu[f"{name}/{key}"])
        # after the timed steps, so the count never slows a timed one
        out[name]["gflop_" + key] = count_flops(state, batch) / 1e9
    return out


# --- reporting ----------------------------------------------------------------------------------

def format_step_table(res: dict[str, Any]) -> str:
    """The per-phase table of :func:`bench_step` as text."""
    lines = [f"{'phase':<27}{'median ms':>11}{'% of sum':>10}{'% of step':>11}"]
    for name, v in res["phases_s"].items():
        lines.append(f"{name:<27}{v * 1e3:>11.2f}{100 * v / res['sum_s']:>9.1f}%"
                     f"{100 * v / res['step_s']:>10.1f}%")
    lines.append(f"{'sum of phases':<27}{res['sum_s'] * 1e3:>11.2f}")
    lines.append(f"{'train_step':<27}{res['step_s'] * 1e3:>11.2f}")
    lines.append(f"overhead step/sum = {res['ratio']:.3f} (median of per-iteration ratios "
                 f"{res['ratio_per_iter_median']:.3f})")
    if "contrast_shares" in res:
        lines.append("contrastive terms' share of the step (1 - without/with): " + ", ".join(
            f"{n} {100 * v:.1f}%" for n, v in res["contrast_shares"].items()))
    if "cpu" in res:
        c = res["cpu"]
        lines.append(f"process CPU time: step {c['step_s'] * 1e3:.2f} ms, phases "
                     f"{c['sum_s'] * 1e3:.2f} ms, overhead {c['ratio']:.3f} (per-iteration "
                     f"median {c['ratio_per_iter_median']:.3f})" + (
                         f", contrast share {100 * c['contrast_share']:.1f}%"
                         if "contrast_share" in c else ""))
    return "\n".join(lines)


def format_floor(res: dict[str, Any]) -> str:
    """FLOPs per step, the measured throughput and the step against its floor, as text."""
    t = res["throughput"]
    return (f"FLOPs per step (matmul/conv, fwd+bwd): {res['flops'] / 1e9:.3f} GFLOP; this "
            f"machine: matmul {t['matmul_gflops']:.1f}, conv {t['conv_gflops']:.1f} GFLOP/s; "
            f"floor {res['floor_s'] * 1e3:.2f} ms, step / floor = {res['floor_ratio']:.1f} "
            f"(on process CPU time {res['floor_ratio_cpu']:.1f})")


def format_network(net: dict[str, Any]) -> str:
    times = ", ".join(f"{float(v) * 1000:.1f} ms ({k} thread{'s' if k != '1' else ''})"
                      for k, v in net["fwd_bwd_s"].items())
    return (f"student network: {net['parameters']:,} parameters; forward + backward of a "
            f"{tuple(net['batch'])} batch {times}")


def format_memory(mem: dict[str, Any]) -> str:
    parts = [f"{k} = {v:.1f}" for k, v in mem.items() if isinstance(v, float)]
    return f"peak memory ({mem.get('method', '')}): " + ", ".join(parts)


def format_variants_table(rows: dict[str, dict[str, float]]) -> str:
    lines = [f"{'variant':<14}{'warm-up s/iter':>16}{'full s/iter':>13}"
             f"{'cpu warm-up':>13}{'cpu full':>10}{'GFLOP full':>12}"]
    for name, r in rows.items():
        lines.append(f"{name:<14}{r['warmup_s']:>16.4f}{r['s_per_iter']:>13.4f}"
                     f"{r['cpu_warmup_s']:>13.4f}{r['cpu_s_per_iter']:>10.4f}"
                     f"{r['gflop_s_per_iter']:>12.3f}")
    return "\n".join(lines)


@guarded
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result dict (2 after a one-line input error)."""
    p = argparse.ArgumentParser(prog="python benchmarks/bench_step.py",
                                description=__doc__.split("\n")[0])
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
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. how busy "
                   "the machine was)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    args = p.parse_args(argv)

    if args.memory_child is not None:  # internal: the CPU peak-memory child process
        cfg = CTTConfig.from_flat(json.loads(args.memory_child))
        res = _memory_in_process(cfg, torch.device("cpu"), args.memory_steps)
        print(json.dumps(res))
        return res

    out_path = Path(args.json or common.RESULTS_DIR / ("variants.json" if args.all_variants
                                                       else "step.json"))
    check_writable(out_path, "--json")
    device = resolve_device(args.device)
    if args.all_variants:
        threads = args.threads or 1
        rows = bench_variants(args.preset, device=str(device), threads=threads,
                              iters=args.iters, warmup=args.warmup, amp=args.amp)
        print(f"{args.preset} on {device_name(device)}, {threads} thread(s), "
              f"amp={args.amp}, median of {args.iters} steps")
        print(format_variants_table(rows))
        out = {**common.metadata(device, "bench_step.py", argv, threads=threads,
                                 note=args.note),
               "preset": args.preset, "amp": args.amp, "iters": args.iters,
               "warmup": args.warmup, "variants": rows}
        print(f"wrote {common.write_json(out_path, out)}")
        return out

    cfg = bench_config(args.preset, args.variant, amp=args.amp, device=str(device),
                       threads=args.threads)
    threads = cfg.run.num_threads
    res = bench_step(cfg, device, iters=args.iters, warmup=args.warmup)
    res["flops"] = step_flops(cfg, device)
    res["throughput"] = throughput(device, threads)
    res["floor_s"] = res["flops"] / (res["throughput"]["peak_gflops"] * 1e9)
    res["floor_ratio"] = res["step_s"] / res["floor_s"]
    res["floor_ratio_cpu"] = res["cpu"]["step_s"] / res["floor_s"]  # less hit by other load
    res["network"] = network_cost(cfg, device)
    print(f"{args.preset}/{args.variant} on {device_name(device)}, {threads} "
          f"thread(s), amp={args.amp}, median of {args.iters} iterations after "
          f"{args.warmup} warm-up")
    print(format_step_table(res))
    print(format_floor(res))
    print(format_network(res["network"]))
    out = {**common.metadata(device, "bench_step.py", argv, threads=threads, note=args.note),
           "preset": args.preset, "variant": args.variant, "amp": args.amp,
           "iters": args.iters, "warmup": args.warmup, "config": cfg.to_flat(), **res}
    if not args.no_memory:
        out["memory"] = peak_memory(cfg, device, args.memory_steps)
        print(format_memory(out["memory"]))
    print(f"wrote {common.write_json(out_path, out)}")
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
