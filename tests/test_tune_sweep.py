"""Sweeps without running one (ctt/tune/sweep.py's parts, studies/voc_sweep.py):
--resume with changed flags, the TPE and step-offset helpers, a metric a sweep cannot rank,
the confirmation of the best configs (mean and std, candidates, report), and when a sweep
shares one warm-up. The faulty smoke sweep on Ray: tests/scenarios/test_sweep_runs.py.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
optuna = pytest.importorskip("optuna")

from helpers import load_script  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402

from ctt.config import get_preset  # noqa: E402
from ctt.tune.confirm import confirm_candidates, confirm_seed_list, mean_and_std  # noqa: E402
from ctt.tune.resume import resume_differences  # noqa: E402
from ctt.tune.sweep import (  # noqa: E402
    domain_text,
    sweep_step_offset,
    sweep_warmup_plan,
    tpe_startup_trials,
)


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


def test_resume_of_a_finished_sweep_compares_flags_not_results():
    """A finished sweep's study.json also holds what it found (``best``, ``confirm`` with its
    candidates, wall times): none of that is a flag, so the same command with --resume is not
    refused; a dropped override still is."""
    flags = {"name": "s", "kind": "sweep", "num_samples": 4, "confirm_top": 0,
             "options": {"resume": False, "overrides": {"optim.iters": 6}}}
    finished = {**flags, "best": {"trial_id": "t1"}, "wall_s_runs": [12.0],
                "confirm": {"candidates": [{"rank": 1, "confirm_mean": 31.0}], "winner": None}}
    again = {**flags, "options": {**flags["options"], "resume": True}}
    assert resume_differences(finished, again) == []
    dropped = {**again, "options": {"resume": True, "overrides": {}}}
    assert resume_differences(finished, dropped) == [
        "options.overrides.optim.iters: 6 -> '(unset)'"]


def test_sweep_helpers():
    assert [tpe_startup_trials(n) for n in (1, 3, 16, 64)] == [3, 3, 4, 16]
    tiny = get_preset("tiny")
    assert sweep_step_offset(tiny) == tiny.method.warmup_iters > 0
    assert sweep_step_offset(tiny.override({"method.warmup_iters": 0})) == 0
    assert sweep_step_offset(tiny.override({"method.warmup_iters": tiny.optim.iters})) == 0
    # a stable text (the repr holds an address), different for different domains
    assert domain_text(tune.loguniform(1e-4, 0.1)) == domain_text(tune.loguniform(1e-4, 0.1))
    assert "LogUniform" in domain_text(tune.loguniform(1e-4, 0.1))
    assert domain_text(tune.uniform(0, 1)) != domain_text(tune.uniform(0, 2))
    assert domain_text(tune.choice(["a", "b"])) == "choice(['a', 'b'])"


def test_sweep_refuses_a_metric_it_cannot_rank_before_anything_runs(tmp_path, capsys):
    assert load_script("voc_sweep").main(["--smoke-test", "--storage", str(tmp_path),
                                          "--metric", "mIoU"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --metric 'mIoU': a sweep maximises a val mIoU"), err
    assert "miou, miou/student0" in err
    assert list(tmp_path.iterdir()) == []

# --- confirming the best configs ------------------------------------------------------

def test_confirm_mean_and_std_match_statistics():
    import statistics

    values = [31.5, 33.25, 30.0]
    assert mean_and_std(values) == pytest.approx(
        (statistics.mean(values), statistics.stdev(values)))
    assert mean_and_std([2.0]) == (2.0, None)
    assert mean_and_std([]) == (None, None)
    assert confirm_seed_list(0, 3) == [1, 2, 3]


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
           for t, v, step in confirm_candidates(_confirm_study(rows), top)]
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

# --- a shared warm-up --------------------------------------------------------------------

def test_sweep_warmup_plan_shares_only_when_nothing_sampled_acts_during_it():
    from ctt.config import apply_variant
    from ctt.tune.space import contrast_space, ctt_space

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


def test_optuna_storage_password_comes_from_the_environment_not_the_command_line():
    """A URL with a password is refused on the command line (ps shows it) and taken from
    $CTT_OPTUNA_STORAGE, which no process listing shows."""
    from ctt.errors import UserError
    from ctt.tune.cli import check_no_secrets

    url = "postgresql://ctt:hunter2@127.0.0.1/optuna"
    check_no_secrets("studies_out", url, given=[])  # from the environment
    check_no_secrets("studies_out", "postgresql://ctt@127.0.0.1/optuna",
                     given=["--optuna-storage", "postgresql://ctt@127.0.0.1/optuna"])
    with pytest.raises(UserError, match=r"ctt:\*\*\*@") as err:
        check_no_secrets("studies_out", url, given=["--optuna-storage", url])
    assert "hunter2" not in str(err.value)
    check_no_secrets("s3://bucket/p?endpoint_override=127.0.0.1:9000&scheme=http", None, [])
