"""Sweeps (ctt/tune/study.py run_sweep, studies/voc_sweep.py): Optuna's record of every trial,
one definition of "best", deterministic failures not retried, --resume with changed flags.

The end-to-end test runs the smoke sweep (3 trials of 6 iterations, one at a time) on an
in-process loopback Ray, with faults injected by claim order: the first trial to start gets a
NaN batch at step 4, the second a config value the config refuses; the third runs normally.
Afterwards the Optuna sqlite copied into the study directory is read directly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
optuna = pytest.importorskip("optuna")

import pyarrow.parquet as pq  # noqa: E402
from fault_trainable import faulty_trainable  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402

from ctt.config import get_preset  # noqa: E402
from ctt.tune import study as study_mod  # noqa: E402
from ctt.tune.schedulers import ERROR_ATTR, TUNE_TRIAL_ID_ATTR  # noqa: E402
from ctt.tune.study import (  # noqa: E402
    StudyOptions,
    _domain_text,
    init_ray,
    resume_differences,
    sweep_step_offset,
    tpe_startup_trials,
)

ROOT = Path(__file__).resolve().parents[1]
ITERS = 6  # cli.SMOKE_OVERRIDES: warm-up 2, eval every 3


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_sweep_{name}", ROOT / "studies" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- no Ray --------------------------------------------------------------------------------

def test_resume_differences_lists_changed_flags_and_ignores_harmless_ones():
    old = {"name": "s", "kind": "sweep", "num_samples": 16, "scheduler": "optuna-median",
           "space": {"method.tau_h": "Float(0.05, 0.5, LogUniform base=10)"},
           "options": {"resume": False, "address": None, "verbose": 1, "max_failures": 2,
                       "overrides": {"optim.iters": 6}, "storage": "out"},
           "base_config": {"optim.iters": 6}, "command": ["a"], "created": 1.0,
           "env": {"x": 1}, "resumed": [{"time": 2.0}]}
    same = {**old, "options": {**old["options"], "resume": True, "address": "auto",
                               "verbose": 2, "storage": "./out"},
            "command": ["b"], "created": 3.0, "env": {"x": 2}}
    same.pop("resumed")
    assert resume_differences(old, same) == []
    changed = {**same, "num_samples": 20, "scheduler": "asha",
               "space": {**old["space"], "method.tau_l": "Float(0.1, 1.0, LogUniform base=10)"},
               "options": {**same["options"], "max_failures": 0,
                           "overrides": {"optim.iters": 6, "method.lambda_u": 2.0}},
               "new_field": 1}
    assert resume_differences(old, changed) == [
        "num_samples: 16 -> 20",
        "options.max_failures: 2 -> 0",
        "options.overrides.method.lambda_u: '(unset)' -> 2.0",
        "scheduler: 'optuna-median' -> 'asha'",
        "space.method.tau_l: '(unset)' -> 'Float(0.1, 1.0, LogUniform base=10)'",
    ]


def test_sweep_helpers():
    assert [tpe_startup_trials(n) for n in (1, 3, 16, 64)] == [3, 3, 4, 16]
    tiny = get_preset("tiny")
    assert sweep_step_offset(tiny) == tiny.method.warmup_iters > 0
    assert sweep_step_offset(tiny.override({"method.warmup_iters": 0})) == 0
    assert sweep_step_offset(tiny.override({"method.warmup_iters": tiny.optim.iters})) == 0
    # a stable text (the repr holds an address), different for different domains
    assert _domain_text(tune.loguniform(1e-4, 0.1)) == _domain_text(tune.loguniform(1e-4, 0.1))
    assert "LogUniform" in _domain_text(tune.loguniform(1e-4, 0.1))
    assert _domain_text(tune.uniform(0, 1)) != _domain_text(tune.uniform(0, 2))
    assert _domain_text(tune.choice(["a", "b"])) == "choice(['a', 'b'])"


def test_sweep_refuses_a_metric_it_cannot_rank_before_anything_runs(tmp_path, capsys):
    assert load_script("voc_sweep").main(["--smoke-test", "--storage", str(tmp_path),
                                          "--metric", "mIoU"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --metric 'mIoU': a sweep maximises a val mIoU"), err
    assert "miou, miou/student0" in err
    assert list(tmp_path.iterdir()) == []


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
def faulty_sweep(tmp_path_factory):
    """(study dir, argv, stdout) of ``voc_sweep.py --smoke-test`` with faults by claim order."""
    storage = tmp_path_factory.mktemp("sweep")
    claims = tmp_path_factory.mktemp("claims")
    argv = ["--smoke-test", "--storage", str(storage), "--out", "faulty", "--max-concurrent",
            "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTT_OPTUNA_DIR", str(tmp_path_factory.mktemp("optuna")))
        started = not ray.is_initialized()
        init_ray(StudyOptions(name="tests", num_cpus=2))
        mp.setattr(study_mod, "train_ctt", claiming_trainable(str(claims)))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert load_script("voc_sweep").main(argv) == 0
        yield storage / "faulty", argv, out.getvalue()
        if started:
            ray.shutdown()


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


def test_confirm_mean_and_std_match_statistics():
    import statistics

    values = [31.5, 33.25, 30.0]
    assert study_mod._mean_std(values) == pytest.approx(
        (statistics.mean(values), statistics.stdev(values)))
    assert study_mod._mean_std([2.0]) == (2.0, None)
    assert study_mod._mean_std([]) == (None, None)
    assert study_mod.confirm_seed_list(0, 3) == [1, 2, 3]


def _confirm_study(rows):
    """An in-memory Optuna study of ``(state, final, {step: value})`` trials."""
    import optuna

    study = optuna.create_study(direction="maximize")
    for state, final, curve in rows:
        t = study.ask()
        for step, v in curve.items():
            t.report(v, step)
        study.tell(t, final if state == TrialState.COMPLETE else None, state=state)
    return study


@pytest.mark.parametrize("top", [1, 2, 3, 5, 8])
def test_confirm_candidates_top_up_with_pruned_trials_by_last_value(top):
    nan = float("nan")
    rows = [
        (TrialState.PRUNED, None, {200: 30.0, 400: 31.0}),         # 0: last 31.0 @400
        (TrialState.COMPLETE, 35.0, {200: 30.0, 1800: 35.0}),      # 1
        (TrialState.PRUNED, None, {200: 32.5}),                    # 2: last 32.5 @200
        (TrialState.FAIL, None, {200: 40.0}),                      # 3: never a candidate
        (TrialState.COMPLETE, 33.0, {1800: 33.0}),                 # 4
        (TrialState.PRUNED, None, {200: 31.0, 400: nan}),          # 5: NaN ignored: 31.0 @200
        (TrialState.PRUNED, None, {}),                             # 6: no value: not ranked
        (TrialState.PRUNED, None, {200: 29.0, 400: 31.0}),         # 7: ties 0 and 5 on value
    ]
    got = [(t.number, v, step)
           for t, v, step in study_mod.confirm_candidates(_confirm_study(rows), top)]
    # slow reference: finished trials by final value, then pruned ones by their last finite
    # value, ties to the one that got further, then the earlier trial
    finished = sorted(((i, r[1], None) for i, r in enumerate(rows)
                       if r[0] == TrialState.COMPLETE), key=lambda x: -x[1])
    pruned = []
    for i, (state, _, curve) in enumerate(rows):
        finite = {k: v for k, v in curve.items() if v == v}
        if state == TrialState.PRUNED and finite:
            last = max(finite)
            pruned.append((i, finite[last], last))
    pruned.sort(key=lambda x: (-x[1], -x[2], x[0]))
    expected = (finished + pruned)[:top] if top > len(finished) else finished[:top]
    assert got == expected
    if top == 5:
        assert [n for n, _, _ in got] == [1, 4, 2, 0, 7]  # 0 and 7 both 31.0 @400: 0 first


def test_confirm_report_marks_a_pruned_candidate():
    from ctt.tune.report import render_confirm

    cand = {"rank": 2, "label": "ctt-top2", "trial_id": "t2", "search_seed": 0,
            "search_value": 31.03, "search_state": "PRUNED", "search_step": 1200,
            "confirm_mean": 34.0, "confirm_std": 0.5, "confirm_n": 3, "confirm_failed": 0,
            "confirm_seeds": [1, 2, 3]}
    done = {**cand, "rank": 1, "label": "ctt-top1", "trial_id": "t1", "search_value": 35.2,
            "search_state": "COMPLETE", "search_step": 2000, "confirm_mean": 33.0}
    text = "\n".join(render_confirm({"metric": "miou", "top": 2, "seeds": [1, 2, 3],
                                     "candidates": [done, cand],
                                     "winner": {**cand, "test_n": 0}}))
    assert "| 2 | ctt-top2 | t2 | 31.03 [pruned, step 1200] (0) | 34.00 ± 0.50 | 3 |" in text
    assert "| 1 | ctt-top1 | t1 | 35.2 (0) |" in text
    assert "its search-time value was 31.03 [pruned, step 1200] on one seed" in text


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


# --- a shared warm-up --------------------------------------------------------------------

def test_sweep_warmup_plan_shares_only_when_nothing_sampled_acts_during_it():
    from ctt.config import apply_variant
    from ctt.tune.space import contrast_space, ctt_space
    from ctt.tune.study import sweep_warmup_plan

    base = apply_variant(get_preset("tiny"), "ctt")
    share, why = sweep_warmup_plan(base, ctt_space())
    assert not share and why.startswith("sampled method.ema_decay acts during the warm-up")
    assert sweep_warmup_plan(base, contrast_space()) == (
        True, "no sampled parameter acts during the 200-iteration warm-up: one warm-up at the "
        "search seed, forked by every trial")
    assert not sweep_warmup_plan(base, contrast_space(), fork=False)[0]
    for acting in ("optim.lr", "method.bank_size", "method.pairs", "data.crop_size"):
        share, why = sweep_warmup_plan(base, {**contrast_space(), acting: tune.choice([1, 2])})
        assert not share and acting in why, (acting, why)
    no_warmup = (apply_variant(get_preset("tiny"), "supervised"),
                 base.override({"method.warmup_iters": 0}),
                 base.override({"method.warmup_iters": base.optim.iters}))
    for cfg in no_warmup:
        assert sweep_warmup_plan(cfg, contrast_space()) == (
            False, "the variant has no supervised warm-up to share")


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
        tmp_path, monkeypatch):
    """``studies/voc_contrast_sweep.py`` as written (smoke size): one warm-up trial in its own
    experiment, published under warmup/, forked by every search trial; the same seeded sweep
    with ``--no-fork`` (each trial from step 0) gives every sampled config the same curve."""
    monkeypatch.setenv("CTT_OPTUNA_DIR", str(tmp_path / "optuna"))
    started = not ray.is_initialized()
    init_ray(StudyOptions(name="tests", num_cpus=2))
    try:
        argv = ["--smoke-test", "--storage", str(tmp_path), "--iters", "9",
                "--confirm-top", "0", "--max-concurrent", "1"]
        script = load_script("voc_contrast_sweep")
        with contextlib.redirect_stdout(io.StringIO()):
            assert script.main([*argv, "--out", "shared"]) == 0
            assert script.main([*argv, "--out", "own", "--no-fork"]) == 0
    finally:
        if started:
            ray.shutdown()
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
