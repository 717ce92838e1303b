"""A study as text: the Markdown report (``report.md``) and the compact terminal table printed
at the end of a study.

Report sections: a header (name, kind, trial counts by outcome); the ablation table (mIoU mean
± std over the seeds of finished trials, Δ and paired-t p against the baseline, excluded
trials counted); the excluded trials with their errors; for sweeps the top trials by
``rank_by`` with the swept parameters and Optuna's parameter importances; the plots.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from ctt.tune.layout import finite
from ctt.tune.stats import optuna_importances
from ctt.tune.tables import (
    DEFAULT_BASELINE,
    DEFAULT_RANK_BY,
    ablation_rows,
    is_ok,
    load_study_json,
    load_trials,
    trial_outcome,
    varying_params,
)


def _fmt_ms(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f} ± " + ("n/a" if math.isnan(std) else f"{std:.2f}")


def _fmt_excluded(excluded: dict[str, int]) -> str:
    return ", ".join(f"{n} {k.lower()}" for k, n in sorted(excluded.items())) or "-"


def _fmt_delta(row: dict, baseline: str) -> tuple[str, str]:
    if row["variant"] == baseline:
        return "(baseline)", ""
    if math.isnan(row["delta"]):
        return "n/a", "n/a"
    p = "n/a" if math.isnan(row["p"]) else f"{row['p']:.3g}"
    return f"{row['delta']:+.2f} (n={row['n_pairs']})", p


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(cell, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def render_report(study_dir: str, trials: Sequence[dict], study: dict,
                  plots: Sequence[str] = ()) -> str:
    """The Markdown report (see module docstring); ``plots`` are file names in ``study_dir``."""
    name = study.get("name") or os.path.basename(os.path.normpath(study_dir))
    kind = study.get("kind", "ablation")
    baseline = study.get("baseline", DEFAULT_BASELINE)
    counts: dict[str, int] = {}
    for t in trials:
        counts[trial_outcome(t)] = counts.get(trial_outcome(t), 0) + 1
    out = [f"# Study report: {name}", "",
           f"- study: `{name}` ({kind})",
           f"- directory: `{study_dir}`",
           f"- trials: {len(trials)} ("
           + (", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none") + ")", ""]

    rows = ablation_rows(trials, study)
    out += ["## Ablation", "",
            "mIoU in %, mean ± std (ddof=1) over seeds of trials that ran to the end.", ""]
    table = []
    for r in rows:
        delta, p = _fmt_delta(r, baseline)
        table.append([r["variant"], r["seeds"], _fmt_excluded(r["excluded"]),
                      _fmt_ms(r["final_mean"], r["final_std"]),
                      _fmt_ms(r["best_mean"], r["best_std"]), delta, p])
    out += [_md_table(["variant", "seeds", "excluded", "miou_final", "miou_best",
                       f"Δ final vs {baseline}", "p (paired t)"], table), ""]
    out += [f"Δ: mean over seeds of (variant − {baseline}) `miou_final`, paired by seed on the "
            "seeds where both trials ran to the end; p: two-sided paired t-test "
            "(n/a below 2 pairs). Errored, pruned and unfinished trials are counted under "
            "*excluded* and left out of every mean.", ""]

    failed = [t for t in trials if not is_ok(t)]
    if failed:
        out += ["## Excluded trials", ""]
        out += [_md_table(["trial_id", "variant", "seed", "status", "step", "error"],
                          [[t["trial_id"], t["variant"], t["seed"], trial_outcome(t),
                            _fmt_value(t.get("step")), (t.get("error") or "")[:200]]
                           for t in failed]), ""]

    if kind == "sweep":
        rank_by = study.get("rank_by", DEFAULT_RANK_BY)
        params = varying_params(trials)
        ranked = sorted((t for t in trials if finite(t.get(rank_by)) is not None),
                        key=lambda t: -t[rank_by])[:10]
        out += [f"## Sweep: top {len(ranked)} trials by `{rank_by}`", ""]
        out += [_md_table(["rank", "trial_id", "variant", "seed", "status", rank_by,
                           "miou_final", *params],
                          [[i + 1, t["trial_id"], t["variant"], t["seed"], trial_outcome(t),
                            _fmt_value(t[rank_by]), _fmt_value(t.get("miou_final")),
                            *[_fmt_value(t["config"].get(p)) for p in params]]
                           for i, t in enumerate(ranked)]), ""]
        importances = optuna_importances(study_dir, study)
        if importances:
            out += ["## Parameter importances (Optuna fANOVA)", ""]
            out += [_md_table(["parameter", "importance"],
                              [[k, f"{v:.3f}"] for k, v in importances.items()]), ""]

    if plots:
        out += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    return "\n".join(out)


def summary_table(study_dir: str | os.PathLike) -> str:
    """Compact terminal table for the end-of-study print: variant, seeds, final mean ± std, Δ."""
    study_dir = os.fspath(study_dir)
    study = load_study_json(study_dir)
    trials = load_trials(study_dir)
    baseline = study.get("baseline", DEFAULT_BASELINE)
    header = ("variant", "seeds", "miou_final", f"Δ vs {baseline}", "p")
    lines = [header]
    for r in ablation_rows(trials, study):
        delta, p = _fmt_delta(r, baseline)
        seeds = str(r["seeds"]) + (f" (+{sum(r['excluded'].values())} excl.)"
                                   if r["excluded"] else "")
        lines.append((r["variant"], seeds, _fmt_ms(r["final_mean"], r["final_std"]), delta, p))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)
