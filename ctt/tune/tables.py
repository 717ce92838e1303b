"""A study's trials as rows: loading them from the study directory, the typed Parquet tables
(``trials.parquet``, ``metrics.parquet``) and the per-variant ablation rows of the report.

Keys read from ``study.json`` (all optional): ``variants`` (list of names, or a dict whose keys
are the names, fixing the table order); ``baseline`` (the variant Δ is measured against,
default "supervised"); ``rank_by`` (trial column that ranks sweep trials, default
"miou_best"); ``comparisons`` (list of [a, b] variant pairs compared besides each variant vs
the baseline, default `DEFAULT_COMPARISONS`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from ctt.errors import ResultsError
from ctt.fileio import as_int
from ctt.metric_names import METRIC_NAMES
from ctt.tune.layout import (
    NON_METRIC_KEYS,
    list_trial_ids,
    metrics_jsonl_path,
    read_history,
    read_json,
    study_json_path,
    summarise_metrics,
    trial_json_path,
)
from ctt.tune.stats import ALPHA, holm, mean_std, paired_comparison, paired_t_test

DEFAULT_BASELINE = "supervised"
DEFAULT_RANK_BY = "miou_best"
# Columns after the flat config keys in trials.parquet, in this order, with their types.
_TRIAL_TYPES = {
    "trial_id": pa.string(),
    "variant": pa.string(),
    "seed": pa.int64(),
    "status": pa.string(),
    "error": pa.string(),
    "pruned": pa.bool_(),
    "step": pa.int64(),
    "wall_s": pa.float64(),
    "miou_final": pa.float64(),
    "miou_best": pa.float64(),
    "node_id": pa.string(),
}
TRIAL_COLUMNS: tuple[str, ...] = tuple(_TRIAL_TYPES)


# --- loading ------------------------------------------------------------------------------------

def load_study_json(study_dir: str | os.PathLike) -> dict:
    """``study.json`` ({} if absent); a corrupt one raises :class:`ResultsError`."""
    return read_json(study_json_path(study_dir), strict=True) or {}


def load_trials(study_dir: str | os.PathLike) -> list[dict]:
    """One dict per trial: the ``trial.json`` fields, summary fields filled from metrics.

    Summary fields still missing in ``trial.json`` (a trial of an interrupted study is still
    RUNNING there) are computed from its ``metrics.jsonl``.
    """
    trials = []
    for tid in list_trial_ids(study_dir):
        path = trial_json_path(study_dir, tid)
        info = read_json(path, strict=True)
        if info is None:
            info = {"trial_id": tid, "status": "UNKNOWN", "config": {}}
        info.setdefault("trial_id", tid)
        info.setdefault("config", {})
        if not isinstance(info["config"], dict):
            raise ResultsError(f"{path}: 'config' must be a JSON object of config keys: repair "
                               "or delete the file")
        summary = summarise_metrics(read_history(metrics_jsonl_path(study_dir, tid),
                                                 strict=True))
        for key in ("step", "miou_final", "miou_best", "wall_s", "node_id"):
            if info.get(key) is None:
                info[key] = summary[key]
        if info.get("error") is None and summary["error"] is not None:
            info["error"] = summary["error"]
        info.setdefault("pruned", False)
        info.setdefault("variant", info["config"].get("variant", "unknown"))
        info.setdefault("seed", info["config"].get("seed", info["config"].get("run.seed")))
        if info["seed"] is not None and as_int(info["seed"]) is None:
            raise ResultsError(f"{path}: 'seed' must be an integer, got {info['seed']!r:.40}: "
                               "repair or delete the file")
        trials.append(info)
    return trials


def load_metrics(study_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """trial_id -> the trial's history (one record per step, sorted)."""
    return {tid: read_history(metrics_jsonl_path(study_dir, tid), strict=True)
            for tid in list_trial_ids(study_dir)}


# --- Parquet ------------------------------------------------------------------------------------

def _config_column(values: list[Any]) -> pa.Array:
    """Keep the value type; int+float -> float64; any other mix -> string (null stays null)."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return pa.array([None] * len(values), type=pa.string())
    if kinds == {bool}:
        return pa.array(values, type=pa.bool_())
    if kinds == {int}:
        return pa.array(values, type=pa.int64())
    if kinds <= {int, float}:
        return pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    if kinds == {str}:
        return pa.array(values, type=pa.string())
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _nan_to_none(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def trials_table(trials: Sequence[dict]) -> pa.Table:
    """``trials.parquet``: every flat config key verbatim, then `TRIAL_COLUMNS`."""
    config_keys: list[str] = []
    seen = set()
    for t in trials:
        for k in t["config"]:
            # variant/seed of the Tune param space are meta columns, not config keys.
            if k not in seen and k not in ("variant", "seed"):
                seen.add(k)
                config_keys.append(k)
    config_keys.sort()
    columns: dict[str, pa.Array] = {}
    for k in config_keys:
        columns[k] = _config_column([t["config"].get(k) for t in trials])
    for k in TRIAL_COLUMNS:
        values = [_nan_to_none(t.get(k)) for t in trials]
        if k == "seed":
            values = [None if v is None else int(v) for v in values]
        elif k in ("variant", "node_id", "error", "status", "trial_id"):
            values = [None if v is None else str(v) for v in values]
        elif k == "pruned":
            values = [bool(v) for v in values]
        columns[k] = pa.array(values, type=_TRIAL_TYPES[k])
    return pa.table(columns)


def metrics_table(metrics: dict[str, list[dict]]) -> pa.Table:
    """``metrics.parquet``: trial_id, step, then every metric seen (float64, null if absent)."""
    names = set()
    for recs in metrics.values():
        for r in recs:
            names.update(k for k, v in r.items()
                         if k not in NON_METRIC_KEYS and isinstance(v, (int, float)))
    ordered = [m for m in METRIC_NAMES if m in names] + sorted(names - set(METRIC_NAMES))
    rows = [(tid, r) for tid in sorted(metrics) for r in metrics[tid]]
    columns: dict[str, pa.Array] = {
        "trial_id": pa.array([tid for tid, _ in rows], type=pa.string()),
        "step": pa.array([int(r["step"]) for _, r in rows], type=pa.int64()),
    }
    for m in ordered:
        vals = []
        for _, r in rows:
            v = r.get(m)
            vals.append(float(v) if isinstance(v, (int, float)) else None)
        columns[m] = pa.array(vals, type=pa.float64())
    return pa.table(columns)


# --- rows of the report -------------------------------------------------------------------------

def is_ok(trial: dict) -> bool:
    """A trial that ran to its end: the only kind that enters means."""
    return trial.get("status") == "TERMINATED" and not trial.get("pruned")


def trial_outcome(trial: dict) -> str:
    """TERMINATED | PRUNED | ERROR | RUNNING (interrupted) | ... for counting."""
    if trial.get("status") == "TERMINATED" and trial.get("pruned"):
        return "PRUNED"
    return str(trial.get("status", "UNKNOWN"))


def variant_order(trials: Sequence[dict], study: dict) -> list[str]:
    """Order of ``study.json["variants"]``, else first appearance with the baseline first."""
    present = []
    for t in sorted(trials, key=lambda t: str(t["trial_id"])):
        if t["variant"] not in present:
            present.append(t["variant"])
    declared = study.get("variants")
    if isinstance(declared, dict):
        declared = list(declared)
    if isinstance(declared, list) and declared:
        order = [v for v in declared if v in present]
        return order + [v for v in present if v not in order]
    baseline = study.get("baseline", DEFAULT_BASELINE)
    return ([baseline] if baseline in present else []) + [v for v in present if v != baseline]


def ablation_rows(trials: Sequence[dict], study: dict) -> list[dict]:
    """One dict per variant: seeds, excluded counts, final/best mean & std, Δ vs baseline."""
    baseline = study.get("baseline", DEFAULT_BASELINE)
    base_final = {t["seed"]: t["miou_final"] for t in trials
                  if t["variant"] == baseline and is_ok(t) and t.get("miou_final") is not None}
    rows = []
    for variant in variant_order(trials, study):
        mine = [t for t in trials if t["variant"] == variant]
        ok = [t for t in mine if is_ok(t) and t.get("miou_final") is not None]
        ok_ids = {id(t) for t in ok}
        excluded: dict[str, int] = {}
        for t in mine:
            if id(t) not in ok_ids:
                outcome = trial_outcome(t)
                excluded[outcome] = excluded.get(outcome, 0) + 1
        final = mean_std([t["miou_final"] for t in ok])
        best = mean_std([t["miou_best"] for t in ok])
        pairs = sorted((t["seed"], t["miou_final"]) for t in ok if t["seed"] in base_final)
        if variant == baseline or not base_final:
            delta = t_stat = p = math.nan
            n_pairs = 0
        else:
            n_pairs = len(pairs)
            delta, t_stat, p = paired_t_test([v for _, v in pairs],
                                             [base_final[s] for s, _ in pairs])
        rows.append({
            "variant": variant, "seeds": len(ok), "excluded": excluded,
            "final_mean": final[0], "final_std": final[1],
            "best_mean": best[0], "best_std": best[1],
            "delta": delta, "t": t_stat, "p": p, "n_pairs": n_pairs,
            "seed_list": sorted(t["seed"] for t in ok),
        })
    return rows


# The comparisons between semi-supervised variants that isolate one part of CTT (a - b), tested
# besides every variant against the baseline when both variants are in the study;
# ``study.json["comparisons"]`` (a list of [a, b]) replaces them.
DEFAULT_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("cross", "dual_self"),       # cross teaching vs two self-taught pairs
    ("cross", "mean_teacher"),
    ("cross_hc", "cross"),        # + high-level contrast
    ("cross_lc", "cross"),        # + low-level contrast
    ("ctt", "cross"),             # + both contrasts
    ("ctt", "mean_teacher"),
)


def comparison_rows(trials: Sequence[dict], study: dict) -> list[dict]:
    """The study's paired comparisons of ``miou_final``, one family for Holm's correction:
    every variant against the baseline (in table order), then the between-variant comparisons
    (``study.json["comparisons"]``, default `DEFAULT_COMPARISONS`) whose variants both ran.

    Each row is :func:`ctt.tune.stats.paired_comparison` of the finished trials paired by seed,
    plus ``a``, ``b``, ``kind`` ("baseline" | "between"), ``p_holm`` (Holm over every row
    with a p) and ``resolved`` (``p_holm`` < ``stats.ALPHA``).
    """
    baseline = study.get("baseline", DEFAULT_BASELINE)
    order = variant_order(trials, study)
    final: dict[str, dict[Any, float]] = {v: {} for v in order}
    for t in trials:  # a trial without a seed cannot be paired
        if is_ok(t) and t.get("miou_final") is not None and t.get("seed") is not None:
            final[t["variant"]][t["seed"]] = float(t["miou_final"])
    pairs = [(v, baseline, "baseline") for v in order if v != baseline and baseline in final]
    declared = study.get("comparisons")
    if declared is not None and not (
            isinstance(declared, list) and all(
                isinstance(c, list) and len(c) == 2 and all(isinstance(v, str) for v in c)
                for c in declared)):
        raise ResultsError("study.json: 'comparisons' must be a list of [a, b] variant name "
                           f"pairs, got {declared!r:.60}: repair the file")
    between = DEFAULT_COMPARISONS if declared is None else [tuple(c) for c in declared]
    pairs += [(a, b, "between") for a, b in between
              if a in final and b in final and a != b and (a, b, "baseline") not in pairs]
    rows = [{"a": a, "b": b, "kind": kind, **paired_comparison(final[a], final[b])}
            for a, b, kind in pairs]
    for row, p_holm in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = p_holm
        row["resolved"] = bool(p_holm < ALPHA)  # NaN compares False: untested is unresolved
    return rows


def varying_params(trials: Sequence[dict]) -> list[str]:
    """Config keys whose value differs between trials (the swept ones), seeds excluded."""
    keys = sorted({k for t in trials for k in t["config"]} - {"variant", "seed", "run.seed"})
    out = []
    for k in keys:
        values = {json.dumps(t["config"].get(k), sort_keys=True) for t in trials}
        if len(values) > 1:
            out.append(k)
    return out
