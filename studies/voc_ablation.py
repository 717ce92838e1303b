"""The paper's ablation table: supervised / mean teacher / dual self / cross teacher /
+ high-level contrast / + low-level contrast / full CTT, over several seeds (paired design).

    python studies/voc_ablation.py                          # embedded default: CPU, synthetic
    python studies/voc_ablation.py --preset voc-r101 --data-root /data/VOC2012 \
        --split 1464 --gpus-per-trial 1 --storage s3://bucket/ctt --address auto
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ctt.interrupts import exit_quietly_while_loading  # noqa: E402

exit_quietly_while_loading()  # Ray's import takes seconds: Ctrl-C there is one line too

from ctt.config import VARIANTS  # noqa: E402
from ctt.errors import guarded  # noqa: E402
from ctt.tune.cli import (  # noqa: E402
    add_common_args,
    options_from_args,
    print_dry_run,
    run_study,
)

VARIANT_ORDER = ["supervised", "mean_teacher", "dual_self", "cross", "cross_hc", "cross_lc", "ctt"]
assert set(VARIANT_ORDER) == set(VARIANTS)


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--variants", default=",".join(VARIANT_ORDER),
                   help="comma-separated subset of " + ", ".join(VARIANT_ORDER))
    p.add_argument("--no-fork", action="store_true",
                   help="run each trial's warm-up itself instead of forking a shared one")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANT_ORDER)}")
    opts = options_from_args(a, "voc_ablation" + ("_smoke" if a.smoke_test else ""))
    opts.fork_warmup = not a.no_fork

    from ctt.tune.study import ablation_trials, run_ablation

    if a.dry_run:
        slots = max(1, int((opts.num_cpus or os.cpu_count() or 1) // opts.cpus_per_trial))
        print_dry_run(ablation_trials(opts, variants), opts, slots=slots,
                      warmup_fork=opts.fork_warmup)
        return 0
    return run_study(run_ablation, opts, variants, debug=a.debug, argv=argv,
                     prog=["python", os.path.relpath(__file__)])


if __name__ == "__main__":
    sys.exit(main())
