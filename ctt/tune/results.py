"""Study results: the files the driver wrote -> Parquet tables, a Markdown report and plots.

Everything is rebuilt from the study directory (:mod:`ctt.tune.layout`: ``study.json``,
``trials/<id>/trial.json`` and ``metrics.jsonl``), so it works for finished, interrupted and
resumed studies alike. Outputs, all in the study directory: ``trials.parquet`` and
``metrics.parquet`` (:mod:`ctt.tune.tables`), ``report.md`` (:mod:`ctt.tune.report`, with the
statistics of :mod:`ctt.tune.stats`), ``ablation.png``, ``curves.png`` and, for sweeps,
``sweep_<param>.png`` (:mod:`ctt.tune.plots`).

CLI: ``python -m ctt.tune.results STUDY_DIR`` rebuilds everything and prints the report.
``STUDY_DIR`` may be a study's URI in storage (``s3://bucket/prefix/name``, a query string such
as ``?endpoint_override=host:port&scheme=http`` included): its driver-side files are read into a
temporary directory (:mod:`ctt.tune.storage`), the results rebuilt there and the changed ones
written back, so this also works on a study that is still running.

This module imports neither Ray nor Optuna at module level (Optuna only for a sweep's
importances), so results can be rebuilt on a machine without a Ray cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from ctt.errors import MissingDataError, UserError, guarded
from ctt.fileio import atomic_write_text
from ctt.tune.layout import METRICS_PARQUET, REPORT_MD, STUDY_JSON, TRIALS_PARQUET
from ctt.tune.plots import write_plots
from ctt.tune.report import render_report
from ctt.tune.storage import StudySync, is_uri
from ctt.tune.tables import (
    ablation_rows,
    load_metrics,
    load_study_json,
    load_trials,
    metrics_table,
    trials_table,
)

log = logging.getLogger(__name__)


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

    trials_path = os.path.join(study_dir, TRIALS_PARQUET)
    metrics_path = os.path.join(study_dir, METRICS_PARQUET)
    pq.write_table(trials_table(trials), trials_path)
    pq.write_table(metrics_table(metrics), metrics_path)
    plots = write_plots(study_dir, trials, metrics, study, ablation_rows(trials, study))
    report = render_report(study_dir, trials, study, plots)
    report_path = os.path.join(study_dir, REPORT_MD)
    atomic_write_text(report_path, report)
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
    parser.add_argument("study_dir", help="study directory (holds trials/ and study.json), "
                        "or its URI in storage (s3://bucket/prefix/name)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if is_uri(args.study_dir):
        print(_results_from_storage(args.study_dir))
        return 0
    if not os.path.isdir(args.study_dir):
        what = "is not a directory" if os.path.exists(args.study_dir) else "does not exist"
        raise MissingDataError(f"study directory {args.study_dir} {what}: pass the directory "
                               "of a study (it holds study.json and trials/)")
    if not os.path.isfile(os.path.join(args.study_dir, STUDY_JSON)):
        # results are a study's; writing tables and a report into another directory (a
        # single run's, or any) would only add files there
        if os.path.isfile(os.path.join(args.study_dir, "config.json")):
            raise UserError(f"{args.study_dir} is a single ctt.train run, not a study (no "
                            "study.json): its metrics are its metrics.jsonl and tb/; pass the "
                            "directory of a study")
        raise MissingDataError(f"{args.study_dir} holds no study (no study.json): pass the "
                               "directory of a study (it holds study.json and trials/)")
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


def _results_from_storage(uri: str) -> str:
    """Rebuild the results of the study at ``uri`` (its driver-side files, pulled into a
    temporary directory) and write the changed ones back; returns the report. A storage that
    refuses the write-back is a warning: the report is still printed."""
    with tempfile.TemporaryDirectory(prefix="ctt-results-") as tmp:
        sync = StudySync(tmp, uri)
        try:
            sync.pull()
        except OSError as e:
            raise MissingDataError(f"cannot read the study at {uri}: {e}") from e
        if not os.path.isfile(os.path.join(tmp, STUDY_JSON)):
            raise MissingDataError(f"{uri} holds no study (no study.json): pass the URI of a "
                                   "study, <storage>/<name>")
        out = build_results(tmp)
        # the report names the study's place: the URI, not this temporary copy
        report = out["report"].replace(f"`{tmp}`", f"`{uri}`")
        atomic_write_text(out["report_md"], report)
        try:
            sync.push()
        except OSError as e:
            print(f"warning: the rebuilt results were not written back to {uri}: {e}",
                  file=sys.stderr)
        return report


if __name__ == "__main__":
    sys.exit(main())
