"""The viewers README names, as installed by its `pip install -e '.[viz]'`, read our files.

- ``tensorboard --logdir <study>/tb``: the real console script, on loopback, serves the runs,
  scalars and HParams (experiment + one session per trial) that StudyLoggerCallback writes.
- ``optuna-dashboard sqlite:///<study>/optuna.db``: serves an Optuna sqlite study and its
  trials (the sweep's ``optuna.db`` is the same RDB schema).

Both servers bind 127.0.0.1 and are stopped at the end of each test.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")

from test_tune_callbacks import FakeTrial, flat_config, result  # noqa: E402

from ctt.tune.callbacks import StudyLoggerCallback  # noqa: E402
from ctt.tune.layout import tb_run_name  # noqa: E402

START_S = 60.0


def console_script(name: str) -> str:
    """The venv's console script (next to this interpreter), else the one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed; the README's `pip install -e '.[viz]'` must "
                    "install it (pyproject.toml, extra `viz`)")
    return found


def get_json(url: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture()
def server() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_tensorboard_reads_our_scalars_and_hparams(tmp_path: Path, server) -> None:
    cb = StudyLoggerCallback(tmp_path)
    ctt = FakeTrial("t_a", flat_config("ctt", 0, **{"method.lambda_h": 0.2}))
    sup = FakeTrial("t_b", flat_config("supervised", 1))
    trials = [ctt, sup]
    for t in trials:
        cb.on_trial_start(iteration=0, trials=trials, trial=t)
    for t, mious in ((ctt, (40.0, 38.0)), (sup, (20.0, 30.0))):
        cb.on_trial_result(0, trials, t, result(2, mious[0]))
        cb.on_trial_result(0, trials, t, result(4, mious[1]))
        cb.on_trial_complete(0, trials, t)
    cb.on_experiment_end(trials)

    # --load_fast=false: the Python reader, the same on every platform (the Rust data server
    # is an optional speed-up of the same files)
    proc = subprocess.Popen([console_script("tensorboard"), "--logdir", str(tmp_path / "tb"),
                             "--host", "127.0.0.1", "--port", "0", "--load_fast", "false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server.append(proc)
    url = None
    deadline = time.monotonic() + START_S
    assert proc.stderr is not None
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"tensorboard exited with {proc.returncode}")
        m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        url = m.group(1) if m else None
    assert url, "tensorboard printed no URL"

    runs = {tb_run_name("ctt", 0, "t_a"), tb_run_name("supervised", 1, "t_b")}
    for _ in range(100):  # the first load of the logdir is asynchronous
        if set(get_json(f"{url}/data/runs")) == runs:
            break
        time.sleep(0.1)
    assert set(get_json(f"{url}/data/runs")) == runs

    tags = get_json(f"{url}/data/plugin/scalars/tags")
    assert {"miou", "loss/total", "miou_final", "miou_best"} <= set(tags[tb_run_name("ctt", 0,
                                                                                      "t_a")])
    points = get_json(f"{url}/data/plugin/scalars/scalars?run={tb_run_name('ctt', 0, 't_a')}"
                      "&tag=miou")
    assert [(step, value) for _, step, value in points] == [(2, 40.0), (4, 38.0)]

    exp = get_json(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})
    # columns as the dashboard shows them: display names, `differs` first (the first five
    # are visible by default); the study's own columns lead, internal keys are absent
    shown = [h.get("displayName") or h["name"]
             for h in sorted(exp["hparamInfos"], key=lambda h: not h.get("differs", False))]
    assert shown[:3] == ["variant", "seed", "status"]
    assert {"method.lambda_h", "method.unsup"} <= set(shown) and "run.seed" not in shown
    display = {h["name"]: h.get("displayName") or h["name"] for h in exp["hparamInfos"]}
    assert {m["name"]["tag"] for m in exp["metricInfos"]} >= {"miou_final", "miou_best"}

    groups = get_json(f"{url}/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"]})["sessionGroups"]
    by_run = {g["name"]: g for g in groups}
    assert set(by_run) == runs
    for g in groups:
        g["hparams"] = {display[k]: v for k, v in g["hparams"].items()}
    a = by_run[tb_run_name("ctt", 0, "t_a")]
    assert a["hparams"]["variant"] == "ctt" and a["hparams"]["method.lambda_h"] == 0.2
    assert a["hparams"]["method.unsup"] == "cross"
    metrics = {m["name"]["tag"]: m["value"] for m in a["metricValues"]}
    assert metrics == {"miou_final": 38.0, "miou_best": 40.0}
    b = by_run[tb_run_name("supervised", 1, "t_b")]
    assert b["hparams"]["variant"] == "supervised"
    assert {m["name"]["tag"]: m["value"] for m in b["metricValues"]} == {"miou_final": 30.0,
                                                                        "miou_best": 30.0}
    assert all(s["status"] == "STATUS_SUCCESS" for g in groups for s in g["sessions"])


def test_optuna_dashboard_reads_a_sweep_database(tmp_path: Path, server) -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = tmp_path / "optuna.db"
    study = optuna.create_study(study_name="voc_sweep", storage=f"sqlite:///{db}",
                                direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("method.lambda_u", 0.25, 2.0), n_trials=3)
    with socket.socket() as s:  # optuna-dashboard has no "any free port" option
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([console_script("optuna-dashboard"), f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server.append(proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while True:
        try:
            summaries = get_json(f"{url}/api/studies")["study_summaries"]
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"optuna-dashboard did not serve {url} (exit {proc.poll()})")
            time.sleep(0.2)
    assert [s["study_name"] for s in summaries] == ["voc_sweep"]
    detail = get_json(f"{url}/api/studies/{summaries[0]['study_id']}?after=0")
    served = [(t["params"][0]["name"], t["values"][0]) for t in detail["trials"]]
    assert served == [("method.lambda_u", t.value) for t in study.trials]
