"""Hyperparameter sweep of CTT on Cityscapes (cityscapes-r101 preset; real data required).

The search space, schedulers and flags are those of ``studies/voc_sweep.py``
(``ctt.tune.space.ctt_space``). The Cityscapes test labels are not public, so by default the
best trial is not re-evaluated on a test split (the preset's ``data.test_split=none``); pass
``--set data.test_split=<split file>`` to hold out a split of your own.

    python studies/cityscapes_sweep.py --data-root /data/cityscapes --split 372 \\
        --gpus-per-trial 1 --num-samples 32 --storage s3://bucket/ctt --address auto
"""

from __future__ import annotations

import sys

from ctt.interrupts import exit_quietly_while_loading

exit_quietly_while_loading()  # Ray's import takes seconds: Ctrl-C there is one line too

from ctt.tune.cli import Sweep, study_main  # noqa: E402
from ctt.tune.space import ctt_space  # noqa: E402

# the preset is the study: cityscapes-r101, no test split
STUDY = Sweep(name="cityscapes_sweep", script=__file__, doc=__doc__, space=ctt_space,
              preset="cityscapes-r101")

main = study_main(STUDY)

if __name__ == "__main__":
    sys.exit(main())
