"""How far single-seed results move when only the CPU kernels change.

    python benchmarks/kernel_spread.py                      # supervised,ctt x seeds 0,1,2
    python benchmarks/kernel_spread.py --variants supervised,ctt --seeds 0 --set optim.iters=60

Runs the real default study (``studies/voc_ablation.py``, same commit, seeds, data and library
versions) once per kernel setting: the machine's default, then with oneDNN capped to an older
instruction set (``ONEDNN_MAX_CPU_ISA``, default ``SSE41``), which picks other convolution
kernels, as another CPU would. Same seed, same machine and same setting are bit-identical
(tests/test_train.py); across settings the float rounding differs from the first step,
and chaotic training amplifies it. The JSON (``benchmarks/results/kernel_spread.json``, behind
README's reproducibility paragraph) holds each trial's final val mIoU under each setting, the
per-seed change, and the paired ``ctt - supervised`` difference under each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, ROOT, metadata, write_json

from ctt.errors import UserError, guarded

DEFAULT_OUT = RESULTS_DIR / "kernel_spread.json"
# ONEDNN_MAX_CPU_ISA values (oneDNN's documentation; oneDNN ignores one it does not know, which
# would silently rerun the default kernels)
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
               "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_AMX",
               "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "DEFAULT")


def run_study(storage: Path, name: str, variants: str, seeds: str, sets: list[str],
              isa: str | None) -> dict[tuple[str, int], float]:
    """One study under one kernel setting: (variant, seed) -> final val mIoU."""
    from ctt.tune.tables import load_trials

    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa  # Ray's local workers inherit the driver's env
    cmd = [sys.executable, str(ROOT / "studies" / "voc_ablation.py"), "--storage", str(storage),
           "--out", name, "--variants", variants, "--seeds", seeds]
    for s in sets:
        cmd += ["--set", s]
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc:  # the study printed its one error line
        raise SystemExit(rc)
    return {(t["variant"], int(t["seed"])): float(t["miou_final"])
            for t in load_trials(storage / name)}


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="supervised,ctt")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--isa", default="SSE41", help="ONEDNN_MAX_CPU_ISA of the second run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--storage", type=Path, default=None,
                   help="where the two studies go (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    if a.isa.upper() not in ONEDNN_ISAS:
        raise UserError(f"unknown --isa {a.isa!r}: oneDNN knows {', '.join(ONEDNN_ISAS)}")
    with tempfile.TemporaryDirectory(prefix="ctt-spread-") as tmp:
        storage = (a.storage or Path(tmp)).resolve()
        runs = {"default": run_study(storage, "spread_default", a.variants, a.seeds, a.set,
                                     None),
                a.isa: run_study(storage, f"spread_{a.isa.lower()}", a.variants, a.seeds,
                                 a.set, a.isa)}
    keys = sorted(runs["default"])
    rows: list[dict[str, Any]] = []
    for variant, seed in keys:
        base, other = runs["default"][(variant, seed)], runs[a.isa][(variant, seed)]
        rows.append({"variant": variant, "seed": seed, "default": base, a.isa: other,
                     "change": other - base})
        print(f"{variant:>14} seed {seed}: {base:6.2f} -> {other:6.2f} ({other - base:+.2f})")
    diffs: dict[str, list[float]] = {}
    names = a.variants.split(",")
    if len(names) == 2:
        lo, hi = names
        for setting, res in runs.items():
            diffs[setting] = [res[(hi, s)] - res[(lo, s)] for v, s in keys if v == hi]
            print(f"{hi} - {lo} under {setting}: "
                  + ", ".join(f"{d:+.2f}" for d in diffs[setting]))
    changes = [abs(r["change"]) for r in rows]
    summary = {"max_abs_change": max(changes), "mean_abs_change": sum(changes) / len(changes)}
    print(f"single-trial change: mean |d| {summary['mean_abs_change']:.2f}, "
          f"max {summary['max_abs_change']:.2f} mIoU")
    meta = metadata("cpu", "kernel_spread.py", argv)
    write_json(a.out, {**meta, "variants": a.variants, "seeds": a.seeds, "isa": a.isa,
                       "overrides": a.set, "trials": rows, "paired_differences": diffs,
                       **summary})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
