"""Hyperparameter sweep of CTT on VOC (embedded default: tiny preset, synthetic data, CPU).

Optuna TPE (seeded) samples the CTT search space (``ctt.tune.space.ctt_space``: EMA decay,
contrast temperatures and weights, unsupervised weight, pseudo-label threshold) for one
variant; the scheduler prunes weak trials on their intermediate val mIoU; the best trial is
re-evaluated on the held-out test split.

    python studies/voc_sweep.py --num-samples 16 --scheduler optuna-curve
"""

from __future__ import annotations

import sys

from ctt.interrupts import exit_quietly_while_loading

exit_quietly_while_loading()  # Ray's import takes seconds: Ctrl-C there is one line too

from ctt.tune.cli import Sweep, study_main  # noqa: E402
from ctt.tune.space import ctt_space  # noqa: E402

STUDY = Sweep(name="voc_sweep", script=__file__, doc=__doc__, space=ctt_space)

main = study_main(STUDY)

if __name__ == "__main__":
    sys.exit(main())
