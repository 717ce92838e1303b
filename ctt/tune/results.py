"""Study results: files written by the driver -> Parquet tables, a Markdown report and plots.

Everything is rebuilt from the files that `ctt.tune.callbacks.StudyLoggerCallback` writes, so
it works for finished, interrupted and resumed studies alike::

    <study_dir>/study.json                       resolved study definition (optional here)
    <study_dir>/trials/<trial_id>/trial.json     flat config, variant, seed, status, summary
    <study_dir>/trials/<trial_id>/metrics.jsonl  one JSON object per reported result
    <study_dir>/tb/<variant>_seed<seed>_<trial_id>/  TensorBoard scalars + one HParams session
    <study_dir>/optuna.db                        (sweeps) Optuna storage, for importances

Outputs (all in ``<study_dir>``): ``trials.parquet``, ``metrics.parquet``, ``report.md``,
``ablation.png``, ``curves.png`` and, for sweeps, ``sweep_<param>.png``.

Keys read from ``study.json`` (all optional): ``name``; ``kind`` ("ablation" | "sweep");
``variants`` (list of names, or a dict whose keys are the names, fixing the table order);
``baseline`` (the variant Δ is measured against, default "supervised"); ``rank_by`` (trial
column that ranks sweep trials, default "miou_best"); ``optuna_study_name``.

CLI: ``python -m ctt.tune.results STUDY_DIR`` rebuilds everything and prints the report.

This module imports neither ray nor optuna at module level (optuna only for importances), so
results can be rebuilt on a machine without a Ray cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctt.errors import MissingDataError, ResultsError, UserError, guarded

log = logging.getLogger(__name__)

# Canonical metric order (architecture.md, "Metric names"); other numeric keys follow sorted.
METRIC_NAMES: tuple[str, ...] = (
    "miou",
    "miou/student0",
    "miou/student1",
    "miou/teacher0",
    "miou/teacher1",
    "loss/total",
    "loss/sup",
    "loss/unsup",
    "loss/hc",
    "loss/lc",
    "pl/weight",
    "n/anchors_hc",
    "n/anchors_lc",
    "bank/fill",
    "contrast_on",
)
# Keys of a metrics.jsonl record that are not metrics (identity, placement, flags).
NON_METRIC_KEYS = frozenset({"trial_id", "step", "node_id", "node_ip", "hostname", "error",
                             "pruned"})
# Columns after the flat config keys in trials.parquet, in this order.
TRIAL_COLUMNS: tuple[str, ...] = (
    "trial_id",
    "variant",
    "seed",
    "status",
    "error",
    "pruned",
    "step",
    "wall_s",
    "miou_final",
    "miou_best",
    "node_id",
)
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
DEFAULT_BASELINE = "supervised"


# --------------------------------------------------------------------------------------------
# Storage layout and small I/O helpers. All file access of the study system goes through these
# few functions so that a pyarrow.fs (S3/GCS) version only has to replace them.
# --------------------------------------------------------------------------------------------


def trial_dir(study_dir: str | os.PathLike, trial_id: str) -> str:
    """Directory holding one trial's ``trial.json`` and ``metrics.jsonl``."""
    return os.path.join(os.fspath(study_dir), "trials", trial_id)


def trial_json_path(study_dir: str | os.PathLike, trial_id: str) -> str:
    return os.path.join(trial_dir(study_dir, trial_id), "trial.json")


def metrics_jsonl_path(study_dir: str | os.PathLike, trial_id: str) -> str:
    return os.path.join(trial_dir(study_dir, trial_id), "metrics.jsonl")


def tb_run_name(variant: str, seed: Any, trial_id: str) -> str:
    """Readable, unique TensorBoard run name: ``<variant>_seed<seed>_<trial_id>``."""
    safe_variant = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(variant))
    return f"{safe_variant}_seed{seed}_{trial_id}"


def tb_dir(study_dir: str | os.PathLike, run_name: str) -> str:
    return os.path.join(os.fspath(study_dir), "tb", run_name)


def read_text(path: str) -> str | None:
    """The file's text, or None if it does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_text_atomic(path: str, text: str) -> None:
    """Write via a temporary file + rename, so a reader (or a kill) never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def append_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def list_trial_ids(study_dir: str | os.PathLike) -> list[str]:
    root = os.path.join(os.fspath(study_dir), "trials")
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _read_text_checked(path: str) -> str | None:
    """:func:`read_text`, with undecodable or unreadable files as :class:`ResultsError`."""
    try:
        return read_text(path)
    except UnicodeDecodeError as e:
        raise ResultsError(f"{path} is not UTF-8 text (byte offset {e.start}): the file is "
                           "corrupt; restore or delete it") from None
    except IsADirectoryError:
        raise ResultsError(f"{path} is a directory, not a file: remove it") from None
    except PermissionError as e:
        raise ResultsError(f"cannot read {path} ({e.strerror}): fix its permissions") from None


def read_json(path: str, *, strict: bool = False) -> dict | None:
    """The JSON object in ``path``, or None if the file does not exist.

    ``strict=False`` (the driver's callback, which must not die mid-study): a corrupt file is
    ignored with a warning. ``strict=True`` (building results): it raises
    :class:`ResultsError` naming the file, since a report built without it would silently
    lose the study's definition or a trial."""
    text = _read_text_checked(path) if strict else read_text(path)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if strict:
            raise ResultsError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column "
                               f"{e.colno}): repair or delete the file") from None
        log.warning("ignoring %s: not valid JSON (%s)", path, e)
        return None
    if not isinstance(value, dict):
        if strict:
            raise ResultsError(f"{path} holds a JSON {type(value).__name__}, not an object: "
                               "repair or delete the file")
        return None
    return value


def _step_of(value: Any) -> int | None:
    """A record's ``step`` as an int; None unless it is an integer (or an integral float)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def read_metrics_jsonl(path: str, *, strict: bool = False) -> list[dict]:
    """All records of a metrics.jsonl file, in file order (possibly several per step); each
    record's ``step`` is an int.

    A truncated last line (driver killed mid-write) is skipped with a warning. Any other
    malformed line, or a ``step`` that is not an integer, is skipped with a warning, or with
    ``strict=True`` raises :class:`ResultsError` naming the file and line.
    """
    text = _read_text_checked(path) if strict else read_text(path)
    if not text:
        return []
    records = []
    lines = text.splitlines()
    last = max((i for i, ln in enumerate(lines, 1) if ln.strip()), default=0)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if strict and lineno != last:
                raise ResultsError(f"{path}, line {lineno} is not valid JSON ({e.msg}): repair "
                                   "or delete the line") from None
            log.warning("%s:%d: skipping a malformed line (interrupted write?)", path, lineno)
            continue
        if not (isinstance(rec, dict) and "step" in rec):
            continue
        step = _step_of(rec["step"])
        if step is None:
            msg = (f"{path}, line {lineno}: 'step' must be an integer, got "
                   f"{rec['step']!r:.40}")
            if strict:
                raise ResultsError(f"{msg}: repair or delete the line")
            log.warning("%s; skipping the line", msg)
            continue
        records.append({**rec, "step": step})
    return records


def dedupe_by_step(records: Iterable[dict]) -> list[dict]:
    """One record per step, the last one written winning, sorted by step.

    A resumed trial re-reports the steps between its last checkpoint and the interruption;
    the re-run values are the ones that belong to the rest of its history.
    """
    by_step: dict[int, dict] = {}
    for rec in records:
        by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def summarise_metrics(records: Sequence[dict]) -> dict[str, Any]:
    """Trial summary from its deduplicated, step-sorted records.

    Returns ``step`` (last step or None), ``miou_final`` (last finite ``miou``), ``miou_best``
    (max finite ``miou``), ``wall_s`` (largest ``time/total_s``), ``node_id`` (last
    ``node_ip``, else ``hostname``), ``error`` (last reported ``error`` string) and
    ``pruned_flag`` (any record reported ``pruned: True``).
    """
    mious = [v for v in (_finite(r.get("miou")) for r in records) if v is not None]
    walls = [v for v in (_finite(r.get("time/total_s")) for r in records) if v is not None]
    node = None
    error = None
    for r in records:
        node = r.get("node_id") or r.get("node_ip") or r.get("hostname") or node
        if isinstance(r.get("error"), str) and r["error"]:
            error = r["error"]
    return {
        "step": int(records[-1]["step"]) if records else None,
        "miou_final": mious[-1] if mious else None,
        "miou_best": max(mious) if mious else None,
        "wall_s": max(walls) if walls else None,
        "node_id": node,
        "error": error,
        "pruned_flag": any(r.get("pruned") is True for r in records),
    }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_study_json(study_dir: str | os.PathLike) -> dict:
    """``study.json`` ({} if absent); a corrupt one raises :class:`ResultsError`."""
    return read_json(os.path.join(os.fspath(study_dir), "study.json"), strict=True) or {}


def load_trials(study_dir: str | os.PathLike) -> list[dict]:
    """One dict per trial: the ``trial.json`` fields, summary fields filled from metrics.

    Summary fields still missing in ``trial.json`` (a trial of an interrupted study is still
    RUNNING there) are computed from its ``metrics.jsonl``.
    """
    trials = []
    for tid in list_trial_ids(study_dir):
        info = read_json(trial_json_path(study_dir, tid), strict=True)
        if info is None:
            info = {"trial_id": tid, "status": "UNKNOWN", "config": {}}
        info.setdefault("trial_id", tid)
        info.setdefault("config", {})
        if not isinstance(info["config"], dict):
            raise ResultsError(f"{trial_json_path(study_dir, tid)}: 'config' must be a JSON "
                               "object of config keys: repair or delete the file")
        summary = summarise_metrics(dedupe_by_step(read_metrics_jsonl(
            metrics_jsonl_path(study_dir, tid), strict=True)))
        for key in ("step", "miou_final", "miou_best", "wall_s", "node_id"):
            if info.get(key) is None:
                info[key] = summary[key]
        if info.get("error") is None and summary["error"] is not None:
            info["error"] = summary["error"]
        info.setdefault("pruned", False)
        info.setdefault("variant", info["config"].get("variant", "unknown"))
        info.setdefault("seed", info["config"].get("seed", info["config"].get("run.seed")))
        if info["seed"] is not None and _step_of(info["seed"]) is None:
            raise ResultsError(f"{trial_json_path(study_dir, tid)}: 'seed' must be an integer, "
                               f"got {info['seed']!r:.40}: repair or delete the file")
        trials.append(info)
    return trials


def load_metrics(study_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """trial_id -> deduplicated, step-sorted metric records."""
    return {
        tid: dedupe_by_step(read_metrics_jsonl(metrics_jsonl_path(study_dir, tid), strict=True))
        for tid in list_trial_ids(study_dir)
    }


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Statistics (scipy is not a core dependency)
# --------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_incomplete_beta: x={x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast only below the mean; use the symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Paired two-sided t-test of ``a - b``: returns ``(mean_diff, t, p)``.

    Same statistic as ``scipy.stats.ttest_rel(a, b)``. Fewer than 2 pairs -> t = p = NaN.
    Identical differences (zero spread): t = ±inf, p = 0 when the mean differs from 0;
    t = NaN, p = 1 when every difference is 0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_t_test: {len(a)} values in a but {len(b)} in b")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = d.size
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return (mean, math.nan, 1.0) if mean == 0.0 else (mean, math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(n))
    return mean, t, student_t_two_sided_p(t, n - 1)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


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


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return float(arr.mean()), std


def _fmt_ms(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f} ± " + ("n/a" if math.isnan(std) else f"{std:.2f}")


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
        final = _mean_std([t["miou_final"] for t in ok])
        best = _mean_std([t["miou_best"] for t in ok])
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


def _fmt_excluded(excluded: dict[str, int]) -> str:
    return ", ".join(f"{n} {k.lower()}" for k, n in sorted(excluded.items())) or "-"


def _fmt_delta(row: dict, baseline: str) -> tuple[str, str]:
    if row["variant"] == baseline:
        return "(baseline)", ""
    if math.isnan(row["delta"]):
        return "n/a", "n/a"
    p = "n/a" if math.isnan(row["p"]) else f"{row['p']:.3g}"
    return f"{row['delta']:+.2f} (n={row['n_pairs']})", p


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(cell, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _varying_params(trials: Sequence[dict]) -> list[str]:
    """Config keys whose value differs between trials (the swept ones), seeds excluded."""
    keys = sorted({k for t in trials for k in t["config"]} - {"variant", "seed", "run.seed"})
    out = []
    for k in keys:
        values = {json.dumps(t["config"].get(k), sort_keys=True) for t in trials}
        if len(values) > 1:
            out.append(k)
    return out


def _optuna_importances(study_dir: str, study: dict) -> dict[str, float] | None:
    path = os.path.join(study_dir, "optuna.db")
    if not os.path.exists(path):
        return None
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        ostudy = optuna.load_study(study_name=study.get("optuna_study_name"),
                                   storage=f"sqlite:///{os.path.abspath(path)}")
        return dict(optuna.importance.get_param_importances(ostudy))
    except Exception as e:  # importances are a nicety; the report must still be written
        log.warning("no Optuna parameter importances from %s: %s", path, e)
        return None


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def render_report(study_dir: str, trials: Sequence[dict], study: dict,
                  plots: Sequence[str] = ()) -> str:
    """The Markdown report (see module docstring)."""
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
        rank_by = study.get("rank_by", "miou_best")
        params = _varying_params(trials)
        ranked = sorted((t for t in trials if _finite(t.get(rank_by)) is not None),
                        key=lambda t: -t[rank_by])[:10]
        out += [f"## Sweep: top {len(ranked)} trials by `{rank_by}`", ""]
        out += [_md_table(["rank", "trial_id", "variant", "seed", "status", rank_by,
                           "miou_final", *params],
                          [[i + 1, t["trial_id"], t["variant"], t["seed"], trial_outcome(t),
                            _fmt_value(t[rank_by]), _fmt_value(t.get("miou_final")),
                            *[_fmt_value(t["config"].get(p)) for p in params]]
                           for i, t in enumerate(ranked)]), ""]
        importances = _optuna_importances(study_dir, study)
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


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_ablation(rows: Sequence[dict], path: str) -> None:
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
                v = _finite(r.get("miou"))
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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    pts = [(t["config"].get(param), t[metric]) for t in trials
           if _finite(t.get(metric)) is not None and t["config"].get(param) is not None]
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


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def build_results(study_dir: str | os.PathLike) -> dict[str, Any]:
    """(Re)build Parquet tables, plots and ``report.md`` from the study's files.

    Returns ``{"trials_parquet", "metrics_parquet", "report_md": path, "plots": [paths],
    "report": markdown text, "n_trials": int}``.
    """
    study_dir = os.fspath(study_dir)
    if not os.path.isdir(study_dir):
        raise MissingDataError(f"study directory {study_dir} does not exist: pass the directory "
                               "of a study (it holds study.json and trials/)")
    study = load_study_json(study_dir)
    trials = load_trials(study_dir)
    metrics = load_metrics(study_dir)
    if not trials:
        log.warning("%s: no trials under %s/trials/", study_dir, study_dir)

    trials_path = os.path.join(study_dir, "trials.parquet")
    metrics_path = os.path.join(study_dir, "metrics.parquet")
    pq.write_table(trials_table(trials), trials_path)
    pq.write_table(metrics_table(metrics), metrics_path)

    plots: list[str] = []
    if trials:
        rows = ablation_rows(trials, study)
        plot_ablation(rows, os.path.join(study_dir, "ablation.png"))
        plots.append("ablation.png")
        plot_curves(trials, metrics, [r["variant"] for r in rows],
                    os.path.join(study_dir, "curves.png"))
        plots.append("curves.png")
        if study.get("kind") == "sweep":
            rank_by = study.get("rank_by", "miou_best")
            for param in _varying_params(trials):
                fname = f"sweep_{_safe_filename(param)}.png"
                plot_sweep_param(trials, param, rank_by, os.path.join(study_dir, fname))
                plots.append(fname)

    report = render_report(study_dir, trials, study, plots)
    report_path = os.path.join(study_dir, "report.md")
    write_text_atomic(report_path, report)
    return {
        "trials_parquet": trials_path,
        "metrics_parquet": metrics_path,
        "report_md": report_path,
        "plots": [os.path.join(study_dir, p) for p in plots],
        "report": report,
        "n_trials": len(trials),
    }


@guarded
def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild a study's results and print its report. A missing directory, a corrupt
    ``study.json``/``trial.json``/``metrics.jsonl`` or an unwritable directory is one
    ``error:`` line naming the file, exit code 2."""
    parser = argparse.ArgumentParser(
        prog="python -m ctt.tune.results",
        description="Rebuild trials.parquet, metrics.parquet, report.md and plots of a study.")
    parser.add_argument("study_dir", help="study directory (holds trials/ and study.json)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not os.path.isdir(args.study_dir):
        what = "is not a directory" if os.path.exists(args.study_dir) else "does not exist"
        raise MissingDataError(f"study directory {args.study_dir} {what}: pass the directory "
                               "of a study (it holds study.json and trials/)")
    try:
        out = build_results(args.study_dir)
    except UserError:
        raise
    except (PermissionError, IsADirectoryError, NotADirectoryError) as e:
        # the reader succeeded; the outputs (Parquet, plots, report.md) could not be written
        raise UserError(f"cannot write results to {e.filename or args.study_dir} "
                        f"({e.strerror}): make the study directory writable") from e
    print(out["report"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
