"""ctt.tune.results and the modules it composes (layout, tables, stats, report, plots): the
paired t-test against scipy, tables from hand-made study files, strict and lenient readers, and
one small real Ray Tune study (with StudyLoggerCallback) rebuilt into Parquet, report and plots."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.stats

from ctt.metric_names import METRIC_NAMES
from ctt.tune import layout, tables
from ctt.tune.report import summary_table
from ctt.tune.results import build_results, main
from ctt.tune.stats import paired_t_test
from ctt.tune.tables import TRIAL_COLUMNS

# ------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [
    ([53.0, 57.0], [50.0, 53.0]),                       # n = 2, df = 1
    ([61.2, 60.1, 63.0], [60.0, 60.5, 61.0]),
    ([1.0, 2.0, 3.0, 4.0, 5.5], [1.1, 1.7, 3.4, 3.3, 5.0]),
    (list(np.linspace(40, 60, 12)), list(np.linspace(40, 60, 12)[::-1])),
    ([70.0, 70.1, 70.2, 70.3], [10.0, 10.0, 10.1, 10.2]),  # tiny p
])
def test_paired_t_test_matches_scipy_ttest_rel(a, b):
    ref = scipy.stats.ttest_rel(a, b)
    mean, t, p = paired_t_test(a, b)
    assert mean == pytest.approx(float(np.mean(np.subtract(a, b))), rel=1e-12)
    assert t == pytest.approx(ref.statistic, rel=1e-10)
    assert p == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-300)


def test_paired_t_test_by_hand_for_two_pairs():
    """Independent of scipy: differences (3, 4) give t = 3.5 / (sd / sqrt 2) = 7, and Student's
    t with one degree of freedom is the Cauchy distribution: p = 1 - 2 atan(|t|) / pi."""
    mean, t, p = paired_t_test([53.0, 57.0], [50.0, 53.0])
    assert mean == 3.5 and t == pytest.approx(7.0, rel=1e-12)
    assert p == pytest.approx(1 - 2 * math.atan(7.0) / math.pi, rel=1e-10)
    assert paired_t_test([50.0, 53.0], [53.0, 57.0])[1] == pytest.approx(-7.0)  # a - b, signed


def test_paired_t_test_edge_cases(recwarn):
    assert math.isnan(paired_t_test([1.0], [0.0])[2])
    assert paired_t_test([1.0, 2.0], [0.0, 1.0])[1:] == (math.inf, 0.0)
    mean, t, p = paired_t_test([1.0, 2.0], [1.0, 2.0])
    assert mean == 0.0 and math.isnan(t) and p == 1.0
    assert not recwarn.list  # zero spread is handled before scipy, which would warn
    with pytest.raises(ValueError, match="3 values in a but 2 in b"):
        paired_t_test([1.0, 2.0, 3.0], [1.0, 2.0])


# ------------------------------------------------------------------------------------------
# tables from hand-written study files
# ------------------------------------------------------------------------------------------


def write_trial(root, tid, variant, seed, status, records, config=None, **fields):
    d = root / "trials" / tid
    d.mkdir(parents=True)
    cfg = {"method.lambda_h": 0.1, "method.mix": "classmix", "optim.iters": 4,
           "run.seed": seed, "variant": variant, "seed": seed}
    cfg.update(config or {})
    info = {"trial_id": tid, "variant": variant, "seed": seed, "status": status,
            "error": None, "pruned": False, "config": cfg}
    info.update(fields)
    (d / "trial.json").write_text(json.dumps(info))
    with open(d / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"trial_id": tid, **r}) + "\n")


def test_build_results_dedupes_types_and_interrupted_trials(tmp_path):
    write_trial(tmp_path, "a_0", "supervised", 0, "RUNNING",  # interrupted, summary missing
                [{"step": 2, "miou": 10.0, "node_ip": "n1"},
                 {"step": 4, "miou": 12.0},
                 {"step": 4, "miou": 13.0, "loss/hc": 0.5}])  # replayed after resume
    write_trial(tmp_path, "b_0", "cross", 0, "TERMINATED",
                [{"step": 4, "miou": 20.0, "custom/extra": 1}],
                config={"method.lambda_h": 1, "method.mix": 0.5},  # int vs float; str vs float
                step=4, miou_final=20.0, miou_best=20.0, wall_s=3.0, node_id="n2")
    (tmp_path / "trials" / "b_0" / "metrics.jsonl").open("a").write('{"step": 6, "mi')  # torn
    out = build_results(tmp_path)

    trials = pq.read_table(out["trials_parquet"])
    assert trials.column_names == ["method.lambda_h", "method.mix", "optim.iters", "run.seed",
                                   *TRIAL_COLUMNS]
    assert trials.schema.field("method.lambda_h").type == pa.float64()
    assert trials.schema.field("method.mix").type == pa.string()
    assert trials.column("method.mix").to_pylist() == ["classmix", "0.5"]
    assert trials.schema.field("optim.iters").type == pa.int64()
    rows = {r["trial_id"]: r for r in trials.to_pylist()}
    assert rows["a_0"]["status"] == "RUNNING" and rows["a_0"]["step"] == 4
    assert rows["a_0"]["miou_final"] == 13.0 and rows["a_0"]["miou_best"] == 13.0
    assert rows["a_0"]["node_id"] == "n1" and rows["a_0"]["wall_s"] is None

    metrics = pq.read_table(out["metrics_parquet"])
    assert metrics.column_names == ["trial_id", "step", "miou", "loss/hc", "custom/extra"]
    assert all(metrics.schema.field(c).type == pa.float64() for c in metrics.column_names[2:])
    assert metrics.to_pylist() == [
        {"trial_id": "a_0", "step": 2, "miou": 10.0, "loss/hc": None, "custom/extra": None},
        {"trial_id": "a_0", "step": 4, "miou": 13.0, "loss/hc": 0.5, "custom/extra": None},
        {"trial_id": "b_0", "step": 4, "miou": 20.0, "loss/hc": None, "custom/extra": 1.0}]
    assert "RUNNING 1" in out["report"] and "1 running" in out["report"]


def test_ablation_table_order_delta_and_exclusions(tmp_path):
    finals = {("supervised", 0): 50.0, ("supervised", 1): 52.0, ("supervised", 2): 51.0,
              ("ctt", 0): 55.0, ("ctt", 1): 55.5, ("ctt", 2): 57.0}
    for (variant, seed), v in finals.items():
        write_trial(tmp_path, f"{variant}_{seed}", variant, seed, "TERMINATED",
                    [{"step": 2, "miou": v - 1}, {"step": 4, "miou": v}],
                    step=4, miou_final=v, miou_best=v)
    write_trial(tmp_path, "ctt_3", "ctt", 3, "ERROR", [], error="loss is NaN")
    write_trial(tmp_path, "ctt_4", "ctt", 4, "TERMINATED", [{"step": 2, "miou": 1.0}],
                pruned=True, step=2, miou_final=1.0, miou_best=1.0)
    (tmp_path / "study.json").write_text(json.dumps({"name": "abl", "variants": ["ctt",
                                                                                "supervised"]}))
    rows = tables.ablation_rows(tables.load_trials(tmp_path), tables.load_study_json(tmp_path))
    assert [r["variant"] for r in rows] == ["ctt", "supervised"]
    ctt = rows[0]
    assert ctt["seeds"] == 3 and ctt["excluded"] == {"ERROR": 1, "PRUNED": 1}
    assert ctt["final_mean"] == pytest.approx(np.mean([55.0, 55.5, 57.0]))
    assert ctt["final_std"] == pytest.approx(np.std([55.0, 55.5, 57.0], ddof=1))
    ref = scipy.stats.ttest_rel([55.0, 55.5, 57.0], [50.0, 52.0, 51.0])
    assert ctt["delta"] == pytest.approx(np.mean([5.0, 3.5, 6.0]))
    assert ctt["p"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert math.isnan(rows[1]["delta"])

    report = build_results(tmp_path)["report"]
    assert "# Study report: abl" in report
    assert (f"| ctt | 3 | 1 error, 1 pruned | 55.83 ± {np.std([55, 55.5, 57], ddof=1):.2f} |"
            in report)
    ci = ref.confidence_interval(0.95)
    # the only comparison of this study: Holm's p of a family of one is the p itself
    assert (f"| +4.83 (n=3) | [{ci.low:+.2f}, {ci.high:+.2f}] | {ref.pvalue:.3g} | "
            f"{ref.pvalue:.3g} |" in report)
    assert "| supervised | 3 | - | 51.00 ± 1.00 |" in report and "(baseline)" in report
    assert "loss is NaN" in report  # excluded-trials table
    table = summary_table(tmp_path)
    assert table.splitlines()[0].split() == ["variant", "seeds", "miou_final", "Δ", "vs",
                                             "supervised", "95%", "CI", "p", "p", "Holm"]
    assert "ctt" in table.splitlines()[2] and "+2 excl." in table and "+4.83" in table
    assert f"[{ci.low:+.2f}, {ci.high:+.2f}]" in table.splitlines()[2]


def test_report_header_names_the_machine(tmp_path):
    from ctt.envinfo import environment

    write_trial(tmp_path, "t0", "supervised", 0, "TERMINATED", [{"step": 4, "miou": 1.0}])
    env = environment()
    env["cpu"] = {"model": "Test CPU 9000", "flags": ["avx2", "avx512f"],
                  "torch_capability": "AVX512", "isa_env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}
    (tmp_path / "study.json").write_text(json.dumps({
        "name": "m", "env": env, "base_config": {"run.num_threads": 1}}))
    report = build_results(tmp_path)["report"]
    assert (f"- CPU: Test CPU 9000, {env['cpu_count']} cores; torch CPU kernels AVX512; "
            "ISA flags avx2 avx512f; ONEDNN_MAX_CPU_ISA=AVX2\n") in report
    assert (f"- environment: torch {env['versions']['torch']}, 1 torch thread(s) per trial, "
            f"GPU {env['cuda']}, commit `{env['git_commit']}`\n") in report
    del env["cpu"]  # a study.json written before the CPU was recorded
    (tmp_path / "study.json").write_text(json.dumps({"name": "m", "env": env}))
    report = build_results(tmp_path)["report"]
    assert "- CPU:" not in report and "- environment: torch" in report


def test_default_order_puts_supervised_first(tmp_path):
    for tid, variant in [("t0", "ctt"), ("t1", "self"), ("t2", "supervised")]:
        write_trial(tmp_path, tid, variant, 0, "TERMINATED", [{"step": 4, "miou": 1.0}])
    rows = tables.ablation_rows(tables.load_trials(tmp_path), {})
    assert [r["variant"] for r in rows] == ["supervised", "ctt", "self"]
    assert all(math.isnan(r["p"]) for r in rows)  # one seed each: no test possible
    assert "n/a" in build_results(tmp_path)["report"]


def test_sweep_report_top_trials_importances_and_plots(tmp_path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = np.random.default_rng(0)
    scores = {}
    # seeded: an unseeded sampler made the importances (and so this test) vary between runs
    ostudy = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                 direction="maximize",
                                 sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(8):
        ot = ostudy.ask({"method.lambda_h": optuna.distributions.FloatDistribution(0.01, 1.0,
                                                                                  log=True),
                         "method.mix": optuna.distributions.CategoricalDistribution(
                             ["classmix", "cutmix"])})
        lam, mix = ot.params["method.lambda_h"], ot.params["method.mix"]
        score = 50 + 10 * lam + (2 if mix == "classmix" else 0) + rng.normal() * 0.1
        ostudy.tell(ot, score)
        scores[i] = score
        write_trial(tmp_path, f"s_{i}", "ctt", 0, "TERMINATED", [{"step": 4, "miou": score}],
                    config={"method.lambda_h": lam, "method.mix": mix})
    (tmp_path / "study.json").write_text(json.dumps({"name": "sw", "kind": "sweep"}))
    out = build_results(tmp_path)
    report = out["report"]
    assert "## Sweep: top 8 trials by `miou_best`" in report
    top = max(scores, key=scores.get)
    assert f"| 1 | s_{top} |" in report
    assert "method.lambda_h | method.mix |" in report
    assert "## Parameter importances (Optuna, PedAnovaImportanceEvaluator)" in report
    assert "From the 8 trials that ran to the end" in report
    # a sweep compares no variants: its outcome instead of a one-row ablation table
    assert "## Ablation" not in report and "## Search" in report
    assert "8 search trials on seed 0: 8 ran to the end, 0 pruned" in report
    for name in ("ablation.png", "curves.png", "sweep_method.lambda_h.png",
                 "sweep_method.mix.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_sweep_report_with_one_finished_trial_and_pruned_ones(tmp_path):
    """The full-size voc_sweep.py's outcome (1 finished, the rest pruned): no equal-share
    importances, pruned trials not listed as exclusions, compute share and step shown."""
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                 direction="maximize")
    dist = {"method.lambda_h": optuna.distributions.FloatDistribution(0.01, 1.0, log=True)}
    for i, (step, state) in enumerate([(8, "TERMINATED"), (4, "PRUNED"), (2, "PRUNED")]):
        ot = ostudy.ask(dist)
        ostudy.tell(ot, 40.0 - i if state == "TERMINATED" else None,
                    state=optuna.trial.TrialState.COMPLETE if state == "TERMINATED"
                    else optuna.trial.TrialState.PRUNED)
        write_trial(tmp_path, f"s_{i}", "ctt", 0, state,
                    [{"step": s, "miou": 30.0 + s - i} for s in range(2, step + 1, 2)],
                    config={**ot.params, "optim.iters": 8})
    (tmp_path / "study.json").write_text(json.dumps({
        "name": "sw", "kind": "sweep", "seeds": [0], "scheduler": "optuna-curve",
        "pruner": {"class": "CurvePruner"}, "base_config": {"optim.iters": 8},
        "rank_by": "miou_final"}))
    report = build_results(tmp_path)["report"]
    assert ("3 search trials on seed 0: 1 ran to the end, 2 pruned, 0 errored or unfinished "
            "(scheduler `optuna-curve`, CurvePruner). They ran 58.3 % of the training "
            "iterations of an unpruned search (3 × 8).") in report  # (8 + 4 + 2) / 24
    assert "Not computed: 1 trial(s) ran to the end" in report
    assert "| parameter | importance |" not in report
    assert "## Excluded trials" not in report  # pruning is the search working
    assert "| 1 | s_0 | ctt | 0 | TERMINATED | 8 | 38 |" in report
    assert "| 2 | s_1 | ctt | 0 | PRUNED | 4 | 33 |" in report
    table = summary_table(tmp_path)  # the end-of-study print: outcome, then the best
    assert table.startswith("3 search trials on seed 0: 1 ran to the end")
    assert table.splitlines()[-1] == "no trial ran to the end"  # study.json has no best yet


def test_cli_prints_report_and_rejects_missing_dir(tmp_path, capsys):
    write_trial(tmp_path, "t0", "supervised", 0, "TERMINATED", [{"step": 4, "miou": 1.0}])
    (tmp_path / "study.json").write_text('{"name": "s", "kind": "ablation"}')
    assert main([str(tmp_path)]) == 0
    assert "# Study report:" in capsys.readouterr().out
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# one real Ray Tune study
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_study(ray_local, tmp_path_factory):
    from ray import tune

    from ctt.tune.callbacks import StudyLoggerCallback

    final = {"supervised": 50.0, "ctt": 53.0}

    # Defined here, not at module level: Ray workers cannot import the test module, and
    # cloudpickle ships a nested function by value.
    def fake_trainable(config):
        if config["variant"] == "broken":
            raise ValueError(f"boom in seed {config['seed']}")
        slope = 2.0 if config["variant"] == "supervised" else 3.0
        base = final[config["variant"]] + slope * config["seed"]
        for step in (2, 4):
            tune.report({"step": step, "miou": base - 4 + step, "miou/student0": base,
                         "loss/total": 1.0 / step, "contrast_on": step > 2,
                         "time/step_s": 0.001})

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    study_dir = tmp_path_factory.mktemp("study")
    (study_dir / "study.json").write_text(json.dumps({"name": "tiny", "kind": "ablation"}))
    param_space = {
        "variant": tune.grid_search(["supervised", "ctt", "broken"]),
        "seed": tune.grid_search([0, 1]),
        "method.ema_decay": 0.99, "method.unsup": "cross", "method.shared_aug": True,
        "optim.iters": 4,
    }
    tuner = tune.Tuner(
        fake_trainable, param_space=param_space,
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(study_dir), name="ray", verbose=0,
                                  callbacks=[StudyLoggerCallback(study_dir)]))
    tuner.fit()
    return study_dir, build_results(study_dir)


def test_ray_study_parquet_schemas(ray_study):
    study_dir, out = ray_study
    trials = pq.read_table(out["trials_parquet"])
    assert trials.column_names == ["method.ema_decay", "method.shared_aug", "method.unsup",
                                   "optim.iters", *TRIAL_COLUMNS]
    types = {f.name: f.type for f in trials.schema}
    assert types["method.ema_decay"] == pa.float64() and types["optim.iters"] == pa.int64()
    assert types["method.shared_aug"] == pa.bool_() and types["method.unsup"] == pa.string()
    assert types["seed"] == pa.int64() and types["pruned"] == pa.bool_()
    assert types["miou_final"] == pa.float64() and types["step"] == pa.int64()
    rows = trials.to_pylist()
    assert len(rows) == 6
    for r in rows:
        if r["variant"] == "broken":
            assert r["status"] == "ERROR" and r["error"] == f"ValueError: boom in seed {r['seed']}"
            assert r["miou_final"] is None and r["step"] is None
        else:
            assert r["status"] == "TERMINATED" and not r["pruned"] and r["error"] is None
            # node_ip as the worker reports it (not always the loopback address we pass).
            assert r["step"] == 4 and r["node_id"] and r["wall_s"] > 0
    detail = json.loads(next((study_dir / "trials").glob("*/trial.json")).read_text())
    assert "config" in detail

    metrics = pq.read_table(out["metrics_parquet"])
    assert metrics.column_names[:2] == ["trial_id", "step"]
    assert [c for c in metrics.column_names if c in METRIC_NAMES] == [
        "miou", "miou/student0", "loss/total", "contrast_on"]
    assert "time/step_s" in metrics.column_names and "time/total_s" in metrics.column_names
    assert metrics.schema.field("miou").type == pa.float64()
    assert metrics.num_rows == 8  # 4 finished trials x 2 steps


def test_ray_study_report_and_plots(ray_study):
    study_dir, out = ray_study
    report = (study_dir / "report.md").read_text()
    assert report == out["report"]
    assert "# Study report: tiny" in report and "ERROR 2" in report and "TERMINATED 4" in report
    assert "| supervised | 2 | - | 51.00 ± 1.41 | 51.00 ± 1.41 | (baseline) |" in report
    ref = scipy.stats.ttest_rel([53.0, 56.0], [50.0, 52.0])
    p, ci = ref.pvalue, ref.confidence_interval(0.95)
    assert (f"| ctt | 2 | - | 54.50 ± 2.12 | 54.50 ± 2.12 | +3.50 (n=2) | "
            f"[{ci.low:+.2f}, {ci.high:+.2f}] | {p:.3g} | {p:.3g} |" in report)
    assert "| broken | 0 | 2 error | n/a | n/a | n/a | n/a | n/a | n/a |" in report
    assert "- `broken` − `supervised`: not testable: no seed where both ran" in report
    for name in ("ablation.png", "ablation_diff.png", "curves.png"):
        assert (study_dir / name).stat().st_size > 1000
    assert sorted(os.listdir(study_dir / "tb")) == sorted(
        f"{v}_seed{s}_{r['trial_id']}" for r in pq.read_table(out["trials_parquet"]).to_pylist()
        for v, s in [(r["variant"], r["seed"])])


# ------------------------------------------------------------------------------------------
# corrupt result files: the study's callback reads leniently, results strictly
# ------------------------------------------------------------------------------------------


def test_metrics_reader_lenient_for_the_driver_strict_for_results(tmp_path, caplog):
    from ctt.errors import ResultsError

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "miou": 1}\n{"step": "x", "miou": 2}\n{"step": 4.0}\n'
                    '{"step": 6, "mi')  # a bad step, an integral float, a torn last line
    recs = layout.read_metrics_jsonl(str(path))
    assert [r["step"] for r in recs] == [2, 4] and all(type(r["step"]) is int for r in recs)
    assert "line 2: 'step' must be an integer" in caplog.text
    with pytest.raises(ResultsError, match=r"metrics.jsonl, line 2: 'step' must be an integer"):
        layout.read_metrics_jsonl(str(path), strict=True)
    path.write_text('{"step": 2}\n{"step": 4, "mi')  # only the torn last line: kept going
    assert [r["step"] for r in layout.read_metrics_jsonl(str(path), strict=True)] == [2]
    path.write_text('{"step": 2, "mi\n{"step": 4}\n')  # a broken line before others: corrupt
    with pytest.raises(ResultsError, match=r"metrics.jsonl, line 1 is not valid JSON"):
        layout.read_metrics_jsonl(str(path), strict=True)


def test_json_reader_lenient_for_the_driver_strict_for_results(tmp_path, capsys):
    from ctt.errors import ResultsError

    path = tmp_path / "study.json"
    path.write_text('{"name": ')
    assert layout.read_json(str(path)) is None
    with pytest.raises(ResultsError, match=r"study.json is not valid JSON \(.* at line 1"):
        layout.read_json(str(path), strict=True)
    write_trial(tmp_path, "t0", "supervised", 0, "TERMINATED", [{"step": 4, "miou": 1.0}])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path} is not valid JSON (Expecting value at line 1, column 10): " \
                  "repair or delete the file\n"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    with pytest.raises(ResultsError):
        main([str(tmp_path), "--debug"])


def test_sweep_summary_names_the_confirmed_winner_else_the_best(tmp_path):
    write_trial(tmp_path, "s_0", "ctt", 0, "TERMINATED", [{"step": 8, "miou": 35.0}])
    info = {"name": "sw", "kind": "sweep", "best": {"trial_id": "s_0", "val_miou": 35.0}}
    (tmp_path / "study.json").write_text(json.dumps(info))
    assert summary_table(tmp_path).splitlines()[-1] == "best: trial s_0, val 35 (final, one seed)"
    info["confirm"] = {"winner": {"label": "ctt-top2", "trial_id": "s_1", "search_value": 31.0,
                                  "search_state": "PRUNED", "search_step": 1000,
                                  "confirm_mean": 34.5, "confirm_std": 0.25, "confirm_n": 3}}
    (tmp_path / "study.json").write_text(json.dumps(info))
    assert summary_table(tmp_path).splitlines()[-1] == (
        "winner: ctt-top2 (search trial s_1), confirmed 34.50 ± 0.25 over 3 fresh seed(s); "
        "search value 31 [pruned, step 1000]")
