"""Adaptive seeds (ctt.tune.sequential, ctt.tune.seq_sim): the repeated intervals and verdicts
against a slow reference written out here, the plan's spending, the next round, the noise fit,
and by simulation that the family-wise rate of false resolutions stays at alpha while a naive
design that re-tests unadjusted at every look does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from ctt.tune import seq_sim
from ctt.tune.sequential import (
    DEFAULT_QUESTIONS,
    OPEN,
    RESOLVED_NEG,
    RESOLVED_POS,
    WITHIN_DELTA,
    Plan,
    Question,
    assess,
    fixed_need,
    parse_question,
    parse_questions,
    power_spending,
    replay,
    verdict,
)
from ctt.tune.stats import seeds_needed

VARIANTS = ("mean_teacher", "dual_self", "cross", "cross_hc", "cross_lc", "ctt", "supervised")


# --- a slow, obviously correct reference ------------------------------------------------------

def ref_levels(plan: Plan, m: int) -> list[float]:
    looks = []
    n = plan.initial
    while n < plan.max_seeds:
        looks.append(n)
        n += plan.step
    looks.append(plan.max_seeds)
    out, spent = [], 0.0
    for n in looks:
        cum = plan.alpha * (n / plan.max_seeds) ** plan.rho
        out.append((cum - spent) / m)
        spent = cum
    return out


def ref_interval(a: list[float], b: list[float], level: float) -> tuple[float, float]:
    """mean ± t quantile · sd / sqrt(n), by hand; the t statistic cross-checked with scipy."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    t_stat = scipy.stats.ttest_rel(a, b).statistic
    assert t_stat == pytest.approx(mean / se, rel=1e-9)
    q = scipy.stats.t.ppf(1 - level / 2, n - 1)
    # the same decision from the p-value: the interval excludes 0 iff p < level
    p = 2 * scipy.stats.t.sf(abs(mean / se), n - 1)
    assert (abs(mean) > q * se) == (p < level)
    return mean - q * se, mean + q * se


def ref_verdict(lo: float, hi: float, delta: float) -> str:
    if lo > 0:
        return RESOLVED_POS
    if hi < 0:
        return RESOLVED_NEG
    if lo > -delta and hi < delta:
        return WITHIN_DELTA
    return OPEN


def ref_study(data: dict, questions: list[Question], plan: Plan) -> dict[Question, tuple]:
    """Look by look over the first n_k seeds: (verdict, look, lo, hi) of each question."""
    levels = ref_levels(plan, len(questions))
    seeds = sorted({s for per in data.values() for s in per})
    state: dict[Question, tuple] = {}
    n = plan.initial
    for k, level in enumerate(levels):
        n = min(plan.initial + k * plan.step, plan.max_seeds)
        if n > len(seeds):
            break
        use = seeds[:n]
        for q in questions:
            if q in state and state[q][0] != OPEN:
                continue
            common = [s for s in use if s in data[q.a] and s in data[q.b]]
            if len(common) < 2:
                state[q] = (OPEN, k, math.nan, math.nan)
                continue
            lo, hi = ref_interval([data[q.a][s] for s in common],
                                  [data[q.b][s] for s in common], level)
            state[q] = (ref_verdict(lo, hi, plan.delta), k, lo, hi)
        if all(v[0] != OPEN for v in state.values()):
            break
    return state


def fake_study(rng: np.random.Generator, effect: float, n_seeds: int) -> dict:
    means = seq_sim.effect_means(DEFAULT_QUESTIONS, effect)
    b = rng.normal(0, 0.7, n_seeds)
    return {v: {s: means[v] + b[s] + rng.normal(0, 0.45) for s in range(n_seeds)}
            for v in VARIANTS}


# --- intervals, verdicts, plan ----------------------------------------------------------------

@pytest.mark.parametrize("rho", [1.0, 3.0, 10.0])
def test_replay_matches_reference(rho: float) -> None:
    rng = np.random.default_rng(7)
    plan = Plan(rho=rho)
    # the first question reversed, so that resolved- verdicts are checked too
    questions = [Question("mean_teacher", "dual_self"), *DEFAULT_QUESTIONS[1:]]
    for effect in (0.0, 1.0, 2.5, 6.0):
        for _ in range(3):
            data = fake_study(rng, effect, plan.max_seeds)
            looks = replay(data, questions, plan)
            ref = ref_study(data, questions, plan)
            final = {r.question: r for r in looks[-1].results}
            for q in questions:
                v, k, lo, hi = ref[q]
                r = final[q]
                assert (r.verdict, r.look) == (v, k), (q, effect)
                assert (r.ci_low, r.ci_high) == pytest.approx((lo, hi), rel=1e-9)


def test_levels_and_weights_sum_to_alpha() -> None:
    for plan in (Plan(), Plan(initial=2, step=3, max_seeds=12, rho=0.5, alpha=0.1),
                 Plan(initial=5, max_seeds=5)):
        assert sum(plan.weights) == pytest.approx(1.0, abs=1e-12)
        assert (plan.weights >= 0).all()
        assert plan.levels(6).sum() * 6 == pytest.approx(plan.alpha, abs=1e-12)
        assert plan.levels(6).tolist() == pytest.approx(ref_levels(plan, 6), rel=1e-12)
        assert plan.looks[-1] == plan.max_seeds
    assert Plan(initial=2, step=3, max_seeds=12).looks == (2, 5, 8, 11, 12)
    assert Plan().looks == (3, 4, 5, 6, 7, 8, 9, 10)
    with pytest.raises(ValueError):
        power_spending([0.5, 0.4, 1.0], 1.0)


@pytest.mark.parametrize("kwargs", [{"delta": 0.0}, {"delta": -1.0}, {"delta": math.nan},
                                    {"initial": 1}, {"step": 0}, {"max_seeds": 2},
                                    {"rho": 0.0}, {"alpha": 0.0}, {"alpha": 1.0}])
def test_bad_plans_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Plan(**kwargs)


def test_verdict_rules() -> None:
    assert verdict(0.1, 3.0, 1.0) == RESOLVED_POS
    assert verdict(-3.0, -0.1, 1.0) == RESOLVED_NEG
    assert verdict(0.2, 0.5, 1.0) == RESOLVED_POS  # resolution wins over within_delta
    assert verdict(-0.9, 0.9, 1.0) == WITHIN_DELTA
    assert verdict(-1.0, 0.5, 1.0) == OPEN  # the open bound: -delta itself is not inside
    assert verdict(math.nan, math.nan, 1.0) == OPEN
    with pytest.raises(ValueError):
        verdict(-0.5, 0.5, 0.0)


def test_questions_parse_and_validate() -> None:
    assert parse_question("ctt/cross") == Question("ctt", "cross")
    assert parse_question(" ctt / cross ") == Question("ctt", "cross")
    for bad in ("ctt", "ctt-cross", "a/b/c", "/cross", "ctt/ctt"):
        with pytest.raises(ValueError):
            parse_question(bad)
    with pytest.raises(ValueError, match="unknown"):
        parse_questions(["ctt/crosss"], variants=VARIANTS)
    with pytest.raises(ValueError, match="twice"):
        parse_questions(["ctt/cross", "cross/ctt"])
    with pytest.raises(ValueError, match="twice"):
        parse_questions(["ctt/cross", Question("ctt", "cross")])
    with pytest.raises(ValueError):
        parse_questions([])
    data = fake_study(np.random.default_rng(0), 0.0, 3)
    with pytest.raises(ValueError, match="unknown"):
        assess(data, [Question("ctt", "nope")], Plan(), 0)


def test_default_questions_name_real_variants() -> None:
    from ctt.config import VARIANTS as CONFIG_VARIANTS

    parse_questions(DEFAULT_QUESTIONS, variants=CONFIG_VARIANTS)
    assert set(VARIANTS) == set(CONFIG_VARIANTS)


def test_edge_cases_few_pairs_and_zero_spread() -> None:
    plan = Plan(initial=2, max_seeds=4)
    q = [Question("a", "b"), Question("c", "b"), Question("d", "b")]
    data = {"a": {0: 5.0}, "b": {0: 1.0, 1: 1.0}, "c": {0: 2.0, 1: 2.0},
            "d": {0: 1.0, 1: 1.0}}
    res = {r.question: r for r in assess(data, q, plan, 0).results}
    assert res[q[0]].n == 1 and res[q[0]].verdict == OPEN  # one pair: no interval
    assert res[q[1]].verdict == RESOLVED_POS  # identical differences of +1: a point interval
    assert (res[q[1]].ci_low, res[q[1]].ci_high) == (1.0, 1.0)
    assert res[q[2]].verdict == WITHIN_DELTA  # identical results: the difference is 0
    empty = assess({"a": {}, "b": {}}, [Question("a", "b")], plan, 0)
    assert empty.results[0].verdict == OPEN and math.isnan(empty.results[0].estimate)


def test_next_round_and_stopping() -> None:
    plan = Plan(initial=3, max_seeds=5)
    q = parse_questions(["a/b", "c/b", "d/e"])
    data = {"a": {0: 9.0, 1: 9.2, 2: 8.9}, "b": {0: 1.0, 1: 1.1, 2: 0.8},
            "c": {0: 1.0, 1: 3.0, 2: 0.0}, "d": {0: 0.0, 1: 4.0, 2: 1.0},
            "e": {0: 1.0, 1: 1.0, 2: 1.0}}
    first = assess(data, q, plan, 0, seeds=[0, 1, 2])
    verdicts = [r.verdict for r in first.results]
    assert verdicts == [RESOLVED_POS, OPEN, OPEN]
    assert first.next_variants == ("c", "b", "d", "e")  # a's question is closed
    assert not first.done and first.open == (q[1], q[2])
    # a closed verdict is kept, whatever later data say
    data2 = {**data, "a": {**data["a"], 3: -50.0}, "b": {**data["b"], 3: 1.0},
             "c": {**data["c"], 3: 1.0}, "d": {**data["d"], 3: 1.0}, "e": {**data["e"], 3: 1.0}}
    prev = {r.question: r for r in first.results}
    second = assess(data2, q, plan, 1, previous=prev)
    assert second.results[0] is first.results[0]
    assert replay(data2, q, plan)[-1].results[0].verdict == RESOLVED_POS
    last = assess(data2, q, plan, 2, previous=prev)
    assert last.done and last.next_variants == () and last.reason == "max_seeds"
    with pytest.raises(ValueError):
        assess(data, q, plan, 3)
    # all answered: done before max_seeds
    sure = {"a": {s: 10.0 + 0.01 * s for s in range(3)}, "b": {s: 0.0 for s in range(3)}}
    a = assess(sure, [Question("a", "b")], plan, 0)
    assert a.done and a.reason == "answered" and a.next_variants == ()
    assert replay({"a": {0: 1.0}, "b": {0: 0.0}}, [Question("a", "b")], plan) == []
    with pytest.raises(ValueError):
        replay({"a": {s: 1.0 for s in range(6)}, "b": {s: 0.0 for s in range(6)}},
               [Question("a", "b")], plan)


def test_fixed_need_reuses_seeds_needed() -> None:
    plan = Plan()
    data = fake_study(np.random.default_rng(3), 0.3, 10)
    r = replay(data, DEFAULT_QUESTIONS, plan)[-1].results[0]
    need = fixed_need(r, plan, m=6)
    assert need.alpha == pytest.approx(0.05 / 6)
    assert need.seeds_for_delta == seeds_needed(r.sd, 1.0, alpha=0.05 / 6)
    assert need.seeds_for_estimate == seeds_needed(r.sd, abs(r.estimate), alpha=0.05 / 6)


# --- noise model and simulation ---------------------------------------------------------------

def test_fit_noise_recovers_sigmas() -> None:
    rng = np.random.default_rng(11)
    nv, ns = 7, 400
    b = rng.normal(0, 0.7, ns)
    data = {f"v{i}": {s: float(i + b[s] + rng.normal(0, 0.45)) for s in range(ns)}
            for i in range(nv)}
    m = seq_sim.fit_noise(data)
    assert m.sigma_e == pytest.approx(0.45, rel=0.05)
    assert m.sigma_b == pytest.approx(0.7, rel=0.1)
    assert m.diff_sd == pytest.approx(math.sqrt(2) * m.sigma_e)
    assert m.df_resid == (nv - 1) * (ns - 1)
    with pytest.raises(ValueError):
        seq_sim.fit_noise({"a": {0: 1.0, 1: 2.0}})


def test_effect_means_give_every_question_the_effect() -> None:
    mu = seq_sim.effect_means(DEFAULT_QUESTIONS, 1.5)
    for q in DEFAULT_QUESTIONS:
        assert mu[q.a] - mu[q.b] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="cycle"):
        seq_sim.effect_means(parse_questions(["a/b", "b/c", "a/c"]), 1.0)


def test_simulation_matches_replay() -> None:
    """The vectorised simulation decides as replay() does on the same draws."""
    plan = Plan(rho=3.0)
    q = DEFAULT_QUESTIONS
    for effect in (0.0, 2.0):
        res = seq_sim.simulate(q, plan, seq_sim.effect_means(q, effect), 0.45, 0.7, 40,
                               np.random.default_rng(5))
        # redraw the same numbers to rebuild each study's data
        rng = np.random.default_rng(5)
        mu = seq_sim.effect_means(q, effect)
        nv, s = len(res.variants), plan.max_seeds
        seed_eff = 0.7 * rng.standard_normal((40, 1, s))
        values = np.array([mu[v] for v in res.variants])[None, :, None] + seed_eff \
            + 0.45 * rng.standard_normal((40, nv, s))
        codes = {RESOLVED_POS: 1, RESOLVED_NEG: -1, WITHIN_DELTA: 2, OPEN: 0}
        for i in range(40):
            data = {v: {sd: float(values[i, j, sd]) for sd in range(s)}
                    for j, v in enumerate(res.variants)}
            looks = replay(data, q, plan)
            got = [codes[r.verdict] for r in looks[-1].results]
            assert got == res.verdicts[i].tolist()
            # seeds per variant: initial plus each round the variant was in
            ran = {v: plan.initial for v in res.variants}
            for a in looks[:-1]:
                for v in a.next_variants:
                    ran[v] += 1
            assert [ran[v] for v in res.variants] == res.seeds[i].tolist()


def test_simulated_family_wise_error_and_negative_control() -> None:
    """>= 2000 null studies: the design's false-resolution rate is at most alpha within 4
    Monte-Carlo standard errors, and on the same draws a design re-testing every look at the
    unadjusted alpha (and one with Bonferroni over questions only) clearly exceeds alpha."""
    plan = Plan()
    q = DEFAULT_QUESTIONS
    n = 4000
    mu = seq_sim.effect_means(q, 0.0)

    def run(levels: list[float] | None) -> tuple[float, float]:
        res = seq_sim.simulate(q, plan, mu, 0.45, 0.7, n, np.random.default_rng(2024),
                               levels=levels)
        r = seq_sim.summarize(res, plan.delta)["false_resolution"]
        return r["rate"], r["se"]

    rate, _ = run(None)
    tol = 4 * math.sqrt(plan.alpha * (1 - plan.alpha) / n)
    assert rate <= plan.alpha + tol
    naive, naive_se = run([plan.alpha] * len(plan.looks))
    assert naive > plan.alpha + 4 * naive_se and naive > 3 * plan.alpha
    per_look, per_look_se = run([plan.alpha / len(q)] * len(plan.looks))
    assert per_look > plan.alpha + 4 * per_look_se
    # determinism: the same generator seed gives the same studies
    assert run(None) == (rate, _)
