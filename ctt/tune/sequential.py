"""Adaptive seeds: add seeds in rounds only to the variants an open question still needs, and
close each question once it is answered, with the family-wise error rate kept at ``alpha``.

A *question* ``a/b`` asks for the sign or the size of the mean difference ``a - b`` of the
final mIoU, paired by seed (trials of one seed share a warm-up, so the seed effect cancels in
the difference). The design is **repeated confidence intervals** (Jennison & Turnbull, *Group
Sequential Methods with Applications to Clinical Trials*, 2000, ch. 9) with **Bonferroni
spending** over the questions and the looks:

* The plan runs ``initial`` seeds of every variant, then rounds of ``step`` seeds up to
  ``max_seeds``; a look follows the initial seeds and each round, K looks in all, at
  ``n_k`` = ``initial``, ``initial + step``, ..., ``max_seeds`` seeds.
* Look ``k`` gets the share ``w_k`` of the error rate, from the power-family spending function
  ``alpha(t) = alpha · t**rho`` (Kim & DeMets, 1987) over the information fraction
  ``t_k = n_k / max_seeds``: ``w_k = t_k**rho - t_(k-1)**rho`` (``t_(-1) = 0``); the ``w_k``
  sum to 1 over the planned looks.
* At look ``k`` each open question's paired-t interval (``stats.mean_ci``) is taken at the
  two-sided level ``alpha · w_k / m`` (m questions in the family).
* Its verdict: ``resolved+`` / ``resolved-`` when the interval excludes 0 (the sign of
  ``a - b``), else ``within_delta`` when it lies inside ``(-delta, +delta)`` (the difference is
  smaller than the smallest effect of interest), else ``open``. Resolution wins where both
  hold. A question that reaches a verdict keeps it (it is closed).
* The next round runs the union of the variants of the open questions; the study stops when
  no question is open or the last planned look is done.

Why it keeps the error rate: the intervals of all m questions at all K looks miss their true
differences with probabilities that sum to at most ``sum_q sum_k alpha · w_k / m = alpha``
(the union bound), whatever the dependence between questions that share a variant, between
looks that share seeds, and whatever rule picks which variants continue. On the event that
every interval covers, no ``resolved`` verdict has the wrong sign (nor is a zero difference
resolved) and no ``within_delta`` verdict is given to a difference of at least ``delta``; so
both kinds of wrong verdict together happen with probability at most ``alpha``. The price is
conservatism: the union bound ignores the strong correlation between looks, and a look with
few seeds (few degrees of freedom, wide t quantiles) spends its share for little;
``DEFAULT_RHO`` keeps most of the error rate for the late looks (``ctt/tune/seq_sim.py`` and
``benchmarks/sequential_sim.py`` measure what the design costs against a fixed design).

Libraries. Among maintained Python packages, statsmodels (the general one) computes power,
sample sizes and multiple-testing corrections (``statsmodels.stats.multitest.multipletests``
with ``method="holm"`` gives the Holm-adjusted p-values ``stats.holm`` computes; it would be the
choice for Holm if statsmodels were a dependency, which it is not) but no group-sequential
boundaries. spotify-confidence computes group-sequential bounds for its A/B z-tests, and young
0.x packages (gsdesign, earlysign, gsmethods) compute alpha-spending boundaries for normal
statistics; the reference implementations (gsDesign, rpact, ldbounds) are R. Exact
spending boundaries need the joint distribution of the statistics at the looks (Brownian
motion with known variance), which does not hold for a paired t with 1 to 9 degrees of
freedom, several questions sharing variants and variants dropped on the way. The union bound
needs only the marginal t quantiles, from ``scipy.stats.t`` (through ``stats.mean_ci``), and
holds under any dependence, so no boundary package is used.

Everything here is pure: results come in as ``{variant: {seed: value}}``, decisions go out as
frozen dataclasses; no Ray and no I/O, so a caller (a study, a budget check) can ask what the
next round would run without running it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctt.tune.stats import ALPHA, POWER, mean_ci, seeds_needed

# Spending exponent, from the scan in benchmarks/sequential_sim.py (``rho_scan`` in
# benchmarks/results/sequential_sim.json), at the VOC ablation's fitted noise. Power at a true
# difference of delta rises with rho towards the fixed max_seeds design's (rho -> infinity
# spends everything at the last look), so power alone cannot pick rho: a small rho spends on
# the first looks, whose 2-4 degrees of freedom make the intervals too wide for that share to
# buy anything. rho = 10 is the largest efficiency at the worse of delta and 2 delta (trials
# of the fixed design of equal power / the adaptive design's mean trials): it matches the fixed
# design at delta (power 0.86) and still stops early at 2 delta; rho 8-16 are within 2 %.
DEFAULT_RHO = 10.0
DEFAULT_DELTA = 1.0  # smallest difference of interest, mIoU points
DEFAULT_INITIAL = 3
DEFAULT_STEP = 1
DEFAULT_MAX_SEEDS = 10

RESOLVED_POS = "resolved+"  # the interval lies above 0: a > b
RESOLVED_NEG = "resolved-"  # the interval lies below 0: a < b
WITHIN_DELTA = "within_delta"  # the interval lies inside (-delta, +delta)
OPEN = "open"
VERDICTS = (RESOLVED_POS, RESOLVED_NEG, WITHIN_DELTA, OPEN)

SEPARATOR = "/"


@dataclass(frozen=True)
class Question:
    """The paired difference ``a - b`` of two variants (written ``a/b``, e.g. ``ctt/cross``)."""

    a: str
    b: str

    def __post_init__(self) -> None:
        if not self.a or not self.b:
            raise ValueError(f"a question needs two variant names, got {self.a!r}/{self.b!r}")
        if self.a == self.b:
            raise ValueError(f"question {self}: a variant compared with itself")

    @property
    def variants(self) -> tuple[str, str]:
        return self.a, self.b

    def __str__(self) -> str:
        return f"{self.a}{SEPARATOR}{self.b}"


def parse_question(text: str) -> Question:
    """``"ctt/cross"`` -> ``Question("ctt", "cross")`` (the estimate is ctt - cross). Only ``/``
    separates: ``-`` is left free for variant names."""
    parts = [p.strip() for p in text.split(SEPARATOR)]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"question {text!r}: expected 'a{SEPARATOR}b' (estimate a - b)")
    return Question(parts[0], parts[1])


def parse_questions(items: Iterable[str | Question],
                    variants: Collection[str] | None = None) -> tuple[Question, ...]:
    """Questions from text or :class:`Question`, checked as one family: a variant not in
    ``variants`` (when given) and a question asked twice (also as ``b/a``, which would count
    the same difference twice in m) raise ValueError."""
    out: list[Question] = []
    seen: set[frozenset[str]] = set()
    for item in items:
        q = item if isinstance(item, Question) else parse_question(item)
        if variants is not None:
            unknown = [v for v in q.variants if v not in variants]
            if unknown:
                raise ValueError(f"question {q}: unknown variant(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(variants))}")
        key = frozenset(q.variants)
        if key in seen:
            raise ValueError(f"question {q} asked twice (a/b and b/a are one question)")
        seen.add(key)
        out.append(q)
    if not out:
        raise ValueError("no questions")
    return tuple(out)


# The VOC ablation's family: each question isolates one part of CTT.
DEFAULT_QUESTIONS: tuple[Question, ...] = parse_questions((
    "dual_self/mean_teacher",  # a second self-taught pair
    "cross/dual_self",         # cross teaching instead of self teaching
    "cross_hc/cross",          # + high-level contrast
    "cross_lc/cross",          # + low-level contrast
    "ctt/cross",               # + both contrasts
    "ctt/supervised",          # the whole method against labels only
))


def power_spending(fractions: Sequence[float], rho: float) -> np.ndarray:
    """Shares of the error rate per look from ``alpha(t) = alpha · t**rho``: the increments of
    ``t**rho`` over the information fractions ``fractions`` (increasing, the last 1), so they
    sum to 1. Larger ``rho`` keeps more for the late looks."""
    t = np.asarray(fractions, dtype=np.float64)
    if rho <= 0 or not math.isfinite(rho):
        raise ValueError(f"rho must be positive, got {rho}")
    if t.size == 0 or np.any(np.diff(t) <= 0) or t[0] <= 0 or t[-1] != 1.0:
        raise ValueError(f"information fractions must increase to 1, got {list(t)}")
    return np.diff(t ** rho, prepend=0.0)


@dataclass(frozen=True)
class Plan:
    """The planned looks and the error spending of an adaptive study.

    ``alpha`` is the family-wise two-sided error rate over all questions and looks, ``delta``
    the smallest difference of interest (mIoU), ``rho`` the power-spending exponent.
    """

    initial: int = DEFAULT_INITIAL
    step: int = DEFAULT_STEP
    max_seeds: int = DEFAULT_MAX_SEEDS
    rho: float = DEFAULT_RHO
    alpha: float = ALPHA
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        if self.initial < 2:
            raise ValueError(f"initial must be >= 2 seeds (a paired interval needs 2), "
                             f"got {self.initial}")
        if self.step < 1:
            raise ValueError(f"step must be >= 1 seed, got {self.step}")
        if self.max_seeds < self.initial:
            raise ValueError(f"max_seeds {self.max_seeds} < initial {self.initial}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not (self.delta > 0 and math.isfinite(self.delta)):
            raise ValueError(f"delta must be a positive number, got {self.delta}")
        power_spending([1.0], self.rho)  # validates rho

    @property
    def looks(self) -> tuple[int, ...]:
        """Seeds per variant at each planned look: initial, +step, ..., max_seeds (the last
        round is cut short when step does not divide the rest)."""
        ns = list(range(self.initial, self.max_seeds + 1, self.step))
        if ns[-1] != self.max_seeds:
            ns.append(self.max_seeds)
        return tuple(ns)

    @property
    def weights(self) -> np.ndarray:
        """Each look's share of ``alpha`` (sums to 1)."""
        return power_spending([n / self.max_seeds for n in self.looks], self.rho)

    def levels(self, m: int) -> np.ndarray:
        """Two-sided per-question error level of each look's interval: ``alpha · w_k / m``;
        over all m questions and K looks they sum to ``alpha``."""
        if m < 1:
            raise ValueError(f"a family needs at least one question, got m={m}")
        return self.alpha * self.weights / m


def verdict(ci_low: float, ci_high: float, delta: float) -> str:
    """The verdict an interval gives: resolved (excludes 0, by sign) before ``within_delta``
    (inside ``(-delta, +delta)``); ``open`` otherwise and for an undefined interval."""
    if not (delta > 0):
        raise ValueError(f"delta must be positive, got {delta}")
    if math.isnan(ci_low) or math.isnan(ci_high):
        return OPEN
    if ci_low > 0:
        return RESOLVED_POS
    if ci_high < 0:
        return RESOLVED_NEG
    if -delta < ci_low and ci_high < delta:
        return WITHIN_DELTA
    return OPEN


@dataclass(frozen=True)
class QuestionResult:
    """One question at one look: ``n`` pairs, the mean difference ``estimate`` (a - b) and its
    ``sd``, the interval at the look's per-question ``level`` and the verdict. A closed
    question's result is the one of the look that closed it (``look``)."""

    question: Question
    look: int
    n: int
    estimate: float
    sd: float
    level: float
    ci_low: float
    ci_high: float
    verdict: str

    @property
    def closed(self) -> bool:
        return self.verdict != OPEN


@dataclass(frozen=True)
class Assessment:
    """All questions after look ``look`` (index into ``Plan.looks``): their results, the
    variants the next round would run (none once ``done``) and why the study stops."""

    look: int
    results: tuple[QuestionResult, ...]
    next_variants: tuple[str, ...]
    done: bool
    reason: str = ""  # "answered" (no question open) | "max_seeds" | "" (going on)
    open: tuple[Question, ...] = field(default=())


def _paired(data: Mapping[str, Mapping[Any, float]], q: Question,
            seeds: Collection[Any] | None) -> tuple[list[Any], np.ndarray]:
    a, b = data.get(q.a, {}), data.get(q.b, {})
    keys = sorted(set(a) & set(b) & (set(seeds) if seeds is not None else set(a)))
    return keys, np.array([float(a[k]) - float(b[k]) for k in keys], dtype=np.float64)


def assess(data: Mapping[str, Mapping[Any, float]], questions: Sequence[Question], plan: Plan,
           look: int, previous: Mapping[Question, QuestionResult] | None = None,
           seeds: Collection[Any] | None = None) -> Assessment:
    """The verdicts after look ``look`` from the results ``data`` (``{variant: {seed: value}}``;
    only ``seeds`` when given, the seeds this look may use). A question naming a variant that
    ``data`` lacks raises ValueError (a variant whose trials all failed is ``{}``, not absent).

    Questions closed in ``previous`` keep their result; the others get this look's interval
    at ``plan.levels(m)[look]``, whatever number of pairs they have (a failed trial leaves one
    fewer; the level belongs to the look, not to the count). Fewer than 2 pairs: open.
    """
    questions = parse_questions(questions, variants=data.keys())
    levels = plan.levels(len(questions))
    if not 0 <= look < len(levels):
        raise ValueError(f"look {look} outside the plan's {len(levels)} looks")
    previous = previous or {}
    results: list[QuestionResult] = []
    for q in questions:
        before = previous.get(q)
        if before is not None and before.closed:
            results.append(before)
            continue
        keys, d = _paired(data, q, seeds)
        n = len(keys)
        est = float(d.mean()) if n else math.nan
        sd = float(d.std(ddof=1)) if n > 1 else math.nan
        level = float(levels[look])
        if level > 0:
            lo, hi = mean_ci(d, level=1.0 - level)
        else:  # a look given no error rate decides nothing
            lo, hi = (-math.inf, math.inf) if n > 1 else (math.nan, math.nan)
        results.append(QuestionResult(q, look, n, est, sd, level, lo, hi,
                                      verdict(lo, hi, plan.delta)))
    still_open = tuple(r.question for r in results if not r.closed)
    last = look == len(levels) - 1
    done = not still_open or last
    reason = "answered" if not still_open else ("max_seeds" if last else "")
    nxt: tuple[str, ...] = ()
    if not done:
        order = dict.fromkeys(v for q in still_open for v in q.variants)
        nxt = tuple(order)
    return Assessment(look, tuple(results), nxt, done, reason, still_open)


def replay(data: Mapping[str, Mapping[Any, float]], questions: Sequence[Question], plan: Plan,
           seed_order: Sequence[Any] | None = None) -> list[Assessment]:
    """Every look the results ``data`` reach, in order: look ``k`` uses the first
    ``plan.looks[k]`` seeds of ``seed_order`` (default: all seeds in ``data``, sorted).

    Replaying from the results alone keeps a study stateless: after each round it replays and
    reads the last assessment's ``next_variants``. Seeds past the last complete look are left
    for the next one; more seeds than ``plan.max_seeds`` raise ValueError. No complete look
    yet (fewer seeds than ``plan.initial``): an empty list.
    """
    order = list(seed_order) if seed_order is not None else sorted(
        {s for per in data.values() for s in per})
    if len(order) > plan.max_seeds:
        raise ValueError(f"{len(order)} seeds but the plan stops at {plan.max_seeds}")
    out: list[Assessment] = []
    state: dict[Question, QuestionResult] = {}
    for k, n in enumerate(plan.looks):
        if n > len(order):
            break
        a = assess(data, questions, plan, k, state, seeds=order[:n])
        out.append(a)
        state = {r.question: r for r in a.results}
        if a.done:
            break
    return out


@dataclass(frozen=True)
class FixedNeed:
    """Seeds per variant a fixed (one-look) design would need for a question left open, at the
    design's per-question level ``alpha / m`` and ``power``: to detect ``delta``
    (``seeds_for_delta``) and to resolve the current estimate if it is the truth
    (``seeds_for_estimate``); None where ``stats.seeds_needed`` gives none (undefined sd, an
    estimate of 0)."""

    question: Question
    sd: float
    alpha: float
    power: float
    seeds_for_delta: int | None
    seeds_for_estimate: int | None


def fixed_need(result: QuestionResult, plan: Plan, m: int, power: float = POWER) -> FixedNeed:
    """What a fixed design would need for ``result``'s question, from its observed ``sd``
    (:func:`ctt.tune.stats.seeds_needed` at the Bonferroni level ``plan.alpha / m``)."""
    if m < 1:
        raise ValueError(f"a family needs at least one question, got m={m}")
    level = plan.alpha / m
    est = abs(result.estimate)
    return FixedNeed(
        result.question, result.sd, level, power,
        seeds_needed(result.sd, plan.delta, power=power, alpha=level),
        seeds_needed(result.sd, est, power=power, alpha=level) if math.isfinite(est) else None)
