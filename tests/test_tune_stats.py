"""ctt.tune.stats against direct scipy computations on fixed examples: the paired interval,
t-test, Holm's correction (also by hand), power, minimum detectable effect and seeds needed;
the study's comparison family (ctt.tune.tables.comparison_rows), the report's sentences and the
forest plot built from them; edge cases (no pair, one seed, zero spread) without warnings."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from ctt.tune import tables
from ctt.tune.plots import plot_ablation_diff
from ctt.tune.report import comparison_sentence
from ctt.tune.results import build_results
from ctt.tune.stats import (
    holm,
    mean_ci,
    min_detectable_effect,
    paired_comparison,
    seeds_needed,
    t_test_power,
)


def scipy_power(effect: float, sd: float, n: int) -> float:
    """Power of the two-sided paired t-test at alpha 0.05, straight from its definition: the
    noncentral t's upper tail beyond the critical value plus its lower tail (nct.cdf; where
    that is NaN, far in the tail for df = 1, the density integrated instead)."""
    df, nc = n - 1, effect * math.sqrt(n) / sd
    crit = scipy.stats.t.ppf(0.975, df)
    with np.errstate(all="ignore"):
        lower = scipy.stats.nct.cdf(-crit, df, nc)
    if math.isnan(lower):
        lower = scipy.integrate.quad(scipy.stats.nct.pdf, -np.inf, -crit, args=(df, nc))[0]
    return scipy.stats.nct.sf(crit, df, nc) + lower


# ------------------------------------------------------------------------------------------
# Holm
# ------------------------------------------------------------------------------------------


def test_holm_by_hand():
    """p = (0.01, 0.04, 0.03, 0.005), m = 4. Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03,
    0.03·2 = 0.06, 0.04·1 = 0.04 -> raised to the running maximum 0.06."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 0.5·2 capped at 1, then the running maximum
    assert holm([0.02]) == [0.02]  # a family of one is not corrected
    assert holm([]) == []


def test_holm_skips_untested_comparisons():
    out = holm([math.nan, 0.2, 0.01])  # m = 2: 0.01·2 = 0.02, max(0.02, 0.2·1) = 0.2
    assert math.isnan(out[0]) and out[1:] == pytest.approx([0.2, 0.02])


def test_holm_between_raw_and_bonferroni():
    p = list(np.random.default_rng(0).uniform(0, 0.2, 9))
    adj = holm(p)
    for raw, a in zip(p, adj):
        assert raw <= a <= min(1.0, raw * len(p)) + 1e-15
    # step-down: the order of adjusted values follows the order of raw ones
    order = np.argsort(p)
    assert all(np.diff(np.asarray(adj)[order]) >= 0)


# ------------------------------------------------------------------------------------------
# interval, power, detectable effect, seeds
# ------------------------------------------------------------------------------------------

A = [55.0, 55.5, 57.0, 54.2]
B = [50.0, 52.0, 51.0, 52.5]


def test_mean_ci_matches_scipy():
    ref = scipy.stats.ttest_rel(A, B).confidence_interval(0.95)
    lo, hi = mean_ci(np.subtract(A, B))
    assert (lo, hi) == pytest.approx((ref.low, ref.high), rel=1e-12)
    d = np.subtract(A, B)
    half = scipy.stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2.0
    assert (lo, hi) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-12)


@pytest.mark.parametrize(("df", "nc"), [(1, 0.5), (2, 3.0), (9, 2.0), (30, -1.5)])
def test_power_matches_scipy_nct(df, nc):
    crit = scipy.stats.t.ppf(0.975, df)
    ref = scipy.stats.nct.sf(crit, df, nc) + scipy.stats.nct.cdf(-crit, df, nc)
    assert t_test_power(nc, df) == pytest.approx(ref, rel=1e-9)


def test_power_at_zero_effect_is_alpha_and_finite_where_nct_cdf_is_not():
    assert t_test_power(0.0, 5) == pytest.approx(0.05, rel=1e-9)
    with np.errstate(all="ignore"):
        assert math.isnan(scipy.stats.nct.cdf(-scipy.stats.t.ppf(0.975, 1), 1, 8.0))
    assert 0.4 < t_test_power(8.0, 1) < 0.5  # the upper tail alone is 0.4698


@pytest.mark.parametrize(("sd", "n"), [(1.0, 2), (1.26, 3), (2.7, 3), (0.5, 10), (1.6, 60)])
def test_min_detectable_effect_has_80_percent_power(sd, n):
    mde = min_detectable_effect(sd, n)
    assert scipy_power(mde, sd, n) == pytest.approx(0.8, abs=1e-8)
    assert scipy_power(0.99 * mde, sd, n) < 0.8  # the smallest such effect
    # effect in SD units depends on n only; large n approaches the normal approximation
    assert min_detectable_effect(2 * sd, n) == pytest.approx(2 * mde, rel=1e-8)


def test_min_detectable_effect_large_n_is_the_normal_approximation():
    z = scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)
    assert min_detectable_effect(1.0, 10_000) == pytest.approx(z / 100, rel=2e-3)


@pytest.mark.parametrize("sd", [0.3, 1.0, 1.6, 2.7, 5.0])
def test_seeds_needed_is_the_first_n_with_80_percent_power(sd):
    n = seeds_needed(sd, effect=1.0)
    assert scipy_power(1.0, sd, n) >= 0.8
    if n > 2:
        assert scipy_power(1.0, sd, n - 1) < 0.8


def test_seeds_needed_edge_cases():
    assert seeds_needed(0.0) == 2  # no spread: two seeds show any difference
    assert seeds_needed(math.nan) is None and seeds_needed(-1.0) is None
    assert seeds_needed(1e4) is None  # beyond MAX_SEEDS
    assert seeds_needed(100.0) == pytest.approx(78_500, rel=0.01)  # (z.975 + z.8)² · 100²


def test_paired_comparison_matches_scipy_and_pairs_by_seed():
    a = dict(enumerate(A)) | {7: 99.0}  # seed 7 has no partner: left out
    b = dict(enumerate(B)) | {8: 0.0}
    c = paired_comparison(a, b)
    ref = scipy.stats.ttest_rel(A, B)
    d = np.subtract(A, B)
    assert c["n"] == 4 and c["seeds"] == [0, 1, 2, 3]
    assert c["delta"] == pytest.approx(d.mean(), rel=1e-12)
    assert c["sd"] == pytest.approx(d.std(ddof=1), rel=1e-12)
    assert c["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert c["p"] == pytest.approx(ref.pvalue, rel=1e-8)
    ci = ref.confidence_interval(0.95)
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert scipy_power(c["mde"], d.std(ddof=1), 4) == pytest.approx(0.8, abs=1e-8)
    assert c["seeds_for_effect"] == seeds_needed(d.std(ddof=1))


def test_paired_comparison_edge_cases_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none = paired_comparison({0: 1.0}, {1: 2.0})
        one = paired_comparison({0: 55.0, 1: 56.0}, {0: 50.0})
        flat = paired_comparison({0: 55.0, 1: 56.0}, {0: 50.0, 1: 51.0})
        same = paired_comparison({0: 5.0, 1: 6.0}, {0: 5.0, 1: 6.0})
    assert none["n"] == 0 and math.isnan(none["delta"]) and math.isnan(none["p"])
    assert one["n"] == 1 and one["delta"] == 5.0
    assert all(math.isnan(one[k]) for k in ("sd", "ci_low", "ci_high", "t", "p", "mde"))
    assert one["seeds_for_effect"] is None
    assert flat["sd"] == 0.0 and (flat["ci_low"], flat["ci_high"]) == (5.0, 5.0)
    assert flat["p"] == 0.0 and flat["mde"] == 0.0 and flat["seeds_for_effect"] == 2
    assert same["p"] == 1.0 and same["delta"] == 0.0


# ------------------------------------------------------------------------------------------
# the study's comparisons, report sentences and forest plot
# ------------------------------------------------------------------------------------------

SUP = [50.0, 52.0, 51.0, 53.0]
GAIN = {  # variant -> per-seed difference to supervised (seeds 0..3)
    "mean_teacher": [1.0, -1.0, 2.0, 0.5],   # CI includes 0
    "cross": [0.9, 2.6, 1.2, 3.0],           # p < 0.05 before Holm, not after
    "ctt": [5.0, 5.2, 4.9, 5.1],             # resolved
}


def write_study(root, gains=GAIN, extra=None):
    def trial(tid, variant, seed, final, **fields):
        d = root / "trials" / tid
        d.mkdir(parents=True)
        info = {"trial_id": tid, "variant": variant, "seed": seed, "status": "TERMINATED",
                "pruned": False, "step": 4, "miou_final": final, "miou_best": final,
                "config": {"variant": variant, "seed": seed, "optim.iters": 4}}
        info.update(fields)
        (d / "trial.json").write_text(json.dumps(info))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 4, "miou": final}) + "\n")

    for s, v in enumerate(SUP):
        trial(f"supervised_{s}", "supervised", s, v)
    for variant, gain in gains.items():
        for s, g in enumerate(gain):
            trial(f"{variant}_{s}", variant, s, SUP[s] + g)
    trial("dual_self_0", "dual_self", 0, 54.0)  # one seed: not testable
    trial("dual_self_1", "dual_self", 1, 1.0, status="ERROR", miou_final=None)
    study = {"name": "fixture", "kind": "ablation",
             "variants": ["supervised", "mean_teacher", "dual_self", "cross", "ctt"]}
    study.update(extra or {})
    (root / "study.json").write_text(json.dumps(study))
    return tables.load_trials(root), study


def test_comparison_family_order_and_holm(tmp_path):
    trials, study = write_study(tmp_path)
    rows = tables.comparison_rows(trials, study)
    names = [(r["a"], r["b"], r["kind"]) for r in rows]
    # defaults whose variants both ran: cross-dual_self, cross-mean_teacher, ctt-cross,
    # ctt-mean_teacher (cross_hc / cross_lc are not in this study)
    assert names == [("mean_teacher", "supervised", "baseline"),
                     ("dual_self", "supervised", "baseline"),
                     ("cross", "supervised", "baseline"), ("ctt", "supervised", "baseline"),
                     ("cross", "dual_self", "between"), ("cross", "mean_teacher", "between"),
                     ("ctt", "cross", "between"), ("ctt", "mean_teacher", "between")]
    by = {(r["a"], r["b"]): r for r in rows}
    for variant, gain in GAIN.items():
        r = by[(variant, "supervised")]
        ref = scipy.stats.ttest_rel(np.add(SUP, gain), SUP)
        ci = ref.confidence_interval(0.95)
        assert r["p"] == pytest.approx(ref.pvalue, rel=1e-8)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
    ps = [r["p"] for r in rows]
    assert math.isnan(by[("dual_self", "supervised")]["p"])
    assert math.isnan(by[("cross", "dual_self")]["p"])  # one pair
    m = sum(math.isfinite(p) for p in ps)
    assert m == 6
    # Holm by hand on the six tested p-values
    tested = sorted((p, i) for i, p in enumerate(ps) if math.isfinite(p))
    running, expect = 0.0, {}
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        expect[i] = running
    for i, r in enumerate(rows):
        if i in expect:
            assert r["p_holm"] == pytest.approx(expect[i], rel=1e-12)
            assert r["resolved"] == (expect[i] < 0.05)
        else:
            assert math.isnan(r["p_holm"]) and r["resolved"] is False
    assert by[("ctt", "supervised")]["resolved"]
    cross = by[("cross", "supervised")]
    assert cross["p"] < 0.05 <= cross["p_holm"] and not cross["resolved"]
    custom = tables.comparison_rows(trials, {**study, "comparisons": [["ctt", "cross"]]})
    assert [(r["a"], r["b"]) for r in custom if r["kind"] == "between"] == [("ctt", "cross")]


def test_comparisons_reject_a_malformed_study_entry(tmp_path):
    from ctt.errors import ResultsError

    trials, study = write_study(tmp_path)
    with pytest.raises(ResultsError, match="'comparisons' must be a list of"):
        tables.comparison_rows(trials, {**study, "comparisons": ["ctt"]})


def test_report_sentences_say_what_is_resolved(tmp_path):
    trials, study = write_study(tmp_path)
    by = {(r["a"], r["b"]): r for r in tables.comparison_rows(trials, study)}
    ctt = by[("ctt", "supervised")]
    s = comparison_sentence(ctt)
    assert s.startswith("- `ctt` − `supervised`: +5.05 mIoU, 95 % CI [")
    assert f"**resolved** (Holm p = {ctt['p_holm']:.3g} < 0.05)" in s
    assert f"detect {ctt['mde']:.2f} mIoU at 80 % power" in s
    assert f"1 mIoU would need {ctt['seeds_for_effect']} seeds" in s
    cross = comparison_sentence(by[("cross", "supervised")])
    assert "not resolved: the interval excludes 0" in cross and "after Holm's" in cross
    mt = comparison_sentence(by[("mean_teacher", "supervised")])
    assert "not resolved: the interval includes 0" in mt
    assert "not testable: 1 seed" in comparison_sentence(by[("dual_self", "supervised")])

    report = build_results(tmp_path)["report"]
    assert "## Paired comparisons" in report
    for r in by.values():
        assert comparison_sentence(r) in report
    ref = scipy.stats.ttest_rel(np.add(SUP, GAIN["ctt"]), SUP)
    ci = ref.confidence_interval(0.95)
    assert (f"| ctt | 4 | - | {np.mean(np.add(SUP, GAIN['ctt'])):.2f} ± "
            in report)
    assert (f"| +5.05 (n=4) | [{ci.low:+.2f}, {ci.high:+.2f}] | {ref.pvalue:.3g} | "
            f"{ctt['p_holm']:.3g} |" in report)
    assert "| dual_self | 1 | 1 error |" in report
    assert "![ablation_diff](ablation_diff.png)" in report


def test_forest_plot_draws_the_comparisons(tmp_path):
    trials, study = write_study(tmp_path)
    rows = tables.comparison_rows(trials, study)
    drawn = plot_ablation_diff(rows, str(tmp_path / "diff.png"))
    assert [d[0] for d in drawn] == [f"{r['a']} − {r['b']}" for r in rows]
    for (_, delta, lo, hi), r in zip(drawn, rows):
        b_by_seed = {t["seed"]: t["miou_final"] for t in trials
                     if t["variant"] == r["b"] and t["status"] == "TERMINATED"}
        a_by_seed = {t["seed"]: t["miou_final"] for t in trials
                     if t["variant"] == r["a"] and t["status"] == "TERMINATED"}
        seeds = sorted(set(a_by_seed) & set(b_by_seed))
        d = np.array([a_by_seed[s] - b_by_seed[s] for s in seeds])
        assert delta == pytest.approx(d.mean(), rel=1e-12)
        if len(d) > 1:
            ci = scipy.stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
            assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-10)
        else:
            assert math.isnan(lo) and math.isnan(hi)
    with open(tmp_path / "diff.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = build_results(tmp_path)
    assert str(tmp_path / "ablation_diff.png") in out["plots"]


def test_report_of_degenerate_comparisons_without_warnings(tmp_path):
    """Zero spread (every seed the same gain), one common seed and no common seed at all:
    report, tables and plots are built with warnings turned into errors."""
    trials, study = write_study(tmp_path, gains={"cross": [2.0, 2.0, 2.0, 2.0],
                                                 "ctt": [1.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = {(r["a"], r["b"]): r for r in tables.comparison_rows(trials, study)}
        report = build_results(tmp_path)["report"]
    flat = rows[("cross", "supervised")]
    assert flat["sd"] == 0.0 and flat["p"] == 0.0 and flat["resolved"]
    assert (flat["ci_low"], flat["ci_high"]) == (2.0, 2.0)
    assert "Every seed gave the same difference (SD 0)" in comparison_sentence(flat)
    assert rows[("ctt", "supervised")]["n"] == 1
    assert "- `ctt` − `supervised`: not testable: 1 seed" in report
    assert rows[("ctt", "cross")]["n"] == 1  # ctt ran seed 0 only
    assert "nan" not in report.lower()
