"""Hyperparameter sweep of CTT on VOC (embedded default: tiny preset, synthetic data, CPU).

Optuna TPE (seeded) samples the search space below; the scheduler prunes weak trials on their
intermediate val mIoU; the best trial is re-evaluated on the held-out test split.

    python studies/voc_sweep.py --num-samples 16 --scheduler optuna-median
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ctt.interrupts import exit_quietly_while_loading  # noqa: E402

exit_quietly_while_loading()  # Ray's import takes seconds: Ctrl-C there is one line too

from ctt.config import VARIANTS, CTTConfig  # noqa: E402
from ctt.errors import guarded  # noqa: E402
from ctt.tune.cli import (  # noqa: E402
    add_common_args,
    options_from_args,
    print_dry_run,
    run_study,
)


def search_space() -> dict:
    """Flat config key -> Tune domain. EMA decay is sampled as ``1 - decay`` on a log scale."""
    from ray import tune

    return {
        "1-method.ema_decay": tune.loguniform(1e-4, 0.1),  # decay 0.9 ... 0.9999
        "method.tau_h": tune.loguniform(0.05, 0.5),
        "method.tau_l": tune.loguniform(0.1, 1.0),
        "method.lambda_u": tune.uniform(0.25, 2.0),
        "method.lambda_h": tune.loguniform(0.01, 1.0),
        "method.lambda_l": tune.loguniform(0.01, 1.0),
        "method.tau_p": tune.uniform(0.7, 0.99),
    }


def variant_space(space: dict[str, Any], base: CTTConfig, variant: str) -> dict[str, Any]:
    """``space`` without the keys ``variant`` fixes (``VARIANTS``) or ignores
    (:func:`ctt.config.inert_keys`), e.g. the contrast weights and temperatures of a one-pair
    variant: sampling them would record values that never acted. Prints a note on what was
    left out; raises ConfigError when nothing is left to sample."""
    from ctt.config import ConfigError, apply_variant, inert_keys
    from ctt.tune.space import ONE_MINUS

    cfg = apply_variant(base, variant)
    fixed = set(VARIANTS[variant]) | set(inert_keys(cfg))
    if cfg.method.unsup == "none":  # the EMA decay moves only the teacher; `miou` is students'
        fixed.add("method.ema_decay")
    dropped = [k for k in space if k.removeprefix(ONE_MINUS) in fixed]
    kept = {k: v for k, v in space.items() if k not in dropped}
    if not kept:
        raise ConfigError(f"variant {variant!r} fixes or ignores every swept parameter "
                          f"({', '.join(space)}): choose a semi-supervised variant")
    if dropped:
        print(f"note: variant {variant} fixes or ignores {', '.join(dropped)}; not sampled",
              flush=True)
    return kept


@guarded
def main(argv: list[str] | None = None, *, default_name: str = "voc_sweep",
         default_preset: str = "tiny", description: str | None = None,
         defaults: dict[str, Any] | None = None) -> int:
    """Parse ``argv`` and run (or ``--dry-run``) the sweep; other sweeps reuse this.

    Args:
        defaults: config overrides of this study (below ``--smoke-test`` and ``--set``).
    The config and data root are checked before Ray starts (``--dry-run`` needs no data).
    """
    from ctt.tune.schedulers import SCHEDULERS

    p = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    add_common_args(p, default_preset=default_preset, default_seeds="0")
    p.add_argument("--variant", default="ctt", choices=sorted(VARIANTS))
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--scheduler", default="optuna-median", choices=SCHEDULERS)
    p.add_argument("--metric", default="miou", help="reported metric to maximise")
    a = p.parse_args(argv)
    opts = options_from_args(a, default_name + ("_smoke" if a.smoke_test else ""), defaults)
    num_samples = min(a.num_samples, 3) if a.smoke_test else a.num_samples

    space = variant_space(search_space(), opts.base_config(), a.variant)

    from ctt.tune.study import run_sweep

    if a.dry_run:
        base = opts.base_config()
        trial = {**base.to_flat(), "variant": a.variant, "seed": opts.seeds[0]}
        slots = max(1, int((os.cpu_count() or 1) // opts.cpus_per_trial))
        print(f"search space: {', '.join(space)}")
        print_dry_run([trial] * num_samples, opts, slots=slots, warmup_fork=False)
        return 0
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{default_name}.py")
    return run_study(run_sweep, opts, a.variant, space, num_samples=num_samples,
                     scheduler=a.scheduler, metric=a.metric, debug=a.debug, argv=argv,
                     prog=["python", os.path.relpath(script)])


if __name__ == "__main__":
    sys.exit(main())
