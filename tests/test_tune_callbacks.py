"""StudyLoggerCallback driven by hand with fake trials (no Ray actors); event files parsed with
a small TFRecord reader and the protobuf classes shipped in tensorboardX."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil

import pytest

pytest.importorskip("ray")

from tb_events import hparams_records, read_events  # noqa: E402

from ctt.tune.callbacks import (  # noqa: E402
    StudyLoggerCallback,
    clean_result,
    hparams_columns,
)
from ctt.tune.layout import metrics_jsonl_path, read_metrics_jsonl, tb_run_name  # noqa: E402

ITERS = 4


def flat_config(variant: str, seed: int, **extra) -> dict:
    """A Tune param space point: flat config keys + variant + seed."""
    cfg = {
        "method.unsup": "none" if variant == "supervised" else "cross",
        "method.pairs": 1 if variant == "supervised" else 2,
        "method.ema_decay": 0.99,
        "method.shared_aug": False,
        "optim.iters": ITERS,
        "run.seed": seed,
        "variant": variant,
        "seed": seed,
    }
    cfg.update(extra)
    return cfg


class FakeTrial:
    """The attributes of ray.tune.experiment.Trial that the callback reads."""

    def __init__(self, trial_id: str, config: dict, error_file: str | None = None):
        self.trial_id = trial_id
        self.config = config
        self.error_file = error_file
        self.pickled_error_file = None
        self.num_failures = 1 if error_file else 0
        self.node_ip = "10.0.0.9"

    def __str__(self) -> str:
        return f"fake_{self.trial_id}"


def result(step: int, miou: float | None = None, **extra) -> dict:
    """A result dict as Ray delivers it: our metrics plus Ray's bookkeeping keys."""
    r = {"step": step, "loss/total": 1.0 / step, "loss/sup": 0.5, "contrast_on": step > 2,
         "time/step_s": 0.01, "training_iteration": step // 2, "time_total_s": 0.5 * step,
         "timestamp": 123, "pid": 42, "date": "today", "done": False, "config": {"a": 1},
         "node_ip": "10.0.0.7", "hostname": "nodeA", "time_this_iter_s": 0.5,
         "experiment_tag": "x", "trial_id": "ignored"}
    if miou is not None:
        r["miou"] = miou
    r.update(extra)
    return r


def scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] in write order, honouring TensorBoard's purge-on-restart rule."""
    out: dict[str, list[tuple[int, float]]] = {}
    for _, ev in read_events(logdir):
        if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
            # TensorBoard drops earlier points at or after the restart step.
            out = {k: [(s, v) for s, v in pts if s < ev.step] for k, pts in out.items()}
        for v in ev.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def hparams_session(logdir: str) -> dict:
    """The experiment, session start/end of a run dir (asserting there is exactly one);
    ``hparams`` keyed by the columns' display names (the keys), in the experiment's order."""
    found: dict[str, list] = {"experiment": [], "start": [], "end": []}
    for data in hparams_records(logdir):
        if data.HasField("experiment"):
            found["experiment"].append(data.experiment)
        if data.HasField("session_start_info"):
            found["start"].append(data.session_start_info)
        if data.HasField("session_end_info"):
            found["end"].append(data.session_end_info)
    assert all(len(v) == 1 for v in found.values()), {k: len(v) for k, v in found.items()}
    ssi, exp = found["start"][0], found["experiment"][0]
    assert sorted(ssi.hparams) == sorted(h.name for h in exp.hparam_infos)
    hp = {}
    for info in exp.hparam_infos:
        val = ssi.hparams[info.name]
        hp[info.display_name] = getattr(val, val.WhichOneof("kind"))
    return {"hparams": hp,
            "metrics": [m.name.tag for m in found["experiment"][0].metric_infos],
            "end_status": found["end"][0].status}


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture()
def study(tmp_path):
    """Four trials through the callback: finished, pruned, Ray error, reported NaN error."""
    cb = StudyLoggerCallback(tmp_path)
    ok = FakeTrial("t_ok", flat_config("supervised", 0))
    pruned = FakeTrial("t_pruned", flat_config("cross", 0))
    err_file = tmp_path / "error.txt"
    err_file.write_text("Failure # 1 (occurred at 2025-01-01)\nray::f()\n  File x, line 3\n"
                        "ValueError: boom in step 3\n")
    err = FakeTrial("t_err", flat_config("cross", 1), error_file=str(err_file))
    nan = FakeTrial("t_nan", flat_config("cross", 2))
    trials = [ok, pruned, err, nan]
    for t in trials:
        cb.on_trial_start(iteration=0, trials=trials, trial=t)
    cb.on_trial_result(0, trials, ok, result(2, 40.0))
    cb.on_trial_result(0, trials, ok, result(4, 38.0))
    cb.on_trial_result(0, trials, pruned, result(2, 30.0))
    cb.on_trial_result(0, trials, err, result(2))
    cb.on_trial_result(0, trials, nan, result(2, 10.0, error="loss is NaN at step 2"))
    cb.on_trial_complete(0, trials, ok)
    cb.on_trial_complete(0, trials, pruned)
    cb.on_trial_error(0, trials, err)
    cb.on_trial_complete(0, trials, nan)
    cb.on_experiment_end(trials)
    return tmp_path, cb, trials


def test_clean_result_drops_ray_bookkeeping_keeps_metrics_and_node():
    rec = clean_result(result(4, 38.0), "tid")
    assert rec == {"trial_id": "tid", "step": 4, "loss/total": 0.25, "loss/sup": 0.5,
                   "contrast_on": True, "time/step_s": 0.01, "node_ip": "10.0.0.7",
                   "hostname": "nodeA", "miou": 38.0, "time/total_s": 2.0}


def test_metrics_jsonl_and_trial_json(study):
    root, _, _ = study
    lines = read_jsonl(root / "trials" / "t_ok" / "metrics.jsonl")
    assert [r["step"] for r in lines] == [2, 4]
    assert [r["miou"] for r in lines] == [40.0, 38.0]
    assert all(r["trial_id"] == "t_ok" and "timestamp" not in r and "config" not in r
               for r in lines)

    ok = load_json(root / "trials" / "t_ok" / "trial.json")
    assert ok["status"] == "TERMINATED" and ok["pruned"] is False and ok["error"] is None
    assert ok["step"] == 4 and ok["miou_final"] == 38.0 and ok["miou_best"] == 40.0
    assert ok["node_id"] == "10.0.0.7" and ok["wall_s"] == 2.0
    assert ok["variant"] == "supervised" and ok["seed"] == 0
    assert ok["config"] == flat_config("supervised", 0)

    pruned = load_json(root / "trials" / "t_pruned" / "trial.json")
    assert pruned["status"] == "TERMINATED" and pruned["pruned"] is True
    assert pruned["step"] == 2 and pruned["miou_best"] == 30.0

    err = load_json(root / "trials" / "t_err" / "trial.json")
    assert err["status"] == "ERROR" and err["pruned"] is False
    assert err["error"] == "ValueError: boom in step 3"
    assert "Failure # 1" in err["error_detail"]
    assert err["miou_final"] is None and err["miou_best"] is None

    nan = load_json(root / "trials" / "t_nan" / "trial.json")
    assert nan["status"] == "ERROR" and nan["error"] == "loss is NaN at step 2"
    assert nan["pruned"] is False  # step 2 < iters, but an error is not a pruning


def test_nonfinite_metrics_written_as_strict_json_and_read_back(tmp_path):
    """The callback writes metrics.jsonl through ctt.fileio's one encoder (the one ctt.train
    uses): NaN/inf as strings any JSON reader accepts; the study reader turns them back."""
    cb = StudyLoggerCallback(tmp_path)
    t = FakeTrial("t1", flat_config("cross", 0))
    cb.on_trial_start(0, [t], t)
    cb.on_trial_result(0, [t], t, result(2, 7.0, **{"loss/hc": float("inf")}))
    cb.on_trial_result(0, [t], t, result(4, float("nan")))
    cb.on_trial_complete(0, [t], t)
    path = metrics_jsonl_path(tmp_path, "t1")
    with open(path) as f:
        strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))
                  for line in f]
    assert strict[0]["loss/hc"] == "inf" and strict[1]["miou"] == "nan"
    back = read_metrics_jsonl(path, strict=True)
    assert back[0]["loss/hc"] == float("inf") and math.isnan(back[1]["miou"])
    info = load_json(tmp_path / "trials" / "t1" / "trial.json")
    assert info["miou_final"] == 7.0 and info["miou_best"] == 7.0  # NaN is no score


def test_trial_json_running_after_start(tmp_path):
    cb = StudyLoggerCallback(tmp_path)
    t = FakeTrial("t1", flat_config("cross", 3))
    cb.on_trial_start(0, [t], t)
    info = load_json(tmp_path / "trials" / "t1" / "trial.json")
    assert info["status"] == "RUNNING" and info["variant"] == "cross" and info["seed"] == 3
    assert info["config"]["method.ema_decay"] == 0.99


def test_explicit_pruned_flag(tmp_path):
    cb = StudyLoggerCallback(tmp_path)
    t = FakeTrial("t1", flat_config("cross", 0, **{"optim.iters": 2}))
    cb.on_trial_start(0, [t], t)
    cb.on_trial_result(0, [t], t, result(2, 5.0, pruned=True))
    cb.on_trial_complete(0, [t], t)
    assert load_json(tmp_path / "trials" / "t1" / "trial.json")["pruned"] is True


def test_tensorboard_scalars_per_trial_dir(study):
    root, _, _ = study
    logdir = root / "tb" / tb_run_name("supervised", 0, "t_ok")
    assert logdir.name == "supervised_seed0_t_ok"
    sc = scalars(str(logdir))
    assert sc["miou"] == [(2, 40.0), (4, 38.0)]
    assert sc["loss/total"] == [(2, 0.5), (4, 0.25)]
    assert sc["contrast_on"] == [(2, 0.0), (4, 1.0)]
    assert sc["time/step_s"][0][0] == 2
    assert sc["miou_best"] == [(4, 40.0)] and sc["miou_final"] == [(4, 38.0)]
    assert "node_ip" not in sc and "step" not in sc
    assert sorted(os.listdir(root / "tb")) == sorted(
        ["supervised_seed0_t_ok", "cross_seed0_t_pruned", "cross_seed1_t_err",
         "cross_seed2_t_nan"])


def test_hparams_same_keys_full_config_every_trial(study):
    root, _, trials = study
    sessions = {}
    for t in trials:
        variant, seed = t.config["variant"], t.config["seed"]
        sessions[t.trial_id] = hparams_session(str(root / "tb" / tb_run_name(variant, seed,
                                                                             t.trial_id)))
    # the flat config without run.seed (= seed), variant/seed/status first
    expected = ["variant", "seed", "status", *sorted(set(flat_config("supervised", 0))
                                                     - {"variant", "seed", "run.seed"})]
    for tid, s in sessions.items():
        assert list(s["hparams"]) == expected, tid
        assert s["metrics"] == ["miou_best", "miou_final"], tid
    ok = sessions["t_ok"]["hparams"]
    assert ok["method.ema_decay"] == pytest.approx(0.99) and ok["method.unsup"] == "none"
    assert ok["method.shared_aug"] is False and ok["seed"] == 0.0
    assert ok["variant"] == "supervised" and ok["status"] == "TERMINATED"
    assert sessions["t_pruned"]["hparams"]["status"] == "PRUNED"
    assert sessions["t_err"]["hparams"]["status"] == "ERROR"
    assert sessions["t_nan"]["hparams"]["status"] == "ERROR"
    # STATUS_SUCCESS = 1, STATUS_FAILURE = 2 in the HParams api proto.
    assert sessions["t_ok"]["end_status"] == 1 and sessions["t_err"]["end_status"] == 2


def test_hparams_metrics_only_where_measured(study):
    """No made-up score: a finished trial has both metrics, a pruned one the best it reached,
    an errored one (with or without an mIoU before the error) neither."""
    root, _, _ = study
    sc = {tid: scalars(str(root / "tb" / name)) for tid, name in [
        ("t_ok", "supervised_seed0_t_ok"), ("t_pruned", "cross_seed0_t_pruned"),
        ("t_err", "cross_seed1_t_err"), ("t_nan", "cross_seed2_t_nan")]}
    assert sc["t_ok"]["miou_best"] == [(4, 40.0)] and sc["t_ok"]["miou_final"] == [(4, 38.0)]
    assert sc["t_pruned"]["miou_best"] == [(2, 30.0)] and "miou_final" not in sc["t_pruned"]
    for tid in ("t_err", "t_nan"):
        assert "miou_best" not in sc[tid] and "miou_final" not in sc[tid], tid
    assert sc["t_nan"]["miou"] == [(2, 10.0)]  # the curve itself is kept


def tensorboard_hparams(tb_root: str) -> tuple[list, dict]:
    """What TensorBoard's own HParams backend serves for ``tb_root``: the experiment's
    columns in display order ``(display_name, differs)`` and per run ``(hparams by display
    name, {metric: value}, session status)``."""
    pytest.importorskip("tensorboard.plugins.hparams.list_session_groups")
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import (
        api_pb2,
        backend_context,
        get_experiment,
        list_session_groups,
    )

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(tb_root)
    mux.Reload()
    tb = base_plugin.TBContext(logdir=tb_root, multiplexer=mux,
                               data_provider=data_provider.MultiplexerDataProvider(mux, tb_root))
    bctx = backend_context.Context(tb)
    exp = get_experiment.Handler(context.RequestContext(), bctx, "", api_pb2.GetExperimentRequest(
        experiment_name="", hparams_limit=1000)).run()
    # the dashboard: a stable sort putting `differs` first (the server sorted by name)
    infos = sorted(exp.hparam_infos, key=lambda h: not h.differs)
    columns = [(h.display_name or h.name, h.differs) for h in infos]
    request = api_pb2.ListSessionGroupsRequest(
        experiment_name="", start_index=0, slice_size=100, allowed_statuses=[0, 1, 2, 3],
        col_params=[api_pb2.ColParams(hparam=h.name, include_in_result=True) for h in infos]
        + [api_pb2.ColParams(metric=m.name, include_in_result=True) for m in exp.metric_infos])
    groups = list_session_groups.Handler(context.RequestContext(), bctx, "", request).run()
    display = {h.name: h.display_name or h.name for h in infos}
    runs = {}
    for g in groups.session_groups:
        hp = {display[k]: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
              for k, v in g.hparams.items()}
        runs[g.name] = (hp, {m.name.tag: m.value for m in g.metric_values},
                        g.sessions[0].status)
    return columns, runs


def test_tensorboard_shows_the_study_columns_first(tmp_path):
    """Read back by TensorBoard's HParams backend: the swept parameters, status, variant and
    seed first (the dashboard shows the first 5 columns by default), internal keys absent,
    metrics only where measured, status filterable."""
    (tmp_path / "study.json").write_text(json.dumps({
        "name": "s", "kind": "sweep", "variant": "cross",
        "space": {"1-method.ema_decay": "loguniform", "method.tau_h": "loguniform"}}))
    cb = StudyLoggerCallback(tmp_path)
    internal = {"_fork_from": str(tmp_path / "warmup" / "checkpoint_000000"), "_until": 2}
    ok = FakeTrial("t_ok", flat_config("cross", 0, **internal, **{"method.tau_h": 0.2}))
    pruned = FakeTrial("t_pr", flat_config("cross", 1, **internal, **{"method.tau_h": 0.3}))
    nan = FakeTrial("t_nan", flat_config("cross", 2, **internal, **{"method.tau_h": 0.4}))
    trials = [ok, pruned, nan]
    for t in trials:
        cb.on_trial_start(0, trials, t)
    cb.on_trial_result(0, trials, ok, result(2, 40.0))
    cb.on_trial_result(0, trials, ok, result(4, 38.0))
    cb.on_trial_result(0, trials, pruned, result(2, 30.0))
    cb.on_trial_result(0, trials, nan, result(2, float("nan"), error="loss is NaN at step 2"))
    for t in trials:
        cb.on_trial_complete(0, trials, t)
    columns, runs = tensorboard_hparams(str(tmp_path / "tb"))
    names = [c[0] for c in columns]
    assert names[:5] == ["method.ema_decay", "method.tau_h", "status", "variant", "seed"]
    assert [c[1] for c in columns] == [True] * 5 + [False] * (len(columns) - 5)
    assert names[5:] == sorted(names[5:])
    assert not any(n.startswith("_") for n in names) and "run.seed" not in names
    by_status = {hp["status"]: (hp, m, st) for hp, m, st in runs.values()}
    assert set(by_status) == {"TERMINATED", "PRUNED", "ERROR"}
    hp, metrics, status = by_status["TERMINATED"]
    assert hp["variant"] == "cross" and hp["seed"] == 0.0 and hp["method.tau_h"] == 0.2
    assert metrics == {"miou_best": 40.0, "miou_final": 38.0} and status == 1
    assert by_status["PRUNED"][1] == {"miou_best": 30.0}
    assert by_status["ERROR"][1] == {} and by_status["ERROR"][2] == 2
    # a discrete domain makes status (and variant) checkbox filters in the dashboard
    from tb_events import hparams_records

    exp = next(r.experiment for r in hparams_records(tmp_path / "tb" / "cross_seed0_t_ok")
               if r.HasField("experiment"))
    domain = {h.display_name: [v.string_value for v in h.domain_discrete.values]
              for h in exp.hparam_infos if h.HasField("domain_discrete")}
    assert domain["status"] == ["TERMINATED", "PRUNED", "ERROR"]
    assert domain["variant"] == ["cross"]


def test_hparams_columns_lead_with_what_the_study_varies():
    # the default sweep space's keys as the logger reads them from study.json
    swept = ["method.ema_decay", "method.tau_h", "method.tau_l", "method.lambda_u",
             "method.lambda_h", "method.lambda_l", "method.tau_p"]
    config = flat_config("ctt", 1, **{**{k: 0.5 for k in swept}, "method.tau_h": 0.3,
                                      "_fork_from": "/abs/warmup", "a.first": 1})
    columns, lead = hparams_columns(config, "ctt", 1, "PRUNED", [*swept, "not.a.key"])
    assert lead == [*swept, "status", "variant", "seed"]
    assert list(columns)[:len(lead)] == lead  # the dashboard's five default columns: swept
    assert columns["method.tau_h"] == 0.3 and columns["status"] == "PRUNED"
    assert columns["seed"] == 1 and columns["variant"] == "ctt"
    rest = list(columns)[len(lead):]
    assert rest == sorted(rest) and "_fork_from" not in columns and "run.seed" not in columns
    # an ablation sweeps nothing: variant and seed are what differ
    columns, lead = hparams_columns(config, "ctt", 1, "TERMINATED")
    assert lead == ["variant", "seed", "status"] == list(columns)[:3]


def test_resume_replays_without_duplicates(study):
    """A trial restarted from its step-2 checkpoint re-reports step 4: files keep one copy."""
    root, cb, _ = study
    ok = FakeTrial("t_ok", flat_config("supervised", 0))
    fresh = StudyLoggerCallback(root)  # a restarted driver has no in-memory state
    fresh.on_trial_start(0, [ok], ok)
    fresh.on_trial_result(0, [ok], ok, result(4, 41.0))
    fresh.on_trial_complete(0, [ok], ok)
    lines = read_jsonl(root / "trials" / "t_ok" / "metrics.jsonl")
    assert [(r["step"], r["miou"]) for r in lines] == [(2, 40.0), (4, 41.0)]
    info = load_json(root / "trials" / "t_ok" / "trial.json")
    assert info["miou_final"] == 41.0 and info["miou_best"] == 41.0
    logdir = root / "tb" / "supervised_seed0_t_ok"
    assert scalars(str(logdir))["miou"] == [(2, 40.0), (4, 41.0)]
    assert len(glob.glob(str(logdir / "*.hparams"))) == 1
    assert hparams_session(str(logdir))["hparams"]["status"] == "TERMINATED"


def test_hooks_never_raise(tmp_path, caplog):
    blocker = tmp_path / "study"
    blocker.write_text("a file where the study directory should be")
    cb = StudyLoggerCallback(blocker)
    t = FakeTrial("t1", flat_config("cross", 0))
    cb.on_trial_start(0, [t], t)
    cb.on_trial_result(0, [t], t, result(2, 1.0))
    cb.on_trial_error(0, [t], t)
    cb.on_trial_complete(0, [t], t)
    assert "StudyLoggerCallback.on_trial_result failed" in caplog.text


def test_callback_pickles_without_open_writers(tmp_path):
    import pickle

    cb = StudyLoggerCallback(tmp_path)
    t = FakeTrial("t1", flat_config("cross", 0))
    cb.on_trial_start(0, [t], t)
    cb.on_trial_result(0, [t], t, result(2, 1.0))
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.study_dir == cb.study_dir and clone._trials == {}
    cb.on_experiment_end([t])


def test_lost_trial_marked_error_on_the_first_step(tmp_path):
    """After a resume, a trial directory the restored experiment lacks and that still says
    RUNNING was lost with the driver: ERROR with LOST_ERROR. Finished ones stay as they were,
    trials Tune holds are left to their hooks, and it happens once per callback."""
    from ctt.tune.callbacks import LOST_ERROR

    first = StudyLoggerCallback(tmp_path)
    kept, lost, done = (FakeTrial(t, flat_config("cross", 0)) for t in ("t_kept", "t_lost",
                                                                         "t_done"))
    for t in (kept, lost, done):
        first.on_trial_start(0, [kept, lost, done], t)
    first.on_trial_result(0, [done], done, result(4, 40.0))
    first.on_trial_complete(0, [done], done)
    resumed = StudyLoggerCallback(tmp_path)
    resumed.on_step_begin(0, [kept])
    info = {t: load_json(tmp_path / "trials" / t / "trial.json")
            for t in ("t_kept", "t_lost", "t_done")}
    assert info["t_lost"]["status"] == "ERROR" and info["t_lost"]["error"] == LOST_ERROR
    assert info["t_lost"]["config"] == flat_config("cross", 0)
    assert info["t_kept"]["status"] == "RUNNING" and info["t_kept"]["error"] is None
    assert info["t_done"]["status"] == "TERMINATED" and info["t_done"]["error"] is None
    resumed.on_trial_start(0, [kept, lost], lost)  # a later trial start is not a lost trial
    resumed.on_step_begin(1, [kept])
    assert load_json(tmp_path / "trials" / "t_lost" / "trial.json")["status"] == "RUNNING"


def _checkpoint_results(root, steps, deleted=()):
    """Ray's own (checkpoint, metrics) records of checkpoints at ``steps``, as a trial
    reports them every 3 steps; the directories of ``deleted`` steps removed afterwards."""
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint

    from ctt.tune.trainable import CHECKPOINT_FILE

    out = []
    for i, step in enumerate(steps):
        d = root / f"checkpoint_{i:06d}"
        d.mkdir()
        (d / CHECKPOINT_FILE).write_bytes(b"state")
        out.append(_TrainingResult(checkpoint=Checkpoint.from_directory(str(d)),
                                   metrics={"step": step, "training_iteration": i + 1,
                                            "miou": float(step % 7)}))
    for step in deleted:
        shutil.rmtree(out[steps.index(step)].checkpoint.path)
    return out


class _RunMetadata:
    def __init__(self, manager):
        self.checkpoint_manager = manager


def _trial_with(results, config):
    from ray.train._internal.checkpoint_manager import _CheckpointManager

    manager = _CheckpointManager(config)
    for r in results:
        manager.register_checkpoint(r)
    trial = FakeTrial("t_ckpt", flat_config("cross", 0))
    trial.run_metadata = _RunMetadata(manager)
    return trial


@pytest.mark.parametrize("scored", [True, False])
def test_checkpoint_repair_resumes_from_the_newest_surviving_checkpoint(tmp_path, scored):
    """The snapshot names a latest checkpoint Tune's retention deleted after it: the trial is
    pointed at the newest kept checkpoint whose state.pt is there, with Ray's bookkeeping
    classes (a Ray upgrade that changes them fails here, not in a user's resume)."""
    from ray.tune import CheckpointConfig

    from ctt.tune.callbacks import CheckpointRepairCallback
    from ctt.tune.trainable import CHECKPOINT_FILE

    config = CheckpointConfig(num_to_keep=3, checkpoint_score_attribute="miou" if scored
                              else None, checkpoint_score_order="max")
    # A kept checkpoint that lost its state.pt (a deletion cut short) is no candidate either.
    results = _checkpoint_results(tmp_path, [3, 6, 9, 12], deleted=[12])
    (tmp_path / "checkpoint_000002" / CHECKPOINT_FILE).unlink()
    trial = _trial_with(results, config)
    kept_before = {r.metrics["step"] for r in trial.run_metadata.checkpoint_manager
                   .best_checkpoint_results}
    assert trial.run_metadata.checkpoint_manager.latest_checkpoint_result.metrics["step"] == 12
    assert CheckpointRepairCallback.repair(trial)
    manager = trial.run_metadata.checkpoint_manager
    survivors = sorted(kept_before - {12, 9})
    assert manager.latest_checkpoint_result.metrics["step"] == survivors[-1]
    assert sorted(r.metrics["step"] for r in manager.best_checkpoint_results) == survivors
    assert all(os.path.isdir(r.checkpoint.path) for r in manager.best_checkpoint_results)
    assert not CheckpointRepairCallback.repair(trial)  # now whole: nothing to do


def test_checkpoint_repair_quietly_forgets_older_checkpoints_deleted_after_the_snapshot(
        tmp_path, caplog):
    """A driver killed after Tune's retention deleted an older kept checkpoint: the latest is
    whole, so the trial resumes from it as named; the gone one is dropped from the bookkeeping
    (Tune would try to delete it again and log an ERROR with a traceback), without a warning."""
    from ray.tune import CheckpointConfig

    from ctt.tune.callbacks import CheckpointRepairCallback

    trial = _trial_with(_checkpoint_results(tmp_path, [3, 6, 9], deleted=[3]),
                        CheckpointConfig(num_to_keep=3))
    assert CheckpointRepairCallback.repair(trial)
    manager = trial.run_metadata.checkpoint_manager
    assert manager.latest_checkpoint_result.metrics["step"] == 9
    assert sorted(r.metrics["step"] for r in manager.best_checkpoint_results) == [6, 9]
    assert "resumes from" not in caplog.text
    assert not CheckpointRepairCallback.repair(trial)


def test_checkpoint_repair_leaves_a_whole_checkpoint_and_starts_over_without_one(tmp_path,
                                                                                  caplog):
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.tune import CheckpointConfig

    from ctt.tune.callbacks import CheckpointRepairCallback

    for sub in ("whole", "gone"):
        (tmp_path / sub).mkdir()
    whole = _trial_with(_checkpoint_results(tmp_path / "whole", [3, 6]),
                        CheckpointConfig(num_to_keep=2))
    before = whole.run_metadata.checkpoint_manager
    CheckpointRepairCallback().on_trial_start(0, [whole], whole)
    assert whole.run_metadata.checkpoint_manager is before
    gone = _trial_with(_checkpoint_results(tmp_path / "gone", [3], deleted=[3]),
                       CheckpointConfig(num_to_keep=1))
    CheckpointRepairCallback().on_trial_start(0, [gone], gone)
    assert gone.run_metadata.checkpoint_manager.latest_checkpoint_result is None
    assert "resumes from the start" in caplog.text
    fresh = FakeTrial("t_new", flat_config("cross", 0))
    fresh.run_metadata = _RunMetadata(_CheckpointManager(CheckpointConfig()))
    assert not CheckpointRepairCallback.repair(fresh)  # no checkpoint yet
