"""Statistics of a study, all from scipy: mean ± std over seeds; paired comparisons of two
variants over their common seeds (mean difference, its t-based 95 % confidence interval, the
paired t-test, the minimum detectable effect at 80 % power and the seeds needed for a given
effect, both from the noncentral t); Holm's step-down correction over a family of tests; and
Optuna's parameter importances of a sweep.

Every function returns NaN (or None for counts) where a quantity is undefined (fewer than two
pairs, no spread) instead of letting numpy or scipy warn.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.optimize
import scipy.stats

from ctt.tune.layout import OPTUNA_DB

log = logging.getLogger(__name__)

ALPHA = 0.05  # two-sided level of every test, interval (95 %) and power calculation
POWER = 0.80
MAX_SEEDS = 100_000  # seeds_needed gives up (None) beyond this


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


def mean_ci(diffs: Sequence[float], level: float = 1 - ALPHA) -> tuple[float, float]:
    """Two-sided t-based confidence interval of the mean of ``diffs``:
    ``mean ± t_{(1+level)/2, n-1} · sd / sqrt(n)``. Fewer than 2 values: (NaN, NaN); no spread:
    the point ``(mean, mean)``."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size < 2:
        return math.nan, math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return mean, mean
    half = float(scipy.stats.t.ppf((1 + level) / 2, d.size - 1)) * sd / math.sqrt(d.size)
    return mean - half, mean + half


def t_test_power(noncentrality: float, df: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided one-sample (paired) t-test at level ``alpha`` with ``df`` degrees
    of freedom when the test statistic is noncentral t with ``noncentrality`` (= effect ·
    sqrt(n) / sd): P(T > t_crit) + P(T < -t_crit)."""
    crit = float(scipy.stats.t.ppf(1 - alpha / 2, df))
    upper = float(scipy.stats.nct.sf(crit, df, noncentrality))
    # P(T < -c | nc) = P(T > c | -nc): scipy's nct.cdf returns NaN far in the lower tail
    # (e.g. df=1, nc=8), its sf with a negated noncentrality does not.
    lower = float(scipy.stats.nct.sf(crit, df, -noncentrality))
    return upper + (lower if math.isfinite(lower) else 0.0)


def min_detectable_effect(sd: float, n: int, power: float = POWER,
                          alpha: float = ALPHA) -> float:
    """The smallest true mean difference the paired two-sided t-test on ``n`` pairs whose
    differences have standard deviation ``sd`` detects with probability ``power``.

    Solves ``t_test_power(effect · sqrt(n) / sd, n - 1) = power`` for the noncentrality with
    ``scipy.optimize.brentq``. NaN below 2 pairs or for an undefined ``sd``; 0 when ``sd`` is
    0 (any difference is then certain).
    """
    if n < 2 or not math.isfinite(sd) or sd < 0:
        return math.nan
    if sd == 0.0:
        return 0.0
    df = n - 1
    hi = 1.0
    while t_test_power(hi, df, alpha) < power:  # bracket the root: power rises with nc
        hi *= 2.0
    nc = scipy.optimize.brentq(lambda x: t_test_power(x, df, alpha) - power, 0.0, hi,
                               xtol=1e-10)
    return nc * sd / math.sqrt(n)


def seeds_needed(sd: float, effect: float = 1.0, power: float = POWER,
                 alpha: float = ALPHA) -> int | None:
    """The fewest seeds (pairs, at least 2) for which the paired two-sided t-test detects a true
    difference ``effect`` with probability ``power`` when the differences have standard
    deviation ``sd``. None for an undefined ``sd`` or more than ``MAX_SEEDS`` seeds."""
    if not math.isfinite(sd) or sd < 0 or effect <= 0:
        return None

    def enough(n: int) -> bool:
        return sd == 0.0 or t_test_power(effect * math.sqrt(n) / sd, n - 1, alpha) >= power

    if enough(2):
        return 2
    lo, hi = 2, 4  # enough(lo) is False; double hi until enough, then bisect
    while not enough(hi):
        if hi >= MAX_SEEDS:
            return None
        lo, hi = hi, min(2 * hi, MAX_SEEDS)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    With the m finite p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value of
    the i-th is ``max over j <= i of min(1, (m - j + 1) · p_(j))``; rejecting where it is below
    alpha controls the family-wise error rate at alpha. NaN entries (tests that could not be
    run) stay NaN and do not count in m.
    """
    finite = [(p, i) for i, p in enumerate(pvalues) if math.isfinite(p)]
    finite.sort()
    m = len(finite)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def paired_comparison(a: dict[Any, float], b: dict[Any, float], effect: float = 1.0
                      ) -> dict[str, Any]:
    """``a - b`` paired by key (seed) over the keys both have.

    Returns ``n`` (pairs), ``seeds`` (the paired keys, sorted), ``delta`` (mean difference),
    ``sd`` (its standard deviation, ddof=1), ``ci_low``/``ci_high`` (95 % t interval), ``t``,
    ``p`` (two-sided paired t-test), ``mde`` (minimum detectable effect at 80 % power for
    this ``sd`` and ``n``) and ``seeds_for_effect`` (seeds to detect ``effect`` with this
    ``sd``); NaN/None where undefined.
    """
    keys = sorted(set(a) & set(b))
    va = [float(a[k]) for k in keys]
    vb = [float(b[k]) for k in keys]
    delta, t, p = paired_t_test(va, vb)
    diffs = np.subtract(va, vb)
    sd = float(diffs.std(ddof=1)) if len(keys) > 1 else math.nan
    lo, hi = mean_ci(diffs)
    return {"n": len(keys), "seeds": keys, "delta": delta, "sd": sd, "ci_low": lo,
            "ci_high": hi, "t": t, "p": p, "mde": min_detectable_effect(sd, len(keys)),
            "seeds_for_effect": seeds_needed(sd, effect), "effect": effect}


IMPORTANCE_MIN_TRIALS = 2  # Optuna's evaluators return equal shares below this


def optuna_importances(study_dir: str, study: dict) -> dict[str, Any] | None:
    """Optuna's parameter importances of a sweep's ``optuna.db``: ``{"evaluator": class name,
    "n": trials it used (COMPLETE ones), "importances": {param: share} or None}``; None
    without a database. ``importances`` is None below :data:`IMPORTANCE_MIN_TRIALS` finished
    trials, where Optuna only warns and returns equal shares (a table of equal numbers would
    read as a finding).

    Importances are a nicety: a failure is a warning, and the report is written without them.
    """
    path = os.path.join(study_dir, OPTUNA_DB)
    if not os.path.exists(path):
        return None
    try:
        import optuna  # only here: results can be rebuilt without Optuna for an ablation
        from optuna.importance import PedAnovaImportanceEvaluator
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        ostudy = optuna.load_study(study_name=study.get("optuna_study_name"),
                                   storage=f"sqlite:///{os.path.abspath(path)}")
        n = len(ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        evaluator = PedAnovaImportanceEvaluator()  # Optuna's default, named in the report
        out: dict[str, Any] = {"evaluator": type(evaluator).__name__, "n": n,
                               "importances": None}
        if n >= IMPORTANCE_MIN_TRIALS:
            out["importances"] = dict(optuna.importance.get_param_importances(
                ostudy, evaluator=evaluator))
        return out
    except Exception as e:
        log.warning("no Optuna parameter importances from %s: %s", path, e)
        return None
