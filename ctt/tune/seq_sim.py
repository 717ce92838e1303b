"""Noise model and Monte-Carlo simulation of the adaptive-seeds design (``ctt.tune.sequential``).

The model is the two-way additive one a seed-paired ablation implies:
``value[v, s] = mu_v + b_s + e_vs`` with a seed effect ``b_s ~ N(0, sigma_b²)`` shared by all
variants of a seed (the shared warm-up, the data order) and a residual ``e_vs ~ N(0,
sigma_e²)``. :func:`fit_noise` fits it to a complete variants × seeds table by the ANOVA of a
two-way layout without replication (mean squares of seeds and residual; statsmodels' ``anova_lm``
would give the same table but is not a dependency, and the sums of squares are three lines of
numpy). The seed effect cancels in every paired difference, whose standard deviation is
``sqrt(2) · sigma_e``; it still matters for what unpaired summaries show.

:func:`simulate` runs whole adaptive studies at once, vectorised over studies with numpy: all
``max_seeds`` seeds of every variant are drawn up front (a numpy Generator: the same seed gives
the same numbers), and look k reads the first ``n_k`` of them. That is exact for the design,
since an open question's two variants have run every round so far; a closed question's later
values are never read, and the seeds a variant *runs* are counted from the rounds it was in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.optimize
import scipy.stats

from ctt.tune.sequential import Plan, Question, parse_questions
from ctt.tune.stats import seeds_needed, t_test_power

# verdict codes of the simulation (sequential.VERDICTS as numbers)
OPEN_CODE, POS_CODE, NEG_CODE, WITHIN_CODE = 0, 1, -1, 2


@dataclass(frozen=True)
class NoiseModel:
    """The fitted two-way model: variant means, seed effects, ``sigma_b`` (seed), ``sigma_e``
    (residual) with their degrees of freedom, on ``n_variants`` × ``n_seeds`` values."""

    means: dict[str, float]
    seed_effects: dict[Any, float]
    sigma_b: float
    sigma_e: float
    df_seed: int
    df_resid: int
    n_variants: int
    n_seeds: int

    @property
    def diff_sd(self) -> float:
        """Standard deviation of a paired difference of two variants: ``sqrt(2) · sigma_e``."""
        return math.sqrt(2.0) * self.sigma_e


def fit_noise(data: Mapping[str, Mapping[Any, float]]) -> NoiseModel:
    """Fit ``value = mu_v + b_s + e`` by the two-way ANOVA without replication on the seeds every
    variant has. ``sigma_e² = MS_resid``; ``sigma_b² = max(0, (MS_seed - MS_resid) / V)`` (the
    method-of-moments estimate, as ``E[MS_seed] = sigma_e² + V sigma_b²``). Needs 2 variants and
    2 common seeds."""
    variants = list(data)
    seeds = sorted(set.intersection(*(set(data[v]) for v in variants))) if variants else []
    if len(variants) < 2 or len(seeds) < 2:
        raise ValueError(f"need >= 2 variants with >= 2 common seeds, got {len(variants)} "
                         f"variants and {len(seeds)} common seeds")
    y = np.array([[float(data[v][s]) for s in seeds] for v in variants], dtype=np.float64)
    nv, ns = y.shape
    grand = y.mean()
    row = y.mean(axis=1) - grand
    col = y.mean(axis=0) - grand
    resid = y - grand - row[:, None] - col[None, :]
    df_seed, df_resid = ns - 1, (nv - 1) * (ns - 1)
    ms_resid = float((resid ** 2).sum()) / df_resid
    ms_seed = nv * float((col ** 2).sum()) / df_seed
    return NoiseModel(
        means={v: float(grand + r) for v, r in zip(variants, row)},
        seed_effects={s: float(c) for s, c in zip(seeds, col)},
        sigma_b=math.sqrt(max(0.0, (ms_seed - ms_resid) / nv)), sigma_e=math.sqrt(ms_resid),
        df_seed=df_seed, df_resid=df_resid, n_variants=nv, n_seeds=ns)


def effect_means(questions: Sequence[Question], effect: float) -> dict[str, float]:
    """Variant means under which every question ``a/b`` has the true difference ``effect``
    (``mu_a = mu_b + effect``), the first variant met at 0 in each connected group. Raises
    ValueError when the family's questions form a cycle that makes this impossible."""
    questions = parse_questions(questions)
    # each question is an edge a -> b with mu_a - mu_b = effect; walk each connected group
    edges: dict[str, list[tuple[str, float]]] = {}
    for q in questions:
        edges.setdefault(q.a, []).append((q.b, -effect))
        edges.setdefault(q.b, []).append((q.a, effect))
    means: dict[str, float] = {}
    for start in edges:
        if start in means:
            continue
        means[start] = 0.0
        stack = [start]
        while stack:
            v = stack.pop()
            for w, step in edges[v]:
                if w not in means:
                    means[w] = means[v] + step
                    stack.append(w)
                elif not math.isclose(means[w], means[v] + step, abs_tol=1e-9):
                    raise ValueError(f"no means give every question the difference {effect}: "
                                     f"the questions between {v} and {w} form a cycle")
    return means


@dataclass(frozen=True)
class SimResult:
    """Simulated adaptive studies: per study and question the final verdict code and the look
    that closed it (-1: open at the end), per study and variant the seeds it ran, and the
    questions, variants and true differences behind them."""

    questions: tuple[Question, ...]
    variants: tuple[str, ...]
    true_diff: np.ndarray   # (Q,)
    verdicts: np.ndarray    # (R, Q) codes
    closed_at: np.ndarray   # (R, Q)
    seeds: np.ndarray       # (R, V)

    @property
    def n_studies(self) -> int:
        return int(self.verdicts.shape[0])

    @property
    def trials(self) -> np.ndarray:
        return self.seeds.sum(axis=1)


def simulate(questions: Sequence[Question], plan: Plan, means: Mapping[str, float],
             sigma_e: float, sigma_b: float, n_studies: int, rng: np.random.Generator,
             levels: Sequence[float] | None = None) -> SimResult:
    """``n_studies`` adaptive studies of ``questions`` under ``plan`` with true variant
    ``means`` and the two-way noise (``sigma_b``, ``sigma_e``).

    ``levels`` (per-question two-sided level of each look) replaces ``plan.levels(m)``: a test
    passes ``[alpha] * K`` to simulate the naive design that re-tests unadjusted at each look.
    """
    questions = parse_questions(questions)
    variants = tuple(dict.fromkeys(v for q in questions for v in q.variants))
    vi = {v: i for i, v in enumerate(variants)}
    ia = np.array([vi[q.a] for q in questions])
    ib = np.array([vi[q.b] for q in questions])
    looks = np.array(plan.looks)
    lv = np.asarray(plan.levels(len(questions)) if levels is None else levels, dtype=np.float64)
    if lv.shape != looks.shape:
        raise ValueError(f"{lv.size} levels for {looks.size} looks")
    mu = np.array([float(means[v]) for v in variants])
    r, nv, nq, s = n_studies, len(variants), len(questions), plan.max_seeds

    seed_eff = sigma_b * rng.standard_normal((r, 1, s))
    values = mu[None, :, None] + seed_eff + sigma_e * rng.standard_normal((r, nv, s))
    diffs = values[:, ia, :] - values[:, ib, :]  # (R, Q, S); the seed effect cancels

    final = np.full((r, nq), OPEN_CODE, dtype=np.int8)
    closed_at = np.full((r, nq), -1, dtype=np.int16)
    member = np.zeros((nq, nv), dtype=bool)
    member[np.arange(nq), ia] = True
    member[np.arange(nq), ib] = True
    seeds = np.full((r, nv), looks[0], dtype=np.int64)
    for k, n in enumerate(looks):
        d = diffs[:, :, :n]
        mean = d.mean(axis=2)
        sd = d.std(axis=2, ddof=1)
        crit = float(scipy.stats.t.ppf(1.0 - lv[k] / 2.0, n - 1)) if lv[k] > 0 else math.inf
        with np.errstate(invalid="ignore"):  # inf * 0 only for a zero-spread draw
            half = crit * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
        code = np.full((r, nq), OPEN_CODE, dtype=np.int8)
        code[(-plan.delta < lo) & (hi < plan.delta)] = WITHIN_CODE
        code[hi < 0] = NEG_CODE
        code[lo > 0] = POS_CODE
        newly = (final == OPEN_CODE) & (code != OPEN_CODE)
        final[newly] = code[newly]
        closed_at[newly] = k
        if k + 1 < len(looks):  # the next round: the variants of the open questions
            still = final == OPEN_CODE
            active = (still[:, :, None] & member[None, :, :]).any(axis=1)  # (R, V)
            seeds += active * int(looks[k + 1] - n)
    true = mu[ia] - mu[ib]
    return SimResult(questions, variants, true, final, closed_at, seeds)


def _rate(x: np.ndarray) -> dict[str, float]:
    p = float(x.mean())
    return {"rate": p, "se": math.sqrt(p * (1 - p) / x.size)}


def summarize(res: SimResult, delta: float) -> dict[str, Any]:
    """Rates over the simulated studies, each with its Monte-Carlo standard error:
    ``false_resolution`` (a question with true difference 0 resolved ±, or one resolved with
    the wrong sign: the family-wise rate), ``wrong_verdict`` (that, or ``within_delta`` for a
    true difference of at least ``delta``), per-question ``power`` (resolved with the right
    sign; questions with a nonzero true difference), ``within_delta``, ``open``, ``all_resolved``
    (every question with a nonzero difference resolved right), mean seeds per variant and mean
    trials per study."""
    v, t = res.verdicts, res.true_diff[None, :]
    sign = np.sign(res.true_diff)[None, :]
    resolved = (v == POS_CODE) | (v == NEG_CODE)
    false_res = (resolved & ((t == 0) | (np.sign(v) != sign))).any(axis=1)
    false_within = ((v == WITHIN_CODE) & (np.abs(t) >= delta)).any(axis=1)
    out: dict[str, Any] = {
        "n_studies": res.n_studies,
        "false_resolution": _rate(false_res),
        "wrong_verdict": _rate(false_res | false_within),
        "within_delta": _rate((v == WITHIN_CODE).mean(axis=1)),
        "open": _rate((v == OPEN_CODE).mean(axis=1)),
    }
    nz = res.true_diff != 0
    if nz.any():
        right = resolved[:, nz] & (v[:, nz] == sign[:, nz])
        per_study = right.mean(axis=1)
        out["power"] = {"rate": float(per_study.mean()),
                        "se": float(per_study.std(ddof=1) / math.sqrt(per_study.size))}
        out["all_resolved"] = _rate(right.all(axis=1))
    seeds_mean = res.seeds.mean(axis=1)
    trials = res.trials.astype(np.float64)
    out["seeds_per_variant"] = {"mean": float(seeds_mean.mean()),
                                "se": float(seeds_mean.std(ddof=1) / math.sqrt(seeds_mean.size)),
                                "by_variant": dict(zip(res.variants,
                                                       map(float, res.seeds.mean(axis=0))))}
    out["trials"] = {"mean": float(trials.mean()),
                     "se": float(trials.std(ddof=1) / math.sqrt(trials.size)),
                     "min": int(trials.min()), "max": int(trials.max())}
    return out


def fixed_seeds_real(diff_sd: float, effect: float, power: float, alpha: float) -> float:
    """The real-valued number of seeds at which the fixed paired t-test at level ``alpha`` has
    exactly ``power`` (the noncentral-t power with ``n - 1`` degrees of freedom, smooth in n):
    what :func:`ctt.tune.stats.seeds_needed` rounds up, for comparing designs without the steps
    of whole seeds. NaN where no n up to 10,000 reaches ``power``."""
    if not (diff_sd > 0 and effect > 0 and 0 < power < 1):
        return math.nan

    def gap(n: float) -> float:
        return t_test_power(effect * math.sqrt(n) / diff_sd, n - 1, alpha) - power

    if gap(2.0) >= 0:
        return 2.0
    if gap(10_000.0) < 0:
        return math.nan
    return float(scipy.optimize.brentq(gap, 2.0, 10_000.0, xtol=1e-6))


def fixed_design(diff_sd: float, effect: float, power: float, alpha: float, m: int,
                 n_variants: int, n_seeds: int | None = None) -> dict[str, Any]:
    """The fixed design (every variant on n seeds, one look, Bonferroni ``alpha / m`` per
    question) of equal ``power``: seeds per variant from :func:`ctt.tune.stats.seeds_needed`
    and its trials, and the real-valued seeds and trials of :func:`fixed_seeds_real`; with
    ``n_seeds`` also the power such a design has on that many seeds. Pass a simulated power
    of 1 capped below 1 (e.g. ``1 - 3 / n_studies``): no finite design has power 1."""
    level = alpha / m
    n = seeds_needed(diff_sd, effect, power=power, alpha=level) if 0 < power < 1 else None
    real = fixed_seeds_real(diff_sd, effect, power, level)
    out: dict[str, Any] = {"alpha_per_question": level, "power": power, "seeds": n,
                           "trials": None if n is None else n * n_variants,
                           "seeds_real": real, "trials_real": real * n_variants}
    if n_seeds is not None and n_seeds >= 2 and diff_sd > 0:
        out["power_at"] = {"seeds": n_seeds, "trials": n_seeds * n_variants,
                           "power": t_test_power(effect * math.sqrt(n_seeds) / diff_sd,
                                                 n_seeds - 1, level)}
    return out
