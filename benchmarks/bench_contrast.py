"""Benchmark: vectorised contrastive losses vs the per-class loop the tests check them with.

VOC scale by default (C=21, Q=256, D=256, 4096 anchors, full banks, random unit vectors).
Times forward+backward of ``ctt.losses.high_level_contrast`` / ``low_level_contrast`` and of
``loop_high_level`` / ``loop_low_level`` from ``tests/contrast_reference.py`` (a loop over
classes, vectorised within a class, the shape of the reference code), prints times, ratio,
max |value difference| and peak memory, and writes ``benchmarks/results/contrast.json``.

Peak memory: on CPU each (implementation, loss) pair runs in a fresh subprocess that builds
its inputs, resets the kernel's peak-RSS mark (``common.reset_peak_rss``), runs one
forward+backward and reports ``VmHWM - VmRSS(before)``: the extra resident memory the call
needed, including the autograd graph and the backward's temporaries (glibc returns large
blocks to the OS, so freed tensors do not hide later peaks; a fresh process has no cached
pages from other runs). Without /proc it falls back to the growth of ``ru_maxrss``. On CUDA,
``torch.cuda.max_memory_allocated`` minus the allocation before the call.

    python benchmarks/bench_contrast.py                       # CPU, float32, 2 threads
    python benchmarks/bench_contrast.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys

import common  # benchmarks/common.py: a script's folder is on sys.path
import torch
import torch.nn.functional as F

from ctt.errors import DeviceError, UserError, check_writable, guarded, int_at_least
from ctt.losses import (
    CHUNK_ELEMENTS,
    CHUNK_ELEMENTS_DEFAULT,
    high_level_contrast,
    low_level_contrast,
)

REFERENCE = common.load_module(common.ROOT / "tests" / "contrast_reference.py")
loop_high_level, loop_low_level = REFERENCE.loop_high_level, REFERENCE.loop_low_level

IMPLS = {
    ("high", "vectorised"): lambda x: high_level_contrast(
        x["anchors"], x["classes"], x["bank"], x["valid"], 0.1),
    ("high", "loop"): lambda x: loop_high_level(
        x["anchors"], x["classes"], x["bank"], x["valid"], 0.1),
    ("low", "vectorised"): lambda x: low_level_contrast(
        x["anchors"], x["positives"], x["classes"], x["bank2"], x["valid2"], 0.5),
    ("low", "loop"): lambda x: loop_low_level(
        x["anchors"], x["positives"], x["classes"], x["bank2"], x["valid2"], 0.5),
}


def make_inputs(args, device):
    g = torch.Generator().manual_seed(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)

    c, q, d, n = args.classes, args.queue, args.dim, args.anchors
    bank = unit(c, q, d)
    return {
        "anchors": unit(n, d).requires_grad_(True),
        "positives": unit(n, d),
        "classes": torch.randint(0, c, (n,), generator=g).to(device),
        "bank": bank,
        "valid": torch.ones(c, q, dtype=torch.bool, device=device),
        "bank2": torch.cat([bank, unit(c, q, d)], dim=1),
        "valid2": torch.ones(c, 2 * q, dtype=torch.bool, device=device),
    }


def autocast_ctx(args, device):
    if args.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fwd_bwd(fn, x, args, device):
    x["anchors"].grad = None
    with autocast_ctx(args, device):
        loss = fn(x)
    loss.backward()
    return loss.detach().float().item(), x["anchors"].grad.detach().float().clone()


def time_impl(fn, x, args, device):
    """Best and mean wall time, and best process CPU time (robust to other processes taking
    the cores, which inflates wall time on a shared machine; meaningless for CUDA)."""
    fwd_bwd(fn, x, args, device)  # warm-up
    timer = common.Timer(device)
    for _ in range(args.repeat):
        with timer("fwd_bwd"):
            fwd_bwd(fn, x, args, device)
    wall, cpu = timer.wall["fwd_bwd"], timer.cpu["fwd_bwd"]
    return min(wall), sum(wall) / len(wall), min(cpu)


def peak_memory_mb(loss, impl, args, device) -> float:
    """Extra peak memory of one forward+backward, in MiB (see module docstring)."""
    if device.type == "cuda":
        x = make_inputs(args, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fwd_bwd(IMPLS[(loss, impl)], x, args, device)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    cmd = [sys.executable, __file__, "--_probe", f"{loss}:{impl}"] + _passthrough(args)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def _passthrough(args) -> list[str]:
    return [
        "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
        "--classes", str(args.classes), "--queue", str(args.queue), "--dim", str(args.dim),
        "--anchors", str(args.anchors),
    ]


def probe(args, device) -> None:
    loss, impl = args._probe.split(":")
    x = make_inputs(args, device)
    before = common.reset_peak_rss()
    if before is not None and common.proc_status_bytes("VmHWM") is not None:
        # peak during the call minus resident memory before it
        fwd_bwd(IMPLS[(loss, impl)], x, args, device)
        after = common.proc_status_bytes("VmHWM")
    else:
        # Fallback: growth of the process's lifetime peak; under-reports when the import
        # peak was higher than what remains resident.
        before = common.maxrss_bytes()
        fwd_bwd(IMPLS[(loss, impl)], x, args, device)
        after = common.maxrss_bytes()
    print((after - before) / common.MIB)


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = inputs stay float32, run under torch.autocast(bfloat16)")
    p.add_argument("--threads", type=int_at_least(1), default=2)
    p.add_argument("--classes", type=int_at_least(1), default=21)
    p.add_argument("--queue", type=int_at_least(1), default=256)
    p.add_argument("--dim", type=int_at_least(1), default=256)
    p.add_argument("--anchors", type=int_at_least(1), default=4096)
    p.add_argument("--repeat", type=int_at_least(1), default=3)
    p.add_argument("--out", default=str(common.RESULTS_DIR / "contrast.json"))
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. how busy "
                   "the machine was)")
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"unknown device {args.device!r} (--device): use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda but no CUDA device is available: use --device cpu")
    if args._probe:
        probe(args, device)
        return 0
    check_writable(args.out, "--out")

    x = make_inputs(args, device)
    results = {
        **common.metadata(device, "bench_contrast.py", argv, threads=args.threads,
                          note=args.note),
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "chunk_elements": CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS_DEFAULT),
        "memory_method": "cuda max_memory_allocated delta" if device.type == "cuda"
        else "VmHWM - VmRSS before one fwd+bwd, fresh subprocess per implementation",
    }
    for loss in ("high", "low"):
        row = {}
        values = {}
        for impl in ("vectorised", "loop"):
            fn = IMPLS[(loss, impl)]
            values[impl] = fwd_bwd(fn, x, args, device)
            best, mean, cpu = time_impl(fn, x, args, device)
            row[impl] = {"best_s": best, "mean_s": mean, "best_cpu_s": cpu,
                         "value": values[impl][0],
                         "peak_mib": peak_memory_mb(loss, impl, args, device)}
        row["speedup_best"] = row["loop"]["best_s"] / row["vectorised"]["best_s"]
        row["speedup_cpu"] = row["loop"]["best_cpu_s"] / row["vectorised"]["best_cpu_s"]
        row["max_abs_value_diff"] = abs(values["vectorised"][0] - values["loop"][0])
        row["max_abs_grad_diff"] = float(
            (values["vectorised"][1] - values["loop"][1]).abs().max())
        results[loss] = row
        print(
            f"{loss:>4}-level: vectorised {row['vectorised']['best_s'] * 1e3:8.1f} ms "
            f"(peak +{row['vectorised']['peak_mib']:.0f} MiB) | loop "
            f"{row['loop']['best_s'] * 1e3:8.1f} ms (peak +{row['loop']['peak_mib']:.0f} MiB) | "
            f"speedup x{row['speedup_best']:.2f} (cpu-time x{row['speedup_cpu']:.2f}) | "
            f"|dvalue| {row['max_abs_value_diff']:.2e} "
            f"|dgrad| {row['max_abs_grad_diff']:.2e}"
        )
    print(f"wrote {common.write_json(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
