"""Studies on S3 storage through the S3 protocol: moto's S3 server on loopback, reached by Ray
Tune, the trials, the driver's sync (ctt.tune.storage) and ``ctt.tune.results`` through
``pyarrow.fs`` exactly as on AWS, with the endpoint in the URI's query string
(``s3://ctt/studies?endpoint_override=127.0.0.1:PORT&scheme=http``).

The studies run as ``python studies/voc_ablation.py`` in a subprocess (the real entry point),
Ray in-process on loopback; trial workers inherit the driver's environment, so the fake
credentials reach them too. (URIs and staged paths without a server:
tests/test_storage_paths.py.)
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pyarrow_fs
import pytest
from helpers import REPO_ROOT

BUCKET = "ctt"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


class S3:
    """The loopback S3 server of this module: ``uri(path)`` is a study URI with the endpoint in
    its query string, ``fs`` a client of it."""

    def __init__(self, port: int) -> None:
        self.endpoint = f"127.0.0.1:{port}"
        self.fs = pyarrow_fs.S3FileSystem(endpoint_override=self.endpoint, scheme="http",
                                          allow_bucket_creation=True)

    def uri(self, path: str = "studies") -> str:
        return f"s3://{BUCKET}/{path}?endpoint_override={self.endpoint}&scheme=http"

    def files(self, prefix: str) -> dict[str, int]:
        """Object key below ``BUCKET/prefix`` (relative) -> size."""
        base = f"{BUCKET}/{prefix}".rstrip("/")
        infos = self.fs.get_file_info(pyarrow_fs.FileSelector(base, recursive=True,
                                                              allow_not_found=True))
        return {i.path[len(base) + 1:]: i.size for i in infos
                if i.type == pyarrow_fs.FileType.File}

    def read(self, key: str) -> bytes:
        """The object, whole even while the study overwrites it (ctt.tune.storage)."""
        from ctt.tune.storage import read_object

        return read_object(self.fs, f"{BUCKET}/{key}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (a free port), the bucket created through pyarrow."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    old = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        store = S3(port)
        store.fs.create_dir(BUCKET)
        yield store
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------------------------
# The sync, against the S3 server
# --------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_push_uploads_only_changed_files_and_pull_restores_them(s3, tmp_path):
    from ctt.rundir import STUDY_LOCK
    from ctt.tune.storage import StudySync

    local = tmp_path / "stage"
    _write(local / "study.json", "{}")
    _write(local / "trials" / "t1" / "metrics.jsonl", '{"step": 3}\n')
    _write(local / "tb" / "run" / "events.out.tfevents.1", "e")
    _write(local / "optuna.journal", "j")
    for skipped in (STUDY_LOCK, "optuna.journal.lock", ".study.json.123.ab12.tmp",
                    "ray/tuner.pkl", "warmup/seed-0/state.pt"):
        _write(local / skipped, "never")
    sync = StudySync(local, s3.uri("unit/push"), every=3600)
    assert sync.push() == 4
    expected = {"study.json", "trials/t1/metrics.jsonl", "tb/run/events.out.tfevents.1",
                "optuna.journal"}
    assert set(s3.files("unit/push")) == expected
    assert sync.push() == 0  # nothing changed: nothing written
    assert not sync.due()

    time.sleep(0.01)  # a new mtime even on coarse clocks
    with open(local / "trials" / "t1" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6}\n')
    assert sync.changed() == ["trials/t1/metrics.jsonl"]
    assert sync.push() == 1
    assert s3.read("unit/push/trials/t1/metrics.jsonl").decode().count("step") == 2
    (local / "tb" / "run" / "events.out.tfevents.1").unlink()  # e.g. a replaced HParams file
    assert sync.push() == 1
    assert set(s3.files("unit/push")) == expected - {"tb/run/events.out.tfevents.1"}

    # a new head: an empty staging dir gets the driver-side files back, and the first push
    # after the pull writes nothing
    other = tmp_path / "new-head"
    back = StudySync(other, s3.uri("unit/push"))
    assert back.pull() == 3
    assert (other / "trials" / "t1" / "metrics.jsonl").read_text() == \
        (local / "trials" / "t1" / "metrics.jsonl").read_text()
    assert back.push() == 0
    assert not (other / STUDY_LOCK).exists()


def test_read_object_rereads_a_read_that_raced_an_overwrite(s3):
    """pyarrow's S3 reader sizes a read by a HEAD first (moto answers its GET with 206): an
    overwrite in between gives the new object cut at the old length. The read is retried."""
    from ctt.tune.storage import read_object

    class Racing:  # the first read lands between the HEAD and the GET of an overwrite
        def __init__(self) -> None:
            self.reads = 0

        def open_input_stream(self, path):
            self.reads += 1
            return s3.fs.open_input_stream(path) if self.reads > 1 else _Cut(b'{"status": "RU')

        def get_file_info(self, path):
            return s3.fs.get_file_info(path)

    class _Cut:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def readall(self) -> bytes:
            return self.data

    whole = b'{"status": "TERMINATED", "step": 6}'
    with s3.fs.open_output_stream(f"{BUCKET}/unit/race.json") as f:
        f.write(whole)
    racing = Racing()
    assert read_object(racing, f"{BUCKET}/unit/race.json") == whole and racing.reads == 2


def test_pull_skips_what_tune_owns(s3, tmp_path):
    from ctt.tune.storage import StudySync

    for key in ("unit/pull/ray/experiment_state-x.json", "unit/pull/warmup/seed-0/state.pt",
                "unit/pull/trials/a/trial.json"):
        with s3.fs.open_output_stream(f"{BUCKET}/{key}") as f:
            f.write(b"{}")
    sync = StudySync(tmp_path / "s", s3.uri("unit/pull"))
    assert sync.pull() == 1
    assert sorted(p.relative_to(tmp_path / "s").as_posix()
                  for p in (tmp_path / "s").rglob("*") if p.is_file()) == ["trials/a/trial.json"]
    assert sync.exists("trials/a/trial.json") and not sync.exists("nothing.json")


def test_sync_callback_pushes_the_registered_study_and_pickles_its_name(s3, tmp_path):
    from ctt.tune import storage
    from ctt.tune.callbacks import StudySyncCallback

    local = tmp_path / "cb"
    _write(local / "study.json", "{}")
    sync = storage.StudySync(local, s3.uri("unit/cb"), every=3600)
    from ray.tune import Callback

    # the hooks it overrides are Tune's (a misspelt hook would never be called)
    hooks = {"on_step_end", "on_trial_complete", "on_trial_error"}
    assert hooks <= set(vars(StudySyncCallback)) and all(hasattr(Callback, h) for h in hooks)
    cb = pickle.loads(pickle.dumps(StudySyncCallback("cbstudy")))
    assert vars(cb) == {"study": "cbstudy"}  # no path, no filesystem travels with Tune's state
    cb.on_trial_complete(0, [], None)  # nothing registered: a no-op
    assert s3.files("unit/cb") == {}
    storage.register("cbstudy", sync)
    try:
        cb.on_step_end(0, [])  # not due yet
        assert s3.files("unit/cb") == {}
        cb.on_trial_error(0, [], None)  # a trial end pushes at once
        assert set(s3.files("unit/cb")) == {"study.json"}
        _write(local / "trials" / "x" / "trial.json", "{}")
        sync.every = 0.0
        cb.on_step_end(1, [])  # due: the timed push
        assert set(s3.files("unit/cb")) == {"study.json", "trials/x/trial.json"}
    finally:
        storage.unregister("cbstudy")


def _open_session(opts, payload=None) -> None:
    """``StudySession.open`` of a study, stopped before Ray starts (a test must not start it)."""
    from ctt.tune import runtime

    class NoRay(BaseException):
        pass

    def no_ray(*args, **kwargs):
        raise NoRay

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "init_ray", no_ray)
        try:
            with runtime.study_session(opts) as session:
                session.open(payload or {"name": opts.name})
        except NoRay:
            pass


def test_study_refuses_unusable_or_taken_storage_before_ray(s3, tmp_path, monkeypatch):
    """An unreachable endpoint is one StorageError line (not a traceback); a fresh start on
    storage that holds a study is refused though this head's staging dir is empty; a resume
    of a study the storage does not hold is NoStudyError."""
    from ctt.tune import runtime
    from ctt.tune.storage import StorageError

    monkeypatch.setenv("CTT_STAGING", str(tmp_path / "staging"))
    dead = f"s3://ctt/studies?endpoint_override=127.0.0.1:{_free_port()}&scheme=http"
    with pytest.raises(StorageError, match="cannot use the study's storage"):
        _open_session(runtime.StudyOptions(name="dead", storage=dead))
    with s3.fs.open_output_stream(f"{BUCKET}/studies/taken/study.json") as f:
        f.write(b"{}")
    with pytest.raises(runtime.StudyExistsError, match="already holds a study"):
        _open_session(runtime.StudyOptions(name="taken", storage=s3.uri()))
    with pytest.raises(runtime.NoStudyError, match="nothing to resume"):
        _open_session(runtime.StudyOptions(name="absent", storage=s3.uri(), resume=True))


def test_results_of_a_uri_without_a_study_is_one_error_line(s3, capsys):
    from ctt.tune.results import main

    assert main([s3.uri("studies/nothing-here")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "holds no study" in err and "\n" not in err, err


# --------------------------------------------------------------------------------------------
# Whole studies through the entry point
# --------------------------------------------------------------------------------------------


def _driver_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", CTT_STAGING=str(tmp / "staging"),
               **CREDENTIALS)
    env.pop("RAY_ADDRESS", None)
    return env


def _study_cmd(s3: S3, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "studies" / "voc_ablation.py"), "--smoke-test",
            "--variants", "supervised,ctt", "--seeds", "0", "--storage", s3.uri(),
            "--out", name, "--sync-every", "1", *extra]


def _log(out: Path, err: Path) -> str:
    return f"stdout:\n{out.read_text()[-4000:]}\nstderr:\n{err.read_text()[-4000:]}"


def _trial_records(s3: S3, name: str) -> dict[str, dict]:
    """trial.json of each trial in the bucket, by trial id."""
    out = {}
    for key in s3.files(f"studies/{name}/trials"):
        if key.endswith("/trial.json"):
            out[key.split("/")[0]] = json.loads(s3.read(f"studies/{name}/trials/{key}"))
    return out


def _parquet_trials(s3: S3, name: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(f"{BUCKET}/studies/{name}/trials.parquet",
                         filesystem=s3.fs).to_pylist()


def _assert_whole_report(report: str, n: int) -> None:
    assert f"- trials: {n} (" in report, report
    rows = [ln for ln in report.splitlines() if ln.startswith("|")]
    for variant in ("supervised", "ctt"):
        assert any(f"| {variant} " in ln or f"|{variant}|" in ln for ln in rows), report


@pytest.mark.slow
def test_s3_study_syncs_while_running_and_results_read_the_uri(s3, tmp_path):
    name = "live"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    seen_running = None
    with open(out, "w") as stdout_file, open(err, "w") as stderr_file:
        proc = subprocess.Popen(_study_cmd(s3, name), cwd=REPO_ROOT, env=_driver_env(tmp_path),
                                stdout=stdout_file, stderr=stderr_file, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                keys = s3.files(f"studies/{name}/trials")
                if seen_running is None and any(k.endswith("metrics.jsonl") for k in keys):
                    seen_running = sorted(keys)
                time.sleep(0.2)
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert rc == 0, _log(out, err)
    assert seen_running, "no metrics.jsonl reached the bucket while the study ran"

    files = s3.files(f"studies/{name}")
    for key in ("study.json", "report.md", "trials.parquet", "metrics.parquet"):
        assert key in files, sorted(files)
    trials = _trial_records(s3, name)
    assert sorted(t["variant"] for t in trials.values()) == ["ctt", "supervised"]
    for tid in trials:
        assert f"trials/{tid}/metrics.jsonl" in files
    assert sum("/events.out.tfevents." in k for k in files if k.startswith("tb/")) >= 2
    assert any(k.startswith("ray/") for k in files)  # Tune's experiment, written by Tune
    assert any(k.startswith("warmup/seed-0/") for k in files)  # the published warm-up
    assert not any(k.endswith(".lock") for k in files)
    assert {t["trial_id"] for t in _parquet_trials(s3, name)} == set(trials)
    # the staging copy and the bucket agree at the end (the last push wrote everything)
    staged = tmp_path / "staging" / name
    assert json.loads(s3.read(f"studies/{name}/study.json")) == \
        json.loads((staged / "study.json").read_text())

    res = subprocess.run([sys.executable, "-m", "ctt.tune.results",
                          s3.uri(f"studies/{name}")], cwd=REPO_ROOT, env=_driver_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_whole_report(res.stdout, 2)
    assert s3.uri(f"studies/{name}") in res.stdout  # the report names the URI, not a temp dir


@pytest.mark.slow
def test_s3_study_resumes_on_a_new_head(s3, tmp_path):
    """Kill the driver (and its in-process Ray head) once the first variant trial has finished
    and reached the bucket, while the second runs and its first results have reached the
    bucket by a timed push; wipe the staging directory (a new head); --resume: the finished
    trial is kept, the other continues from its checkpoint and appends to its restored files,
    each trial is in the tables once and the report is whole."""
    name = "headloss"
    # the second trial must run for several seconds after the first one's end on a fast machine
    # too (a snapshot after that end, then a timed push): 150 iterations took 4 s on CI
    iters, every = 900, 30
    extra = ("--max-concurrent", "1", "--set", f"optim.iters={iters}",
             "--set", f"run.eval_every={every}", "--set", f"run.checkpoint_every={every}")
    cmd = _study_cmd(s3, name, *extra)
    # Tune's experiment snapshot each second instead of 5: the kill waits for one
    env = dict(_driver_env(tmp_path), TUNE_GLOBAL_CHECKPOINT_S="1")
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    finished, running, before_kill = None, None, []
    with open(out, "w") as stdout_file, open(err, "w") as stderr_file:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=stdout_file, stderr=stderr_file,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while finished is None and proc.poll() is None and time.monotonic() < deadline:
                done = {t: r for t, r in _trial_records(s3, name).items()
                        if r.get("status") == "TERMINATED"}
                finished = done or None
                time.sleep(0.2)
            assert finished, "no trial finished: " + _log(out, err)
            end = max(r["end_time"] for r in finished.values())
            snapshot = False
            while proc.poll() is None and time.monotonic() < deadline:
                # Tune's snapshot taken after the first trial's end (the restore must know it
                # finished), and the running trial's first results pushed while it runs
                snapshot = snapshot or any(
                    i.mtime.timestamp() > end + 1 for i in s3.fs.get_file_info(
                        pyarrow_fs.FileSelector(f"{BUCKET}/studies/{name}/ray"))
                    if "experiment_state" in i.path)
                others = {t: r for t, r in _trial_records(s3, name).items()
                          if t not in finished and r.get("status") == "RUNNING"}
                for tid in others:
                    key = f"studies/{name}/trials/{tid}/metrics.jsonl"
                    if snapshot and "metrics.jsonl" in s3.files(f"studies/{name}/trials/{tid}"):
                        running = tid
                        before_kill = [json.loads(ln)["step"] for ln in
                                       s3.read(key).decode().splitlines() if ln.strip()]
                if running and before_kill:
                    break
                time.sleep(0.1)
            assert running and before_kill, "no running trial's results in the bucket: " + \
                _log(out, err)
            assert proc.poll() is None, "the study ended before the kill: " + _log(out, err)
            os.killpg(proc.pid, signal.SIGKILL)  # the head is lost: driver and Ray with it
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert len(finished) == 1, finished
    assert before_kill[0] == every and before_kill[-1] < iters, before_kill
    # The new head: its disk holds nothing of the study, and its staging root is another one
    # (Tune's pickled callbacks and searcher must write to this one).
    shutil.rmtree(tmp_path / "staging")
    env["CTT_STAGING"] = str(tmp_path / "new-head-staging")

    resumed_at = time.time()
    res = subprocess.run([*cmd, "--resume"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"stdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}"
    assert "restored" in res.stdout and "study files from" in res.stdout

    trials = _trial_records(s3, name)
    assert set(trials) == {*finished, running}
    assert all(t["status"] == "TERMINATED" and t["step"] == iters for t in trials.values())
    (kept_id, kept), = finished.items()
    # kept, not rerun: its record is the one written when it finished on the lost head
    assert trials[kept_id]["end_time"] == kept["end_time"]
    assert trials[kept_id]["start_time"] == kept["start_time"]
    # the interrupted trial kept its start (its restored trial.json) and its pushed records
    # (the resumed trial appended to them), every step once and in order
    steps = {}
    for tid in trials:
        lines = s3.read(f"studies/{name}/trials/{tid}/metrics.jsonl").decode().splitlines()
        steps[tid] = [json.loads(ln)["step"] for ln in lines if ln.strip()]
        assert steps[tid] == sorted(set(steps[tid])) and steps[tid][-1] == iters, steps
    assert steps[kept_id] == list(range(every, iters + 1, every))
    assert set(before_kill) <= set(steps[running]), (before_kill, steps[running])
    assert trials[running]["start_time"] < resumed_at
    rows = _parquet_trials(s3, name)
    assert sorted(r["trial_id"] for r in rows) == sorted(trials)
    _assert_whole_report(s3.read(f"studies/{name}/report.md").decode(), 2)
    info = json.loads(s3.read(f"studies/{name}/study.json"))
    assert len(info["resumed"]) == 1 and len(info["wall_s_runs"]) == 1
    assert not (tmp_path / "staging").exists()  # nothing was written to the lost head's path
    assert (tmp_path / "new-head-staging" / name / "report.md").is_file()
