"""The paper's ablation table: supervised / mean teacher / dual self / cross teacher /
+ high-level contrast / + low-level contrast / full CTT, over several seeds (paired design).

    python studies/voc_ablation.py                          # embedded default: CPU, synthetic
    python studies/voc_ablation.py --preset voc-r101 --data-root /data/VOC2012 \\
        --split 1464 --gpus-per-trial 1 --storage s3://bucket/ctt --address auto
"""

from __future__ import annotations

import sys

from ctt.interrupts import exit_quietly_while_loading

exit_quietly_while_loading()  # Ray's import takes seconds: Ctrl-C there is one line too

from ctt.tune.cli import Ablation, study_main  # noqa: E402
from ctt.tune.sequential import DEFAULT_QUESTIONS  # noqa: E402

STUDY = Ablation(
    name="voc_ablation", script=__file__, doc=__doc__,
    variants=("supervised", "mean_teacher", "dual_self", "cross", "cross_hc", "cross_lc", "ctt"),
    # each row of the paper's table against the row it extends, and the whole method
    questions=tuple(str(q) for q in DEFAULT_QUESTIONS),
)

main = study_main(STUDY)

if __name__ == "__main__":
    sys.exit(main())
