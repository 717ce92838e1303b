"""Record unpruned learning curves of the sweep space for the offline pruning replay.

    python benchmarks/record_curves.py                 # 24 configs x seeds 0,1,2 on tiny
    python benchmarks/record_curves.py --configs 4 --seeds 0 --set optim.iters=300   # a taste

Each run is one config of ``ctt.tune.space.ctt_space()`` (the space ``studies/voc_sweep.py``
samples, restricted to the ``ctt`` variant like a sweep) trained to the end by the real
:class:`ctt.train.Trainer`, evaluated on the val split every ``--eval-every`` iterations (100:
twice the sweep's cadence, so a replay can also simulate 200 by dropping every other point).
At each evaluation the run records the val metrics and its measured cost: iterations, process
CPU seconds and wall seconds, split into training and evaluation. CPU seconds are what the
replay's clock uses: with one torch thread per run they do not grow when other processes share
the machine, where wall seconds do.

Runs go ``--workers`` at a time (default 2, one per core), seed by seed, so an interrupted
recording leaves whole seeds. Finished runs are appended to ``<out>.partial.jsonl`` and skipped
when the same command is run again, as are the runs already in ``<out>`` (the committed file
holds seed 0 only: the same command records seeds 1 and 2 and rewrites it with all three); the
final file (``benchmarks/results/curves_tiny.json`` by default, tracked) is written once every
run is there.

Configs are drawn once with ``random.Random(--config-seed)`` through the Tune domains' own
samplers, so the curve set is the same on every machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, metadata, write_json

from ctt.errors import UserError, guarded

DEFAULT_OUT = RESULTS_DIR / "curves_tiny.json"
VARIANT = "ctt"


def sample_space(n: int, seed: int) -> list[dict[str, float]]:
    """``n`` configs of the sweep space (``ctt_space`` less the keys the variant fixes), keyed
    as the sweep keys them (``1-method.ema_decay`` included), rounded to 6 significant
    digits."""
    import numpy as np

    from ctt.config import get_preset
    from ctt.tune.space import ctt_space, variant_space

    space = variant_space(ctt_space(), get_preset("tiny"), VARIANT)
    rng = np.random.RandomState(random.Random(seed).randrange(2**31))
    out = []
    for _ in range(n):
        draw = {k: float(d.sample(random_state=rng)) for k, d in sorted(space.items())}
        out.append({k: float(f"{v:.6g}") for k, v in draw.items()})
    return out


def run_cfg(preset: str, params: dict[str, float], seed: int, eval_every: int,
            overrides: dict[str, Any]) -> Any:
    """The ``CTTConfig`` of one run (raises ConfigError on an unknown preset or key)."""
    from ctt.config import CTTConfig, apply_variant, get_preset
    from ctt.tune.space import resolve_one_minus

    flat = {**apply_variant(get_preset(preset), VARIANT).to_flat(),
            "run.eval_every": eval_every, "run.checkpoint_every": eval_every,
            "run.num_threads": 1, "run.device": "cpu", "run.seed": seed,
            **overrides, **resolve_one_minus(params)}
    return CTTConfig.from_flat(flat)


def run_config(preset: str, params: dict[str, float], seed: int, eval_every: int,
               overrides: dict[str, Any]) -> dict[str, Any]:
    """Train one config to the end; return its curve."""
    import torch

    from ctt.train import Trainer

    cfg = run_cfg(preset, params, seed, eval_every, overrides)
    torch.set_num_threads(1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    points: list[dict[str, Any]] = []
    evals = {"cpu": 0.0, "wall": 0.0}
    trainer = Trainer(cfg)
    real_eval = trainer.evaluate

    def timed_eval(*args: Any, **kw: Any) -> dict[str, float]:
        c, w = time.process_time(), time.perf_counter()
        try:
            return real_eval(*args, **kw)
        finally:
            evals["cpu"] += time.process_time() - c
            evals["wall"] += time.perf_counter() - w

    trainer.evaluate = timed_eval  # the real evaluation, timed apart from training

    def on_eval(m: dict[str, float]) -> None:
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        points.append({
            "step": int(m["step"]),
            "miou": float(m["miou"]),
            **{k: float(v) for k, v in m.items()
               if k.startswith("miou") and k != "miou" and isinstance(v, (int, float))},
            "cpu_s": round(cpu, 3), "eval_cpu_s": round(evals["cpu"], 3),
            "wall_s": round(wall, 3), "eval_wall_s": round(evals["wall"], 3)})

    trainer.fit(on_eval=on_eval)
    return {"params": params, "seed": seed, "points": points,
            "warmup_iters": cfg.method.warmup_iters, "iters": cfg.optim.iters}


def _job(args: tuple) -> dict[str, Any]:
    index, preset, params, seed, eval_every, overrides = args
    rec = run_config(preset, params, seed, eval_every, overrides)
    rec["config"] = index
    return rec


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--configs", type=int, default=24)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--config-seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {a.seeds!r}: give integers separated by commas") from None
    for flag, value in (("--configs", a.configs), ("--eval-every", a.eval_every),
                        ("--workers", a.workers)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not seeds:
        raise UserError("--seeds is empty")
    overrides = _parse_set(a.set)
    configs = sample_space(a.configs, a.config_seed)
    # a wrong preset or key is one line here, not a traceback from every worker
    run_cfg(a.preset, configs[0], seeds[0], a.eval_every, overrides)
    partial = a.out.with_suffix(".partial.jsonl")
    done: dict[tuple[int, int], dict[str, Any]] = {}
    # Runs already recorded count once: those of an earlier final file (a recording committed
    # with some seeds) and those of an interrupted one (the partial file), if their config
    # is the one this command draws.
    found: list[dict[str, Any]] = []
    if a.out.exists():
        found += json.loads(a.out.read_text()).get("runs", [])
    if partial.exists():
        found += [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    for rec in found:
        if rec["config"] < len(configs) and rec.get("params") == configs[rec["config"]]:
            done[(rec["seed"], rec["config"])] = rec
    jobs = [(i, a.preset, configs[i], s, a.eval_every, overrides)
            for s in seeds for i in range(len(configs)) if (s, i) not in done]
    total = len(done) + len(jobs)
    print(f"{len(done)} runs recorded, {len(jobs)} to go, {a.workers} at a time", flush=True)
    t0 = time.time()
    partial.parent.mkdir(parents=True, exist_ok=True)
    with mp.get_context("spawn").Pool(a.workers, maxtasksperchild=1) as pool, \
            partial.open("a") as log:
        for rec in pool.imap_unordered(_job, jobs):
            done[(rec["seed"], rec["config"])] = rec
            log.write(json.dumps(rec) + "\n")
            log.flush()
            last = rec["points"][-1]
            print(f"seed {rec['seed']} config {rec['config']:2d}: miou {last['miou']:.2f} "
                  f"cpu {last['cpu_s']:.0f}s ({len(done)}/{total})"
                  f" {time.time() - t0:.0f}s", flush=True)
    runs = [done[(s, i)] for s in seeds for i in range(len(configs))]
    meta = metadata("cpu", "record_curves.py", argv if argv is not None
                    else sys.argv[1:], threads=1)
    write_json(a.out, {**meta, "preset": a.preset, "variant": VARIANT,
                       "eval_every": a.eval_every, "overrides": overrides,
                       "config_seed": a.config_seed, "configs": configs, "seeds": seeds,
                       "clock": "cpu_s: process CPU seconds (one torch thread per run)",
                       "runs": runs})
    partial.unlink()
    print(f"wrote {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
