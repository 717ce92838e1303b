"""The study directory: where every file of a study lives, and reading and writing the per-trial
files. The driver's callback (:mod:`ctt.tune.callbacks`, the writer) and the results
(:mod:`ctt.tune.results`, the reader) both go through this module::

    <study_dir>/study.json                       resolved study definition
    <study_dir>/trials/<trial_id>/trial.json     flat config, variant, seed, status, summary
    <study_dir>/trials/<trial_id>/metrics.jsonl  one record per reported result
    <study_dir>/tb/<variant>_seed<seed>_<trial_id>/  TensorBoard scalars + one HParams session
    <study_dir>/plan.json                        (ablations) rounds, looks, spend, stop reason
    <study_dir>/optuna.journal                   (sweeps) Optuna's journal storage, live
    <study_dir>/optuna.db                        (sweeps) its sqlite snapshot at the end
    <study_dir>/trials.parquet, metrics.parquet, report.md, *.png   built by ctt.tune.results

``metrics.jsonl`` lines are written (``append_record``, ``truncate_records``) and decoded by
:mod:`ctt.fileio`: one format, which ``ctt.train`` writes too. Readers come in two strengths:
lenient (``strict=False``, the driver's callback, which must not die mid-study: a corrupt file
or line is skipped with a warning) and strict (``strict=True``, building results: it raises
:class:`~ctt.errors.ResultsError` naming the file and line, since a report built without it
would silently lose part of the study).

This module imports neither Ray nor Optuna. All file access is here and in :mod:`ctt.fileio`, so
a ``pyarrow.fs`` (S3/GCS) version replaces only these functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ctt.errors import ResultsError
from ctt.fileio import TEXT_KEYS, as_int, atomic_write_text, decode_record

log = logging.getLogger(__name__)

STUDY_JSON = "study.json"
TRIAL_JSON = "trial.json"
METRICS_JSONL = "metrics.jsonl"
# A sweep's Optuna study, written as it runs, and its sqlite snapshot at the end.
OPTUNA_JOURNAL = "optuna.journal"
OPTUNA_DB = "optuna.db"
TRIALS_PARQUET = "trials.parquet"
METRICS_PARQUET = "metrics.parquet"
REPORT_MD = "report.md"
TRIALS_DIR = "trials"
TB_DIR = "tb"
# Tune experiments: the study's trials, a sweep's shared warm-up, a sweep's confirmation runs.
EXPERIMENT = "ray"
SWEEP_WARMUP_EXPERIMENT = "ray-warmup"
CONFIRM_EXPERIMENT = "ray-confirm"
# Shared warm-up checkpoints, one directory per seed (warmup/seed-<s>/), and the driver's
# records of which warm-ups are done and which failed for good.
WARMUP = "warmup"
WARMUP_RECORD = "warmup.json"
WARMUP_FAILED = "warmup-failed.json"
# An ablation's plan record: the seeds each round released, the verdicts at each look, the
# spend against --budget and why the study stopped (ctt.tune.adaptive).
PLAN_RECORD = "plan.json"
# A sweep's confirmation runs: their trials/ and tb/, and the summary naming the winner.
CONFIRM_DIR = "confirm"
CONFIRM_JSON = "confirm.json"
# Top-level directories that Tune and the trials write straight to the study's storage
# (checkpoints, experiment state): never synced by the driver, never pulled on a resume.
STORAGE_ONLY = (EXPERIMENT, SWEEP_WARMUP_EXPERIMENT, CONFIRM_EXPERIMENT, WARMUP)
# Keys of a metrics.jsonl record that are not metrics: the text fields and two flags.
NON_METRIC_KEYS = TEXT_KEYS | {"step", "pruned"}


# --- paths --------------------------------------------------------------------------------------

def study_json_path(study_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(study_dir), STUDY_JSON)


def trial_dir(study_dir: str | os.PathLike, trial_id: str) -> str:
    """Directory holding one trial's ``trial.json`` and ``metrics.jsonl``."""
    return os.path.join(os.fspath(study_dir), "trials", trial_id)


def trial_json_path(study_dir: str | os.PathLike, trial_id: str) -> str:
    return os.path.join(trial_dir(study_dir, trial_id), TRIAL_JSON)


def metrics_jsonl_path(study_dir: str | os.PathLike, trial_id: str) -> str:
    return os.path.join(trial_dir(study_dir, trial_id), METRICS_JSONL)


def tb_run_name(variant: str, seed: Any, trial_id: str) -> str:
    """Readable, unique TensorBoard run name: ``<variant>_seed<seed>_<trial_id>``."""
    safe_variant = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(variant))
    return f"{safe_variant}_seed{seed}_{trial_id}"


def tb_dir(study_dir: str | os.PathLike, run_name: str) -> str:
    return os.path.join(os.fspath(study_dir), "tb", run_name)


def list_trial_ids(study_dir: str | os.PathLike) -> list[str]:
    root = os.path.join(os.fspath(study_dir), "trials")
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


# --- reading ------------------------------------------------------------------------------------

def _read_text(path: str, *, strict: bool) -> str | None:
    """The file's text, or None if it does not exist. With ``strict``, an undecodable or
    unreadable file is a :class:`ResultsError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        if not strict:
            raise
        raise ResultsError(f"{path} is not UTF-8 text (byte offset {e.start}): the file is "
                           "corrupt; restore or delete it") from None
    except IsADirectoryError:
        if not strict:
            raise
        raise ResultsError(f"{path} is a directory, not a file: remove it") from None
    except PermissionError as e:
        if not strict:
            raise
        raise ResultsError(f"cannot read {path} ({e.strerror}): fix its permissions") from None


def read_json(path: str, *, strict: bool = False) -> dict | None:
    """The JSON object in ``path`` (``study.json``, ``trial.json``), or None if the file does
    not exist. A corrupt file is None with a warning, or with ``strict`` a
    :class:`ResultsError` naming the file."""
    text = _read_text(path, strict=strict)
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


def read_metrics_jsonl(path: str, *, strict: bool = False) -> list[dict]:
    """All records of a metrics.jsonl file, in file order (possibly several per step); each
    record's ``step`` is an int and non-finite values are floats again.

    A truncated last line (driver killed mid-write) is skipped with a warning. Any other
    malformed line, or a ``step`` that is not an integer, is skipped with a warning, or with
    ``strict=True`` raises :class:`ResultsError` naming the file and line.
    """
    text = _read_text(path, strict=strict)
    if not text:
        return []
    records = []
    lines = text.splitlines()
    last = max((i for i, ln in enumerate(lines, 1) if ln.strip()), default=0)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = decode_record(line)
        except json.JSONDecodeError as e:
            if strict and lineno != last:
                raise ResultsError(f"{path}, line {lineno} is not valid JSON ({e.msg}): repair "
                                   "or delete the line") from None
            log.warning("%s:%d: skipping a malformed line (interrupted write?)", path, lineno)
            continue
        if not (isinstance(rec, dict) and "step" in rec):
            continue
        step = as_int(rec["step"])
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


def read_history(path: str, *, strict: bool = False) -> list[dict]:
    """A trial's metrics.jsonl as its history: one record per step, sorted by step."""
    return dedupe_by_step(read_metrics_jsonl(path, strict=strict))


def finite(x: Any) -> float | None:
    """A record or table value as a finite float; None for text, None, NaN and infinities."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def summarise_metrics(records: Sequence[dict]) -> dict[str, Any]:
    """The summary fields of ``trial.json``, from a trial's history (:func:`read_history`).

    Returns ``step`` (last step or None), ``miou_final`` (last finite ``miou``), ``miou_best``
    (max finite ``miou``), ``wall_s`` (largest ``time/total_s``), ``node_id`` (last
    ``node_ip``, else ``hostname``), ``error`` (last reported ``error`` string) and
    ``pruned_flag`` (any record reported ``pruned: True``).
    """
    mious = [v for v in (finite(r.get("miou")) for r in records) if v is not None]
    walls = [v for v in (finite(r.get("time/total_s")) for r in records) if v is not None]
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


# --- writing (the driver's callback; results write only their outputs) -----------------------

def write_json(path: str | os.PathLike, value: Mapping[str, Any]) -> None:
    """Replace a JSON file (``trial.json``, ``study.json``) atomically; values JSON cannot hold
    become text."""
    atomic_write_text(path, json.dumps(value, indent=2, default=str) + "\n")

