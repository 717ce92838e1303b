"""A study's plots (matplotlib, headless PNGs in the study directory): ``ablation.png`` (final
mIoU per variant), ``ablation_diff.png`` (the paired differences with their 95 % intervals,
forest style), ``curves.png`` (validation mIoU vs step per variant) and, for sweeps, one
``sweep_<param>.png`` per swept parameter."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from ctt.tune.layout import finite
from ctt.tune.tables import DEFAULT_RANK_BY, comparison_rows, is_ok, varying_params


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_ablation(rows: Sequence[dict], path: str) -> None:
    """Bar per variant of ``ablation_rows``: final mIoU mean ± std, annotated with n seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.5))
    means = [0.0 if math.isnan(r["final_mean"]) else r["final_mean"] for r in rows]
    errs = [0.0 if math.isnan(r["final_std"]) else r["final_std"] for r in rows]
    ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color="tab:blue")
    for i, r in enumerate(rows):
        label = f"n={r['seeds']}" if r["seeds"] else "no finished trial"
        ax.annotate(label, (i, means[i] + errs[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("miou_final (%), mean ± std")
    ax.set_title("Ablation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ablation_diff(comparisons: Sequence[dict], path: str) -> list[tuple[str, float, float,
                                                                             float]]:
    """Forest plot of the paired comparisons (rows of ``comparison_rows``): each ``a − b``
    as its mean Δ of ``miou_final`` with the 95 % t interval, a line at 0; resolved ones
    (Holm p < alpha) filled, others open; a dashed line parts the comparisons against the
    baseline from those between variants. Comparisons below 2 pairs show the mean only (no
    interval), those without pairs are named "no pairs". Returns what was drawn, top to bottom:
    ``(label, delta, ci_low, ci_high)`` (NaN where undefined)."""
    plt = _pyplot()
    drawn = [(f"{c['a']} − {c['b']}", c["delta"], c["ci_low"], c["ci_high"])
             for c in comparisons]
    fig, ax = plt.subplots(figsize=(6.5, 1.0 + 0.4 * max(1, len(drawn))))
    ys = list(range(len(drawn)))[::-1]  # first comparison on top
    for y, c, (_, delta, lo, hi) in zip(ys, comparisons, drawn):
        colour = "tab:green" if c["resolved"] else "tab:gray"
        if math.isnan(delta):
            ax.annotate("no pairs", (0, y), ha="center", va="center", fontsize=8)
            continue
        if not math.isnan(lo):
            ax.hlines(y, lo, hi, color=colour, linewidth=2)
        ax.plot([delta], [y], "o", color=colour,
                markerfacecolor=colour if c["resolved"] else "white")
        ax.annotate(f"n={c['n']}", (delta, y), xytext=(0, 5), textcoords="offset points",
                    ha="center", fontsize=7)
    for y, above, below in zip(ys[1:], comparisons, comparisons[1:]):
        if above["kind"] != below["kind"]:  # vs the baseline | between variants
            ax.axhline(y + 0.5, color="black", linewidth=0.5, linestyle="--")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(ys, [d[0] for d in drawn])
    ax.set_ylim(-0.7, len(drawn) - 0.3)
    ax.set_xlabel("Δ miou_final (mIoU points), mean and 95 % CI, paired by seed")
    ax.set_title("Paired differences (filled: resolved after Holm)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def plot_curves(trials: Sequence[dict], metrics: dict[str, list[dict]], order: Sequence[str],
                path: str) -> None:
    """miou vs step per variant: mean over seeds, min-max band (finished trials, else all)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in order:
        mine = [t for t in trials if t["variant"] == variant]
        use = [t for t in mine if is_ok(t)] or mine
        per_step: dict[int, list[float]] = {}
        for t in use:
            for r in metrics.get(t["trial_id"], []):
                v = finite(r.get("miou"))
                if v is not None:
                    per_step.setdefault(int(r["step"]), []).append(v)
        if not per_step:
            continue
        steps = sorted(per_step)
        vals = [per_step[s] for s in steps]
        (line,) = ax.plot(steps, [float(np.mean(v)) for v in vals], label=variant)
        ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("miou (%)")
    ax.set_title("Validation mIoU (mean over seeds, min-max band)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep_param(trials: Sequence[dict], param: str, metric: str, path: str) -> None:
    """``metric`` of each trial against its value of ``param`` (log x for values spanning
    decades; one column per value for categorical parameters)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    pts = [(t["config"].get(param), t[metric]) for t in trials
           if finite(t.get(metric)) is not None and t["config"].get(param) is not None]
    xs = [p[0] for p in pts]
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
        ax.scatter(xs, [p[1] for p in pts])
        positive = [x for x in xs if x > 0]
        if positive and len(positive) == len(xs) and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")  # learning rates and the like span decades
    else:  # categorical: one column per value
        cats = sorted({str(x) for x in xs})
        ax.scatter([cats.index(str(x)) for x in xs], [p[1] for p in pts])
        ax.set_xticks(range(len(cats)), cats)
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _safe_filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_plots(study_dir: str, trials: Sequence[dict], metrics: dict[str, list[dict]],
                study: dict, rows: Sequence[dict]) -> list[str]:
    """Draw every plot of the study into ``study_dir``; returns their file names (none
    without trials). ``rows`` are the study's ``ablation_rows``, in report order."""
    if not trials:
        return []
    plot_ablation(rows, os.path.join(study_dir, "ablation.png"))
    names = ["ablation.png"]
    comparisons = comparison_rows(trials, study)
    if comparisons:
        plot_ablation_diff(comparisons, os.path.join(study_dir, "ablation_diff.png"))
        names.append("ablation_diff.png")
    plot_curves(trials, metrics, [r["variant"] for r in rows],
                os.path.join(study_dir, "curves.png"))
    names.append("curves.png")
    if study.get("kind") == "sweep":
        rank_by = study.get("rank_by", DEFAULT_RANK_BY)
        for param in varying_params(trials):
            name = f"sweep_{_safe_filename(param)}.png"
            plot_sweep_param(trials, param, rank_by, os.path.join(study_dir, name))
            names.append(name)
    return names
