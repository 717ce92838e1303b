"""Sweeps run on Ray (ctt/tune/sweep.py run_sweep, studies/voc_sweep.py,
voc_contrast_sweep.py): Optuna's record of every trial, one definition of "best", the
confirmation on fresh seeds, deterministic failures not retried, --resume with changed flags,
one shared warm-up forked by every trial. (Their parts without Ray: tests/test_tune_sweep.py.)

The end-to-end test runs the smoke sweep (3 trials of 6 iterations, one at a time) on an
in-process loopback Ray, with faults injected by claim order: the first trial to start gets a
NaN batch at step 4, the second a config value the config refuses; the third runs normally.
Afterwards the Optuna sqlite copied into the study directory is read directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
optuna = pytest.importorskip("optuna")

import pyarrow.parquet as pq  # noqa: E402
from fault_trainable import faulty_trainable  # noqa: E402
from helpers import load_script  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from ctt.tune import experiment  # noqa: E402
from ctt.tune.optuna_search import ERROR_ATTR, TUNE_TRIAL_ID_ATTR  # noqa: E402

ITERS = 6  # cli.SMOKE_OVERRIDES: warm-up 2, eval every 3


# --- a faulty smoke sweep on Ray -----------------------------------------------------------

def claiming_trainable(claim_dir: str):
    """``train_ctt`` where the first trial to start gets a NaN batch at step 4 and the second
    an invalid ``method.mix`` (ConfigError); the rest run unchanged. Defined inside a function
    so cloudpickle ships it by value (workers cannot import tests/)."""
    nan = faulty_trainable(nan_at={"ctt": 4})

    def train(config):
        from ctt.tune import trainable

        for k, kind in enumerate(("nan", "config")):
            try:
                os.close(os.open(os.path.join(claim_dir, f"claim-{k}"),
                                 os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            if kind == "nan":
                return nan(config)
            return trainable.train_ctt({**config, "method.mix": "bogus"})
        return trainable.train_ctt(config)

    return train


@pytest.fixture(scope="module")
def faulty_sweep(ray_local, tmp_path_factory):
    """(study dir, argv, stdout) of ``voc_sweep.py --smoke-test`` with faults by claim order."""
    storage = tmp_path_factory.mktemp("sweep")
    claims = tmp_path_factory.mktemp("claims")
    argv = ["--smoke-test", "--storage", str(storage), "--out", "faulty", "--max-concurrent",
            "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experiment, "train_ctt", claiming_trainable(str(claims)))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert load_script("voc_sweep").main(argv) == 0
        yield storage / "faulty", argv, out.getvalue()


def _optuna_trials(study_dir: Path) -> dict[str, optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{study_dir / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return {t.user_attrs[TUNE_TRIAL_ID_ATTR]: t for t in study.trials}


@pytest.mark.slow
def test_sweep_optuna_record_matches_every_trial(faulty_sweep):
    study_dir, _, _ = faulty_sweep
    trials = {t["trial_id"]: t for t in pq.read_table(study_dir / "trials.parquet").to_pylist()}
    optuna_trials = _optuna_trials(study_dir)
    assert set(optuna_trials) == set(trials) and len(trials) == 3
    states = sorted(ft.state.name for ft in optuna_trials.values())
    assert states == ["COMPLETE", "FAIL", "FAIL"]
    errors = sorted(ft.user_attrs[ERROR_ATTR] for ft in optuna_trials.values()
                    if ft.state == TrialState.FAIL)
    assert errors[0].startswith("ConfigError: method.mix: invalid value 'bogus'"), errors
    assert "non-finite" in errors[1], errors
    for trial_id, ft in optuna_trials.items():
        t = trials[trial_id]
        info = json.loads((study_dir / "trials" / trial_id / "trial.json").read_text())
        if ft.state == TrialState.FAIL:
            # deterministic: failed at once, never retried, the same reason in both records
            assert t["status"] == "ERROR" and info["num_failures"] == 0
            assert t["error"] == ft.user_attrs[ERROR_ATTR]
        else:
            # COMPLETE with the ranking value: the final val mIoU at the full budget
            assert t["status"] == "TERMINATED" and t["step"] == ITERS
            assert ft.value == t["miou_final"]
            assert max(ft.intermediate_values) == ITERS - 2  # steps count from the warm-up


@pytest.mark.slow
def test_sweep_best_is_one_definition_and_its_checkpoint_is_tested(faulty_sweep):
    study_dir, _, _ = faulty_sweep
    info = json.loads((study_dir / "study.json").read_text())
    (complete,) = [(tid, ft) for tid, ft in _optuna_trials(study_dir).items()
                   if ft.state == TrialState.COMPLETE]
    best = info["best"]
    assert best["trial_id"] == complete[0] and best["optuna_trial"] == complete[1].number
    assert best["val_miou"] == complete[1].value
    assert best["ranking"].startswith("final: the trial's val miou")
    # the checkpoint evaluated on the test split is the final one, where val_miou was measured
    assert best["step"] == best["checkpoint_step"] == ITERS
    meta = json.loads((Path(best["checkpoint"]) / "trial_meta.json").read_text())
    assert meta["step"] == ITERS
    assert 0.0 <= best["test"]["miou"] <= 100.0
    assert info["step_offset"] == 2 and info["grace_period"] == 3
    assert info["tpe_startup_trials"] == 3


@pytest.mark.slow
def test_sweep_confirms_the_best_configs_on_fresh_seeds(faulty_sweep):
    study_dir, _, _ = faulty_sweep
    info = json.loads((study_dir / "study.json").read_text())
    confirm = json.loads((study_dir / "confirm.json").read_text())
    assert info["confirm"] == confirm
    assert (info["confirm_top"], info["confirm_seeds"]) == (1, 1)  # --smoke-test caps both
    (cand,) = confirm["candidates"]  # one trial completed: one candidate
    best = info["best"]
    assert (cand["rank"], cand["label"], cand["trial_id"]) == (1, "ctt-top1", best["trial_id"])
    assert cand["search_value"] == best["val_miou"] and cand["search_seed"] == 0
    assert confirm["seeds"] == cand["confirm_seeds"] == [1]  # a fresh seed, not the search's
    assert cand["confirm_n"] == 1 and cand["confirm_failed"] == 0
    assert cand["confirm_mean"] == cand["confirm_values"][0] and cand["confirm_std"] is None
    assert confirm["winner"]["label"] == "ctt-top1"
    assert confirm["winner"]["confirm_mean"] == cand["confirm_mean"]
    # the winner's confirmation run, evaluated on the test split
    assert confirm["winner"]["test_n"] == 1 and 0.0 <= confirm["winner"]["test_mean"] <= 100.0
    # the sampled parameters are carried over, only the seed changes
    (trial_json,) = (study_dir / "confirm" / "trials").glob("*/trial.json")
    rerun = json.loads(trial_json.read_text())
    searched = json.loads((study_dir / "trials" / best["trial_id"] / "trial.json").read_text())
    assert rerun["status"] == "TERMINATED" and rerun["step"] == ITERS
    assert rerun["miou_final"] == cand["confirm_mean"]
    assert rerun["config"]["run.seed"] == rerun["seed"] == 1
    assert {k: v for k, v in rerun["config"].items() if k not in ("run.seed", "seed", "variant")} \
        == {k: v for k, v in searched["config"].items() if k not in ("run.seed", "seed",
                                                                      "variant")}
    # confirmation runs are not search trials
    assert len(pq.read_table(study_dir / "trials.parquet")) == 3
    # report.md: the winner by its confirmed figures, search-time value beside them
    report = (study_dir / "report.md").read_text()
    assert "## Confirmed winner: top 1 configs on 1 fresh seeds" in report
    assert f"Winner: `ctt-top1` (search trial `{best['trial_id']}`), confirmed miou " in report
    assert f"| 1 | ctt-top1 | {best['trial_id']} | " in report
    assert "Test split: miou " in report
    assert "trials by `miou_final`" in report  # the top table ranks by the one "best"


@pytest.mark.slow
def test_sweep_resume_with_changed_flags_is_refused(faulty_sweep, capsys):
    study_dir, argv, _ = faulty_sweep
    before = (study_dir / "study.json").read_text()
    script = load_script("voc_sweep")
    assert script.main([*argv, "--resume", "--scheduler", "asha", "--max-failures", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --resume of {study_dir} with flags that differ"), err
    assert "options.max_failures: 2 -> 0" in err and "scheduler: 'optuna-curve' -> 'asha'" in err
    assert "\n" not in err
    assert (study_dir / "study.json").read_text() == before  # nothing recorded


def _curves(study_dir: Path) -> dict[tuple, list[tuple[int, float]]]:
    """Sampled params -> the trial's (step, miou) records."""
    out = {}
    for info in (study_dir / "trials").glob("*/trial.json"):
        trial = json.loads(info.read_text())
        params = tuple(sorted((k, v) for k, v in trial["config"].items()
                              if k in ("method.tau_h", "method.lambda_u", "method.tau_p")))
        rows = [json.loads(line) for line in (info.parent / "metrics.jsonl").open()]
        out[params] = [(r["step"], r["miou"]) for r in rows]
    return out


@pytest.mark.slow
def test_contrast_sweep_forks_one_warmup_and_its_trials_equal_their_runs_from_scratch(
        ray_local, tmp_path, monkeypatch):
    """``studies/voc_contrast_sweep.py`` as written (smoke size): one warm-up trial in its own
    experiment, published under warmup/, forked by every search trial; the same seeded sweep
    with ``--no-fork`` (each trial from step 0) gives every sampled config the same curve."""
    argv = ["--smoke-test", "--storage", str(tmp_path), "--iters", "9",
            "--confirm-top", "0", "--max-concurrent", "1"]
    script = load_script("voc_contrast_sweep")
    with contextlib.redirect_stdout(io.StringIO()):
        assert script.main([*argv, "--out", "shared"]) == 0
        assert script.main([*argv, "--out", "own", "--no-fork"]) == 0
    shared, own = tmp_path / "shared", tmp_path / "own"
    assert json.loads((shared / "study.json").read_text())["warmup"]["shared"] is True
    assert json.loads((own / "study.json").read_text())["warmup"] == {
        "shared": False, "why": "--no-fork: each trial runs its own warm-up"}
    assert (shared / "warmup" / "seed-0" / "state.pt").is_file()
    assert not (own / "warmup").exists() and not (own / "ray-warmup").exists()
    warm_trials = [p for p in (shared / "ray-warmup").iterdir() if p.is_dir()]
    assert len(warm_trials) == 1  # one warm-up, not a trial of the study
    forks = {json.loads(p.read_text())["config"].get("_fork_from")
             for p in (shared / "trials").glob("*/trial.json")}
    assert forks == {str(shared / "warmup" / "seed-0")}
    curves, scratch = _curves(shared), _curves(own)
    assert len(curves) == 3 and curves.keys() == scratch.keys()
    for params, curve in curves.items():
        assert [s for s, _ in curve] == [3, 6, 9], curve
        assert curve == scratch[params], params
