"""One owner for every name in a study directory (ctt/tune/layout.py), and what a resume on a new
head brings back from storage: the driver's files, never a Tune experiment or a checkpoint."""

from __future__ import annotations

import ast
from pathlib import Path

from ctt.tune import layout
from ctt.tune.storage import STORAGE_ONLY, StudySync, syncable

TUNE_DIR = Path(layout.__file__).parent

# The names a study writes at its top level that mean nothing else (``ray``, ``warmup`` and
# ``confirm`` are also a phase, a variant and a study.json key, so they are not searched for).
OWNED = {layout.SWEEP_WARMUP_EXPERIMENT, layout.CONFIRM_EXPERIMENT, layout.WARMUP_RECORD,
         layout.WARMUP_FAILED, layout.CONFIRM_JSON, layout.STUDY_JSON, layout.TRIALS_PARQUET,
         layout.METRICS_PARQUET, layout.REPORT_MD, layout.OPTUNA_JOURNAL, layout.OPTUNA_DB}


def test_study_path_names_are_spelled_only_in_layout():
    """No other study module writes one of layout.py's names as a string literal (a second
    spelling is how ``ray-warmup/`` went missing from the names the sync skips)."""
    found = []
    for path in sorted(TUNE_DIR.glob("*.py")):
        if path.name == "layout.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef,
                                           ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value in OWNED and id(node) not in docstrings):
                found.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert not found, "study path names spelled outside ctt/tune/layout.py: " + ", ".join(found)


def test_every_tune_experiment_stays_in_storage():
    experiments = {layout.EXPERIMENT, layout.SWEEP_WARMUP_EXPERIMENT, layout.CONFIRM_EXPERIMENT}
    assert experiments | {layout.WARMUP} == set(STORAGE_ONLY)
    for name in STORAGE_ONLY:
        assert not syncable(f"{name}/x/experiment_state.json")
    assert syncable("trials/abc/trial.json") and syncable("study.json")


def test_resume_pull_brings_driver_files_and_no_experiment(tmp_path):
    """A sweep's storage holds its shared warm-up's Tune experiment (``ray-warmup/``, with a
    checkpoint) beside the study's own: pulling the study onto a new head copies the driver's
    files only."""
    remote = tmp_path / "bucket" / "sweep"
    files = {
        "study.json": "{}", "trials/t1/trial.json": "{}", "trials/t1/metrics.jsonl": "",
        "tb/run/events.out.tfevents.1": "x", "optuna.journal": "",
        "ray/experiment_state.json": "{}", "ray/t1/checkpoint_000001/state.pt": "w",
        "ray-warmup/experiment_state.json": "{}",
        "ray-warmup/warmup_t0/checkpoint_000000/state.pt": "w",
        "ray-confirm/experiment_state.json": "{}", "warmup/seed-0/state.pt": "w",
    }
    for rel, text in files.items():
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_text(text)
    local = tmp_path / "staging" / "sweep"
    n = StudySync(local, f"file://{remote}").pull()
    pulled = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert pulled == ["optuna.journal", "study.json", "tb/run/events.out.tfevents.1",
                      "trials/t1/metrics.jsonl", "trials/t1/trial.json"]
    assert n == len(pulled)
