"""What every finished study holds (docs/studies.md#the-study-directory), checked by the
scenarios that run studies (tests/scenarios/test_study_runs.py, test_interrupted_runs.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
from tb_events import hparams_records

from ctt.config import get_preset
from ctt.tune.layout import tb_run_name

FLAT_KEYS = list(get_preset("tiny").to_flat())
TRIAL_COLUMNS = ["trial_id", "variant", "seed", "status", "error", "pruned", "step", "wall_s",
                 "miou_final", "miou_best", "node_id"]
METRIC_NAMES = ["step", "miou", "miou/student0", "miou/student1", "miou/teacher0",
                "miou/teacher1", "loss/total", "loss/sup", "loss/unsup", "loss/hc", "loss/lc",
                "pl/weight", "n/anchors_hc", "n/anchors_lc", "bank/fill", "contrast_on"]


def read_json(path: str | Path) -> dict:
    """A JSON file of the study (study.json, trial.json, warmup.json, ...)."""
    return json.loads(Path(path).read_text())


def hparams_sessions(logdir: Path) -> list[dict[str, object]]:
    """HParams session-start hparams of every event file in ``logdir``, keyed by the columns'
    display names (the config keys; the leading columns' names carry a rank prefix)."""
    records = hparams_records(logdir)
    display = {h.name: h.display_name or h.name for r in records if r.HasField("experiment")
               for h in r.experiment.hparam_infos}
    return [{display.get(k, k): getattr(x, x.WhichOneof("kind"))
             for k, x in hp.session_start_info.hparams.items()}
            for hp in records if hp.HasField("session_start_info")]


def check_study_outputs(study_dir: Path, n_trials: int, kind: str) -> list[dict]:
    """The files every finished study holds (docs/studies.md#the-study-directory); returns the
    trials."""
    table = pq.read_table(study_dir / "trials.parquet")
    for col in FLAT_KEYS + TRIAL_COLUMNS:
        assert col in table.column_names, f"trials.parquet lacks {col!r}"
    trials = table.to_pylist()
    assert len(trials) == n_trials
    assert len({t["trial_id"] for t in trials}) == n_trials
    metrics = pq.read_table(study_dir / "metrics.parquet")
    for col in ["trial_id", *METRIC_NAMES]:
        assert col in metrics.column_names, f"metrics.parquet lacks {col!r}"
    assert set(metrics.column("trial_id").to_pylist()) == {t["trial_id"] for t in trials}

    report = (study_dir / "report.md").read_text()
    for t in trials:
        if t["status"] == "TERMINATED" and kind == "sweep":
            # the top-trials table: the trial's row with its variant, step and mIoU
            assert re.search(rf"^\| \d+ \| {t['trial_id']} \| {t['variant']} \|.*\d+\.\d+",
                             report, re.M), report
        elif t["status"] == "TERMINATED":
            # a markdown table row naming the variant, with its mIoU as a number
            assert re.search(rf"^\| {t['variant']} \|.*\d+\.\d+", report, re.M), report
    info = read_json(study_dir / "study.json")
    assert info["kind"] == kind
    assert {"torch", "ray", "optuna", "python"} <= set(info["env"]["versions"])
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", info["env"]["git_commit"])

    for t in trials:
        sessions = hparams_sessions(study_dir / "tb" / tb_run_name(t["variant"], t["seed"],
                                                                    t["trial_id"]))
        assert len(sessions) == 1, t["trial_id"]
        hp = sessions[0]
        flat = set(FLAT_KEYS) - {"run.seed"}  # shown as `seed`
        assert flat <= set(hp), flat - set(hp)
        assert hp["variant"] == t["variant"] and hp["seed"] == t["seed"]
        assert not any(k.startswith("_") for k in hp)  # _fork_from, _until stay out
        assert hp["data.dataset"] == t["data.dataset"]
    return trials
