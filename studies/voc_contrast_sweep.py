"""Sweep of CTT's contrast temperatures and loss weights on VOC, the EMA decay fixed.

The space is ``ctt.tune.space.contrast_space``: ``ctt_space`` less the EMA decay (the
preset's value, 0.99). No sampled parameter acts during the supervised warm-up, so the
trials fork one shared warm-up instead of each training its own (``--no-fork`` turns that
off); flags and outputs are those of ``studies/voc_sweep.py``.

    python studies/voc_contrast_sweep.py --num-samples 16
"""

from __future__ import annotations

import sys

from ctt.interrupts import exit_quietly_while_loading

exit_quietly_while_loading()  # Ray's import takes seconds: Ctrl-C there is one line too

from ctt.tune.cli import Sweep, study_main  # noqa: E402
from ctt.tune.space import contrast_space  # noqa: E402

STUDY = Sweep(name="voc_contrast_sweep", script=__file__, doc=__doc__, space=contrast_space)

main = study_main(STUDY)

if __name__ == "__main__":
    sys.exit(main())
