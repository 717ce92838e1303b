"""What adaptive seeds (``ctt.tune.sequential``) cost and save, simulated at the default
ablation's noise.

    python benchmarks/sequential_sim.py                     # 10,000 studies per scenario
    python benchmarks/sequential_sim.py --n-studies 2000 --out /tmp/seq.json

Fits the two-way model ``value = mu_variant + b_seed + e`` (``ctt.tune.seq_sim.fit_noise``) to
the per-seed final mIoU of the default study (``benchmarks/results/compare_studies.json``, key
``miou_final_after``: 7 variants × 3 seeds), then simulates whole adaptive studies of the
default question family under the default plan (3 seeds, +1 per round, at most 10): with no
true difference (the family-wise rate of wrong verdicts, with its Monte-Carlo standard error)
and with a true difference of 0.5, 1 and 2 mIoU on every question (power, "smaller than delta"
verdicts, seeds per variant, trials), each against the fixed design of equal power (Bonferroni
over the questions, ``stats.seeds_needed``). Beside it: the naive designs that re-test at every
look without spending (unadjusted, and Bonferroni over questions only), and the scan over the
spending exponent rho behind ``sequential.DEFAULT_RHO``. Every scenario draws from the same
generator seed (common random numbers), so the scenarios differ by the means only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS_DIR, metadata, write_json

from ctt.errors import guarded
from ctt.tune.seq_sim import effect_means, fit_noise, fixed_design, simulate, summarize
from ctt.tune.sequential import DEFAULT_QUESTIONS, DEFAULT_RHO, Plan
from ctt.tune.stats import paired_comparison

DEFAULT_SOURCE = RESULTS_DIR / "compare_studies.json"
DEFAULT_OUT = RESULTS_DIR / "sequential_sim.json"
EFFECTS = (0.0, 0.5, 1.0, 2.0)
RHOS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0)


def load_values(path: Path, key: str) -> dict[str, dict[int, float]]:
    """``{variant: {seed: value}}`` from a compare_studies JSON's ``trials``."""
    data: dict[str, dict[int, float]] = {}
    for t in json.loads(path.read_text())["trials"]:
        if t.get(key) is not None:
            data.setdefault(t["variant"], {})[int(t["seed"])] = float(t[key])
    return data


def power_cap(n_studies: int) -> float:
    """The power a fixed design is matched to when the simulation saw no miss: 1 - 3/R, the
    95 % lower bound of a rate with 0 failures in R studies (the rule of three)."""
    return 1.0 - 3.0 / n_studies


def scenario(plan: Plan, effect: float, sigma_e: float, sigma_b: float, diff_sd: float,
             n_studies: int, seed: int, levels: Any = None) -> dict[str, Any]:
    """One simulated scenario with every question's true difference ``effect``, and for a
    nonzero effect the fixed design of equal power."""
    q = DEFAULT_QUESTIONS
    res = simulate(q, plan, effect_means(q, effect), sigma_e, sigma_b, n_studies,
                   np.random.default_rng(seed), levels=levels)
    out = summarize(res, plan.delta)
    out["effect"] = effect
    if effect > 0:
        p = min(out["power"]["rate"], power_cap(n_studies))
        out["fixed_equal_power"] = fixed_design(diff_sd, effect, p, plan.alpha, len(q),
                                                len(res.variants), n_seeds=plan.max_seeds)
    return out


def rho_scan(rhos: tuple[float, ...], delta: float, model: Any, n_studies: int,
             seed: int) -> dict[str, Any]:
    """For each rho, at true differences delta and 2·delta: power, mean trials and the
    efficiency (trials of the fixed design of equal power, real-valued / the adaptive design's
    mean trials; above 1 the adaptive design wins). The pick: the rho with the largest
    efficiency at the worse of the two effects."""
    rows = []
    for rho in rhos:
        plan = Plan(rho=rho, delta=delta)
        row: dict[str, Any] = {"rho": rho}
        for name, eff in (("delta", delta), ("two_delta", 2 * delta)):
            s = scenario(plan, eff, model.sigma_e, model.sigma_b, model.diff_sd, n_studies,
                         seed)
            fixed = s["fixed_equal_power"]["trials_real"]
            row[name] = {"power": s["power"]["rate"], "trials": s["trials"]["mean"],
                         "fixed_trials_real": fixed,
                         "efficiency": fixed / s["trials"]["mean"]}
        row["min_efficiency"] = min(row["delta"]["efficiency"], row["two_delta"]["efficiency"])
        rows.append(row)
    best = max(rows, key=lambda r: r["min_efficiency"])
    return {"criterion": "max over rho of min(efficiency at delta, efficiency at 2 delta)",
            "rows": rows, "best_rho": best["rho"]}


def _fmt_rate(r: dict[str, float]) -> str:
    return f"{r['rate']:.4f} ± {r['se']:.4f}"


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--key", default="miou_final_after")
    p.add_argument("--n-studies", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    t0 = time.perf_counter()

    data = load_values(a.source, a.key)
    model = fit_noise(data)
    observed = {str(q): {k: paired_comparison(data[q.a], data[q.b])[k]
                         for k in ("n", "delta", "sd")} for q in DEFAULT_QUESTIONS}
    plan = Plan()
    m = len(DEFAULT_QUESTIONS)
    print(f"fit on {model.n_variants} variants x {model.n_seeds} seeds: sigma_b "
          f"{model.sigma_b:.3f}, sigma_e {model.sigma_e:.3f} ({model.df_resid} df), "
          f"paired-difference sd {model.diff_sd:.3f} mIoU")
    print(f"plan: looks at {plan.looks} seeds, rho {plan.rho}, alpha {plan.alpha}, "
          f"delta {plan.delta}, m {m}; per-question levels "
          + ", ".join(f"{x:.2e}" for x in plan.levels(m)))

    scan = rho_scan(RHOS, plan.delta, model, a.n_studies, a.seed)
    print("\nrho  power@d  trials@d  eff@d  power@2d  trials@2d  eff@2d")
    for r in scan["rows"]:
        d1, d2 = r["delta"], r["two_delta"]
        print(f"{r['rho']:4g}  {d1['power']:.3f}  {d1['trials']:8.1f}  {d1['efficiency']:.3f}  "
              f"{d2['power']:.3f}  {d2['trials']:9.1f}  {d2['efficiency']:.3f}")
    print(f"best rho by {scan['criterion']}: {scan['best_rho']:g} (DEFAULT_RHO {DEFAULT_RHO:g})")

    scenarios = [scenario(plan, eff, model.sigma_e, model.sigma_b, model.diff_sd, a.n_studies,
                          a.seed) for eff in EFFECTS]
    # the fixed design matched to the adaptive design's power at delta, over every scenario
    at_delta = next(s for s in scenarios if s["effect"] == plan.delta)
    matched = at_delta["fixed_equal_power"]
    # the fitted variant means as the truth: questions of very different sizes in one family
    fitted = simulate(DEFAULT_QUESTIONS, plan, model.means, model.sigma_e, model.sigma_b,
                      a.n_studies, np.random.default_rng(a.seed))
    at_fitted = summarize(fitted, plan.delta)
    at_fitted["true_diff"] = dict(zip(map(str, fitted.questions), fitted.true_diff.tolist()))
    at_fitted["verdict_rates"] = {
        str(q): {name: float((fitted.verdicts[:, i] == code).mean())
                 for name, code in (("resolved+", 1), ("resolved-", -1),
                                    ("within_delta", 2), ("open", 0))}
        for i, q in enumerate(fitted.questions)}
    naive = {
        "unadjusted": scenario(plan, 0.0, model.sigma_e, model.sigma_b, model.diff_sd,
                               a.n_studies, a.seed, levels=[plan.alpha] * len(plan.looks)),
        "bonferroni_questions_only": scenario(
            plan, 0.0, model.sigma_e, model.sigma_b, model.diff_sd, a.n_studies, a.seed,
            levels=[plan.alpha / m] * len(plan.looks)),
    }

    print(f"\n{a.n_studies} studies per scenario; fixed = Bonferroni alpha/{m}, equal power")
    print("effect  wrong-verdict FWER   power   within_d  seeds/var  trials  "
          "| fixed seeds  trials  (real)")
    for s in scenarios:
        fx = s.get("fixed_equal_power")
        tail = (f"| {fx['seeds']!s:>11}  {fx['trials']!s:>6}  ({fx['trials_real']:.1f})"
                if fx else "|")
        pw = f"{s['power']['rate']:.3f}" if "power" in s else "  -  "
        print(f"{s['effect']:6g}  {_fmt_rate(s['wrong_verdict'])}  {pw:>6}  "
              f"{s['within_delta']['rate']:8.3f}  {s['seeds_per_variant']['mean']:9.2f}  "
              f"{s['trials']['mean']:6.1f}  {tail}")
    print(f"fixed design matched to the power at delta ({at_delta['power']['rate']:.3f}): "
          f"{matched['seeds']} seeds, {matched['trials']} trials in every scenario")
    full = plan.max_seeds * len(fitted.variants)
    print(f"fitted means as the truth: seeds/variant {at_fitted['seeds_per_variant']['mean']:.2f}"
          f", trials {at_fitted['trials']['mean']:.1f} (fixed at max_seeds: {full}); "
          + ", ".join(f"{q} {d:+.2f}: {at_fitted['verdict_rates'][q]['open']:.2f} open"
                      for q, d in at_fitted["true_diff"].items()))
    for name, s in naive.items():
        print(f"naive ({name}) under the null: false resolution "
              f"{_fmt_rate(s['false_resolution'])}")
    wall = time.perf_counter() - t0
    print(f"{wall:.1f} s")

    meta = metadata("cpu", "sequential_sim.py", argv, threads=1, note=a.note)
    write_json(a.out, {
        **meta, "source": str(a.source.relative_to(RESULTS_DIR.parents[1])
                              if a.source.is_relative_to(RESULTS_DIR.parents[1]) else a.source),
        "key": a.key, "n_studies": a.n_studies, "seed": a.seed, "wall_s": wall,
        "questions": [str(q) for q in DEFAULT_QUESTIONS],
        "plan": {"initial": plan.initial, "step": plan.step, "max_seeds": plan.max_seeds,
                 "rho": plan.rho, "alpha": plan.alpha, "delta": plan.delta,
                 "looks": list(plan.looks), "weights": plan.weights.tolist(),
                 "levels": plan.levels(m).tolist()},
        "noise": {"sigma_b": model.sigma_b, "sigma_e": model.sigma_e,
                  "diff_sd": model.diff_sd, "df_seed": model.df_seed,
                  "df_resid": model.df_resid, "means": model.means,
                  "seed_effects": {str(k): v for k, v in model.seed_effects.items()},
                  "observed_pairs": observed},
        "power_cap": power_cap(a.n_studies),
        "scenarios": scenarios, "matched_fixed_design": matched, "naive_null": naive,
        "fitted_means_scenario": at_fitted,
        "rho_scan": scan,
        "effect_means": {str(e): effect_means(DEFAULT_QUESTIONS, e) for e in EFFECTS},
    })
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
