"""One-shot GPU benchmark of CTT at paper scale: ``python benchmarks/gpu_bench.py``.

Needs only torch + torchvision (which brings numpy and Pillow) and this repository checkout;
the package need not be installed (the repo root is put on ``sys.path``). Parts, each
guarded so that one failing measurement prints its error and the rest still run:

1. ``contrast``: the vectorised contrastive losses (``ctt.losses``) against the per-class loop
   the tests check them with (``tests/contrast_reference.py``) at VOC scale: C=21, Q=256,
   D=256, 4096 anchors, full banks, forward+backward, float32 and bf16 autocast; median time,
   peak memory, value gap.
2. ``step``: ``bench_step.bench_step`` (train_step vs the sum of its phases, the contrastive
   terms' share) and ``bench_step.peak_memory`` for the ``voc-r101`` preset (DeepLab-v2
   ResNet-101, batch 10+10, crop 321, random weights, contrast on with full banks) without and
   with bf16 autocast. If a step runs out of memory it is retried once at half the batch.
3. ``variants``: seconds per iteration of every ``ctt.config.VARIANTS`` entry (warm-up and
   full), only while the time budget (``--budget-s``) allows.

Results go to ``$OUT/gpu_bench.json`` (``OUT`` defaults to ``./benchmarks/results``),
rewritten after every part so a run cut short still leaves what it measured, with the machine
and versions (``common.metadata``).

    python benchmarks/gpu_bench.py            # CUDA, about 3-5 minutes on one H100
    python benchmarks/gpu_bench.py --smoke    # tiny preset, 2 iterations, any device (CPU test)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# This script runs on lent GPU machines where the package is not installed: the repository
# root goes on sys.path so ``ctt`` imports from the checkout.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench_step  # noqa: E402
import common  # noqa: E402  (benchmarks/: a script's folder is on sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ctt.config import VARIANTS, get_preset  # noqa: E402
from ctt.errors import DeviceError, check_writable, guarded, int_at_least  # noqa: E402
from ctt.losses import high_level_contrast, low_level_contrast  # noqa: E402

RESULTS: dict[str, Any] = {}
T_START = time.perf_counter()


def _elapsed() -> float:
    return time.perf_counter() - T_START


def _write(out_dir: Path) -> None:
    common.write_json(out_dir / "gpu_bench.json", RESULTS)


def _guard(name: str, fn: Callable[[], Any], out_dir: Path) -> Any:
    """Run one measurement; on failure print and record the error and carry on."""
    print(f"\n== {name} (t = {_elapsed():.0f} s)", flush=True)
    try:
        res = fn()
    except Exception as e:  # report and continue: one failure must not lose the others
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
        print(f"!! {name} failed: {res['error'][:300]}", flush=True)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    RESULTS.setdefault("parts", {})[name] = res
    _write(out_dir)
    return res


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# --- 1. contrastive losses -----------------------------------------------------------------

# The loop the tests check the losses with (one home: tests/contrast_reference.py).
REFERENCE = common.load_module(ROOT / "tests" / "contrast_reference.py")


def bench_contrast(device: torch.device, *, classes: int, queue: int, dim: int, anchors: int,
                   iters: int, warmup: int) -> dict[str, Any]:
    loop_high, loop_low = REFERENCE.loop_high_level, REFERENCE.loop_low_level
    g = torch.Generator().manual_seed(0)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)

    bank, bank_peer = unit(classes, queue, dim), unit(classes, queue, dim)
    x = {"a": unit(anchors, dim).requires_grad_(True), "pos": unit(anchors, dim),
         "cls": torch.randint(0, classes, (anchors,), generator=g).to(device),
         "bank": bank, "valid": torch.ones(classes, queue, dtype=torch.bool, device=device),
         "bank2": torch.cat([bank, bank_peer], 1),
         "valid2": torch.ones(classes, 2 * queue, dtype=torch.bool, device=device)}
    impls = {
        ("high", "vectorised"): lambda: high_level_contrast(
            x["a"], x["cls"], x["bank"], x["valid"], 0.1),
        ("high", "loop"): lambda: loop_high(x["a"], x["cls"], x["bank"], x["valid"], 0.1),
        ("low", "vectorised"): lambda: low_level_contrast(
            x["a"], x["pos"], x["cls"], x["bank2"], x["valid2"], 0.5),
        ("low", "loop"): lambda: loop_low(
            x["a"], x["pos"], x["cls"], x["bank2"], x["valid2"], 0.5),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {"shape": {"C": classes, "Q": queue, "D": dim, "N": anchors},
                           "loop_reference": "tests/contrast_reference.py"}
    for dtype in ("fp32", "bf16"):
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
        for loss in ("high", "low"):
            row: dict[str, Any] = {}
            for impl in ("vectorised", "loop"):
                fn = impls[loss, impl]

                def once(fn: Callable = fn, amp: Any = amp) -> float:
                    x["a"].grad = None
                    with amp:
                        value = fn()
                    value.backward()
                    return float(value.detach().float())

                try:
                    times = []
                    for i in range(warmup + iters):
                        sync()
                        t0 = time.perf_counter()
                        value = once()
                        sync()
                        if i >= warmup:
                            times.append(time.perf_counter() - t0)
                    r: dict[str, Any] = {"median_s": statistics.median(times),
                                         "min_s": min(times), "value": value}
                    if device.type == "cuda":
                        sync()
                        torch.cuda.reset_peak_memory_stats(device)
                        before = torch.cuda.memory_allocated(device)
                        once()
                        sync()
                        r["peak_delta_mib"] = (torch.cuda.max_memory_allocated(device)
                                               - before) / 2 ** 20
                except Exception as e:  # e.g. the loop running out of memory
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    r = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                row[impl] = r
            v, lp = row["vectorised"], row["loop"]
            if "median_s" in v and "median_s" in lp:
                row["speedup"] = lp["median_s"] / v["median_s"]
                row["abs_value_diff"] = abs(v["value"] - lp["value"])
            out[f"{loss}/{dtype}"] = row
            print(f"{loss:>4}-level {dtype}: vectorised {_ms(v)} | loop {_ms(lp)} | "
                  f"speedup x{row.get('speedup', float('nan')):.2f} | "
                  f"|dvalue| {row.get('abs_value_diff', float('nan')):.2e}", flush=True)
    return out


def _ms(r: dict[str, Any]) -> str:
    if "median_s" not in r:
        return f"ERROR {r.get('error', '')[:80]}"
    mem = f", peak +{r['peak_delta_mib']:.0f} MiB" if "peak_delta_mib" in r else ""
    return f"{r['median_s'] * 1e3:8.2f} ms{mem}"


# --- 2. step overhead and memory ------------------------------------------------------------

def bench_step_amp(preset: str, device: torch.device, amp: str, *, iters: int, warmup: int,
                   memory_steps: int) -> dict[str, Any]:
    cfg = bench_step.bench_config(preset, "ctt", amp=amp, device=device.type)
    attempts: list[dict[str, Any]] = []
    for batch in (cfg.data.batch_size, max(1, cfg.data.batch_size // 2)):
        c = cfg.override({"data.batch_size": batch, "data.batch_size_u": batch})
        try:
            t0 = time.perf_counter()
            res = bench_step.bench_step(c, device, iters=iters, warmup=warmup)
            res["wall_s"] = time.perf_counter() - t0
            res["batch"] = f"{batch}+{batch}"
            print(f"{preset}, amp={amp}, batch {batch}+{batch}:")
            print(bench_step.format_step_table(res), flush=True)
            break
        except Exception as e:
            if not _is_oom(e) or batch == 1:
                raise
            attempts.append({"batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"!! out of memory at batch {batch}+{batch}; retrying at half", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    res["oom_attempts"] = attempts
    res["config"] = c.to_flat()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        res["memory"] = bench_step.peak_memory(c, device, memory_steps)
        print(bench_step.format_memory(res["memory"]), flush=True)
    except Exception as e:
        res["memory"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(f"!! peak memory failed: {res['memory']['error'][:300]}", flush=True)
    return res


# --- 3. seconds per iteration per variant ---------------------------------------------------

def bench_all_variants(preset: str, device: torch.device, amp: str, *, iters: int,
                       warmup: int, deadline_s: float, out_dir: Path) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    RESULTS.setdefault("parts", {})["variants"] = rows
    for name in VARIANTS:
        if _elapsed() > deadline_s:
            rows[name] = {"skipped": "time budget"}
            print(f"{name:<14} skipped (time budget)", flush=True)
            continue
        try:
            r = bench_step.bench_variants(preset, device=device.type, threads=1, iters=iters,
                               warmup=warmup, amp=amp, variants=[name])[name]
            print(f"{name:<14} warm-up {r['warmup_s']:.4f} s/iter | full "
                  f"{r['s_per_iter']:.4f} s/iter", flush=True)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{name:<14} ERROR {r['error'][:200]}", flush=True)
        rows[name] = r
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _write(out_dir)
    return rows


# --- main -----------------------------------------------------------------------------------

@guarded
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the parts; input errors (preset, device, output directory) are one ``error:`` line
    and exit code 2 before any measurement (returned as 2)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset, 2 iterations, small contrast shapes: a quick test")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--preset", default=None, help="default voc-r101 (tiny with --smoke)")
    p.add_argument("--iters", type=int_at_least(1), default=None,
                   help="timed iterations (default 10)")
    p.add_argument("--warmup", type=int_at_least(0), default=None,
                   help="untimed iterations (default 3)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="skip remaining variant timings after this many seconds")
    p.add_argument("--no-variants", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    args = p.parse_args(argv)

    if args.preset is not None:
        get_preset(args.preset)  # an unknown name fails here, not in every part
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda but no CUDA device is available: use --device cpu "
                          "(with --smoke) or auto")
    check_writable(args.out, "--out")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    smoke = args.smoke
    preset = args.preset or ("tiny" if smoke else "voc-r101")
    iters = args.iters or (2 if smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    out_dir = Path(args.out)
    if device.type != "cuda" and not smoke:
        print("warning: no CUDA device; running the full-size benchmark on the CPU will be "
              "very slow (use --smoke for a quick test)", flush=True)

    RESULTS.clear()
    RESULTS.update({"environment": common.metadata(device, "gpu_bench.py", argv),
                     "smoke": smoke, "preset": preset, "iters": iters, "warmup": warmup,
                     "parts": {}})
    print(json.dumps(RESULTS["environment"], default=str), flush=True)
    _write(out_dir)

    shape = (dict(classes=7, queue=16, dim=32, anchors=256) if smoke
             else dict(classes=21, queue=256, dim=256, anchors=4096))
    _guard("contrast", lambda: bench_contrast(device, **shape, iters=iters, warmup=warmup),
           out_dir)
    for amp in ("none", "bf16"):
        _guard(f"step/{amp}", lambda amp=amp: bench_step_amp(
            preset, device, amp, iters=iters, warmup=warmup, memory_steps=2), out_dir)
    if not args.no_variants:
        _guard("variants", lambda: bench_all_variants(
            preset, device, "none", iters=1 if smoke else 5, warmup=0 if smoke else 2,
            deadline_s=args.budget_s, out_dir=out_dir), out_dir)

    print(f"\n== summary (total {_elapsed():.0f} s)")
    print(summary(RESULTS))
    RESULTS["total_s"] = _elapsed()
    _write(out_dir)
    print(f"wrote {out_dir / 'gpu_bench.json'}")
    return RESULTS


def summary(results: dict[str, Any]) -> str:
    """A compact text table of the headline numbers."""
    parts = results.get("parts", {})
    lines = [f"{'measurement':<34}{'value':>40}"]

    def row(name: str, value: str) -> None:
        lines.append(f"{name:<34}{value:>40}")

    for amp in ("none", "bf16"):
        r = parts.get(f"step/{amp}", {})
        if "error" in r or "step_s" not in r:
            row(f"step {amp}", f"ERROR {str(r.get('error', 'not run'))[:32]}")
            continue
        row(f"step {amp} (batch {r['batch']})",
            f"{r['step_s'] * 1e3:.1f} ms, phases {r['sum_s'] * 1e3:.1f} ms, x{r['ratio']:.3f}")
        if "contrast_share" in r:
            row(f"  contrast share {amp}", f"{100 * r['contrast_share']:.1f}%")
        mem = r.get("memory", {})
        if "peak_mib" in mem:
            row(f"  peak memory {amp}", f"{mem['peak_mib']:.0f} MiB "
                f"(+{mem['step_peak_delta_mib']:.0f} over resident)")
        elif "step_peak_delta_mib" in mem:
            row(f"  peak memory {amp}", f"+{mem['step_peak_delta_mib']:.0f} MiB RSS")
    c = parts.get("contrast", {})
    for key in ("high/fp32", "low/fp32", "high/bf16", "low/bf16"):
        r = c.get(key, {})
        if "speedup" in r:
            row(f"contrast {key}", f"vec {r['vectorised']['median_s'] * 1e3:.2f} ms, loop "
                f"{r['loop']['median_s'] * 1e3:.2f} ms, x{r['speedup']:.1f}")
    variants = parts.get("variants", {})
    for name, r in variants.items():
        if isinstance(r, dict) and "s_per_iter" in r:
            row(f"variant {name}", f"warm-up {r['warmup_s']:.3f}, full {r['s_per_iter']:.3f} s/it")
    return "\n".join(lines)


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
