"""The metric names of a run, in report order (docs/method.md#metric-names).

The same names are keys of ``train_step``'s dict, ``metrics.jsonl`` records, ``tune.report``
results, ``metrics.parquet`` columns and TensorBoard tags. Wall-clock values are under ``time/``
and are not listed: they follow the listed names, sorted, like any other extra key.
"""

from __future__ import annotations

# What train_step computes for each student and averages over the students (anchor counts are
# summed): the loss terms, the mean pseudo-label weight and the contrastive anchor counts.
STEP_TERMS: tuple[str, ...] = (
    "loss/total",
    "loss/sup",
    "loss/unsup",
    "loss/hc",
    "loss/lc",
    "pl/weight",
    "n/anchors_hc",
    "n/anchors_lc",
)

# Every metric of a run of up to two pairs, in the order tables and reports show them:
# evaluation (miou = mean over the students), the step terms, then the memory-bank state.
METRIC_NAMES: tuple[str, ...] = (
    "miou",
    "miou/student0",
    "miou/student1",
    "miou/teacher0",
    "miou/teacher1",
    *STEP_TERMS,
    "bank/fill",
    "contrast_on",
)
