"""Hyperparameter sweep of CTT on Cityscapes (cityscapes-r101 preset; real data required).

The search space, schedulers and flags are those of ``studies/voc_sweep.py``. The Cityscapes
test labels are not public, so by default the best trial is not re-evaluated on a test split
(``data.test_split=none``); pass ``--set data.test_split=<split file>`` to hold out a split of
your own.

    python studies/cityscapes_sweep.py --data-root /data/cityscapes --split 372 \\
        --gpus-per-trial 1 --num-samples 32 --storage s3://bucket/ctt --address auto
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from studies.voc_sweep import main as sweep_main  # noqa: E402

DEFAULTS: dict = {}  # the preset is the study: cityscapes-r101, no test split


def main(argv: list[str] | None = None) -> int:
    return sweep_main(argv, default_name="cityscapes_sweep", default_preset="cityscapes-r101",
                      description=__doc__.splitlines()[0], defaults=DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
