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
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ctt.config import CTTConfig  # noqa: E402
from studies.voc_sweep import main as sweep_main  # noqa: E402

REQUIRED_DIRS = ("leftImg8bit", "gtFine")
DEFAULTS = {"data.test_split": "none"}


def check_data(cfg: CTTConfig) -> str | None:
    """None if ``cfg`` reads no Cityscapes data or its root looks like a Cityscapes root, else
    what is wrong and what to pass."""
    if cfg.data.dataset != "cityscapes":
        return None
    root = cfg.data.root
    if root == "none":
        return ("--data-root is required: the cityscapes-r101 preset reads the real Cityscapes "
                "data (a directory holding leftImg8bit/ and gtFine/), e.g. "
                "--data-root /data/cityscapes")
    missing = [d for d in REQUIRED_DIRS if not (Path(root) / d).is_dir()]
    if missing:
        return (f"--data-root {root}: missing {', '.join(f'{d}/' for d in missing)}; pass the "
                "directory holding leftImg8bit/ and gtFine/ (as downloaded from "
                "cityscapes-dataset.com)")
    return None


def main(argv: list[str] | None = None) -> int:
    return sweep_main(argv, default_name="cityscapes_sweep", default_preset="cityscapes-r101",
                      description=__doc__.splitlines()[0], defaults=DEFAULTS,
                      check_data=check_data)


if __name__ == "__main__":
    sys.exit(main())
