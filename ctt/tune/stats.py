"""Statistics of a study: mean ± std over seeds, the paired t-test of a variant against the
baseline (scipy), and Optuna's parameter importances of a sweep."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import scipy.stats

from ctt.tune.layout import OPTUNA_DB

log = logging.getLogger(__name__)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); NaN where undefined (no value / one)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return float(arr.mean()), std


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Paired two-sided t-test of ``a - b``: returns ``(mean_diff, t, p)``.

    ``scipy.stats.ttest_rel(a, b)`` where it is defined. Fewer than 2 pairs: t = p = NaN.
    Identical differences (zero spread, where scipy warns and gives NaN): t = ±inf, p = 0 when
    the mean differs from 0; t = NaN, p = 1 when every difference is 0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_t_test: {len(a)} values in a but {len(b)} in b")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = d.size
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    if float(d.std(ddof=1)) == 0.0:
        return (mean, math.nan, 1.0) if mean == 0.0 else (mean, math.copysign(math.inf, mean), 0.0)
    res = scipy.stats.ttest_rel(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return mean, float(res.statistic), float(res.pvalue)


def optuna_importances(study_dir: str, study: dict) -> dict[str, float] | None:
    """Optuna's (fANOVA) parameter importances of a sweep's ``optuna.db``; None without one.

    Importances are a nicety: a failure is a warning, and the report is written without them.
    """
    path = os.path.join(study_dir, OPTUNA_DB)
    if not os.path.exists(path):
        return None
    try:
        import optuna  # only here: results can be rebuilt without Optuna for an ablation

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        ostudy = optuna.load_study(study_name=study.get("optuna_study_name"),
                                   storage=f"sqlite:///{os.path.abspath(path)}")
        return dict(optuna.importance.get_param_importances(ostudy))
    except Exception as e:
        log.warning("no Optuna parameter importances from %s: %s", path, e)
        return None
