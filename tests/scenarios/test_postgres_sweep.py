"""A sweep keeps one Optuna history in a real PostgreSQL server across a driver kill and
``--resume`` (``--optuna-storage postgresql://...``: ctt/tune/optuna_storage.py open_url, the
searcher's reconcile in ctt/tune/optuna_search.py, run_sweep's storage in ctt/tune/sweep.py).

A module fixture runs its own PostgreSQL server (Debian's package ``postgresql``: the binaries
under /usr/lib/postgresql/*/bin) on 127.0.0.1 and a free port, its socket and data in a tmp
directory, as an unprivileged user (the server refuses root), with scram password
authentication for the role ``ctt`` and a database ``optuna``. The sweep gets the password
the documented way, ``PGPASSWORD`` in the driver's environment and a URL without one; the
server is stopped by its own pid afterwards (never the machine's cluster on 5432).

The sweep runs as ``python studies/voc_sweep.py --smoke-test`` in a subprocess (3 trials, one
at a time), its driver's process group is SIGKILLed once the first trial has finished and the
second is running with a checkpoint that a Tune snapshot names, and it is resumed as a new
head would (fresh RAY_TMPDIR and staging). (The journal storage and the head loss on it:
test_optuna_head_loss.py; a sqlite URL: test_sweep_on_an_optuna_database_url there.)
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT, optuna_trials_by_tune_id, read_trial_metrics, read_trials_parquet

optuna = pytest.importorskip("optuna")
psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary (the test extra) is missing")

from optuna.trial import TrialState  # noqa: E402

from ctt.tune.layout import OPTUNA_DB, OPTUNA_JOURNAL  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROLE, DATABASE = "ctt", "optuna"
# Trials long enough that the second still runs seconds after its first checkpoint on a fast
# machine too (the kill waits for a Tune snapshot taken after that checkpoint; 150 smoke
# iterations took 4 s on CI, and a study of this kind once ended before its kill): 900
# iterations, evaluated and checkpointed every 15, are ~23 s here. No pruning decision before
# two thirds of the budget, so the killed trial cannot be pruned before the kill (~step 60
# here); after the resume it may be (seen: pruned at step 615), and Optuna must hold PRUNED.
ITERS, EVERY = 900, 15
GRACE = 600
STUDY = "pg"


# --------------------------------------------------------------------------------------------
# The PostgreSQL server
# --------------------------------------------------------------------------------------------


def _server_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb, pg_ctl and postgres."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")]
    found = [b for b in found if (b / "initdb").exists() and (b / "pg_ctl").exists()]

    def version(b: Path) -> tuple:
        v = b.parent.name
        return tuple(int(x) for x in v.split(".") if x.isdigit())

    return max(found, key=version) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A server of this module: ``url`` is the sweep's (no password), ``password`` the role's."""

    def __init__(self, port: int, password: str) -> None:
        self.port, self.password = port, password
        self.url = f"postgresql://{ROLE}@127.0.0.1:{port}/{DATABASE}"

    def storage(self) -> optuna.storages.RDBStorage:
        """An Optuna storage on the server for the test itself (the password as a connect
        argument, not in the URL or this process's environment)."""
        return optuna.storages.RDBStorage(
            self.url, engine_kwargs={"connect_args": {"password": self.password}})

    def connect(self, **kw):
        return psycopg2.connect(host="127.0.0.1", port=self.port, user=ROLE, dbname=DATABASE,
                                connect_timeout=10, **kw)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1:<free port>, run by an unprivileged user when the tests
    run as root (Debian's ``postgres``, else ``nobody``); stopped by its pid afterwards."""
    bindir = _server_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/postgres): "
                    "install Debian's package `postgresql` (apt-get install postgresql; "
                    ".ci/run does)")
    run_as: dict = {}
    if os.geteuid() == 0:
        import pwd

        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                pw = pwd.getpwnam(name)
                run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
                break
        else:
            pytest.skip("running as root and neither the user postgres nor nobody exists to "
                        "run the PostgreSQL server (it refuses root)")
    # not under pytest's tmp (0700, root's): the server's user must reach its directory, and
    # the socket's path must stay short
    base = Path(tempfile.mkdtemp(prefix="ctt-pg-", dir="/tmp"))
    data, sock, log = base / "data", base / "sock", base / "server.log"
    sock.mkdir()
    superuser_pw, password = secrets.token_hex(16), secrets.token_hex(16)
    pwfile = base / "pwfile"
    pwfile.write_text(superuser_pw + "\n")
    if run_as:
        for p in (base, sock, pwfile):
            os.chown(p, run_as["user"], run_as["group"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", HOME=str(base))

    def as_server(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(bindir / cmd[0]), *cmd[1:]], cwd=base, env=env,
                              capture_output=True, text=True, timeout=timeout, **run_as)

    init = as_server("initdb", "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
                     "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync")
    pwfile.unlink()
    assert init.returncode == 0, init.stdout[-3000:] + init.stderr[-3000:]
    pid = None
    try:
        for _ in range(3):  # a free port can be taken between the probe and the start
            port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -c port={port} "
                    f"-c unix_socket_directories={sock} -c fsync=off "
                    "-c password_encryption=scram-sha-256")
            start = as_server("pg_ctl", "-D", str(data), "-l", str(log), "-o", opts, "-w",
                              "-t", "120", "start", timeout=180)
            if start.returncode == 0:
                break
        assert start.returncode == 0, (start.stdout + start.stderr)[-2000:] + (
            log.read_text()[-3000:] if log.exists() else "")
        pid = int((data / "postmaster.pid").read_text().split()[0])
        admin = psycopg2.connect(host="127.0.0.1", port=port, user="postgres",
                                 password=superuser_pw, dbname="postgres", connect_timeout=10)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD %s", (password,))
            cur.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        admin.close()
        yield Postgres(port, password)
    finally:
        if pid is not None:
            stop = as_server("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "-t", "60",
                             "stop", timeout=90)
            if stop.returncode != 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


@pytest.fixture
def ray_tmp():
    """A short RAY_TMPDIR (Ray's socket paths must fit in 107 bytes): the head's local disk."""
    path = Path(tempfile.mkdtemp(prefix="ctt-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _driver_env(tmp: Path, ray_tmp: Path, password: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PG") and k not in ("RAY_ADDRESS", "CTT_OPTUNA_STORAGE")}
    env.update(PYTHONUNBUFFERED="1", CTT_STAGING=str(tmp / "staging"), RAY_TMPDIR=str(ray_tmp),
               TUNE_GLOBAL_CHECKPOINT_S="1", PGPASSWORD=password)
    return env


def _sweep_cmd(storage: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "studies" / "voc_sweep.py"), "--smoke-test",
            "--iters", str(ITERS), "--set", f"run.eval_every={EVERY}",
            "--set", f"run.checkpoint_every={EVERY}", "--grace-period", str(GRACE),
            "--confirm-top", "0", "--max-concurrent", "1", "--storage", str(storage),
            "--out", STUDY, "--optuna-storage", url, *extra]


def _trial_states(study: Path) -> dict[str, str]:
    """Tune trial id -> the status its trial.json gives (skipped while being written)."""
    states = {}
    for path in (study / "trials").glob("*/trial.json"):
        with contextlib.suppress(ValueError, OSError):
            states[path.parent.name] = json.loads(path.read_text())["status"]
    return states


def _checkpoints(study: Path, tid: str) -> int:
    return sum(len(list(d.glob("checkpoint_*"))) for d in (study / "ray").glob(f"*_{tid}_*"))


def _last_snapshot(study: Path) -> float:
    """The mtime of Tune's newest experiment snapshot (0 before the first)."""
    newest = 0.0
    for p in (study / "ray").glob("experiment_state-*.json"):
        with contextlib.suppress(OSError):  # replaced under us
            newest = max(newest, p.stat().st_mtime)
    return newest


def _by_tune_id(storage) -> dict:
    return optuna_trials_by_tune_id(optuna.load_study(study_name=STUDY, storage=storage))


@pytest.mark.slow
def test_sweep_keeps_one_optuna_history_in_postgres_across_a_driver_kill(
        postgres, tmp_path, ray_tmp):
    # the server really asks for the password: the sweep can only be getting it from PGPASSWORD
    with pytest.raises(psycopg2.OperationalError):
        postgres.connect(password="wrong")
    postgres.connect(password=postgres.password).close()

    storage = tmp_path / "storage"
    study = storage / STUDY
    log = tmp_path / "first.log"
    env = _driver_env(tmp_path, ray_tmp, postgres.password)
    with log.open("w") as out:
        proc = subprocess.Popen(_sweep_cmd(storage, postgres.url), cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        # generous on a busy 2-core machine: Ray's start, then one whole trial
        deadline = time.monotonic() + 420
        try:
            while True:
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                states = _trial_states(study)
                done = [t for t, s in states.items() if s in ("TERMINATED", "ERROR")]
                running = [t for t, s in states.items() if s == "RUNNING"]
                if done and running and _checkpoints(study, running[0]) >= 1:
                    break
                time.sleep(0.1)
            # Tune snapshots every second here, later on a busy machine: wait for one taken
            # after that checkpoint, so the running trial is in it (the kill lands mid-trial,
            # not between a snapshot and the trial's start: that trial would be lost, ERROR)
            ready = time.time()
            while _last_snapshot(study) <= ready + 0.2:
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline + 60, log.read_text()[-4000:]
                time.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):  # the head is lost: driver and Ray
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first_log = log.read_text()

    # What the kill left: one trial finished, one running (a slower machine could not change
    # that; a much faster one would have to finish a whole trial in the 1-2 s waited above)
    states = _trial_states(study)
    (finished,) = [t for t, s in states.items() if s in ("TERMINATED", "ERROR")] or [None]
    (killed,) = [t for t, s in states.items() if s == "RUNNING"] or [None]
    assert finished and killed and len(states) == 2, (states, first_log[-3000:])
    assert not (study / "trials.parquet").exists()
    killed_steps = [r["step"] for r in read_trial_metrics(study, killed)]
    assert killed_steps and max(killed_steps) < ITERS, killed_steps[-3:]
    db = postgres.storage()
    before = _by_tune_id(db)
    assert set(before) == {finished, killed}, before
    assert all(len(fts) == 1 for fts in before.values()), before
    (done_ft,), (killed_ft,) = before[finished], before[killed]
    assert done_ft.state in (TrialState.COMPLETE, TrialState.PRUNED), done_ft
    # the server holds the killed trial as the driver left it: asked, reporting, never told
    assert killed_ft.state == TrialState.RUNNING and killed_ft.intermediate_values, killed_ft
    db.engine.dispose()

    # a new head: nothing of the old one's local disk, only the study's storage and the server
    shutil.rmtree(tmp_path / "staging", ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    ray_tmp.mkdir()
    proc2 = subprocess.run(_sweep_cmd(storage, postgres.url, "--resume"), cwd=REPO_ROOT,
                           env=_driver_env(tmp_path, ray_tmp, postgres.password),
                           capture_output=True, text=True, timeout=600)
    second_log = proc2.stdout + proc2.stderr
    assert proc2.returncode == 0, second_log[-6000:]

    # Tune's tables: each of the 3 trials once, all finished; the killed one resumed (it was
    # in Tune's snapshot), not lost
    rows = read_trials_parquet(study)
    ids = [r["trial_id"] for r in rows]
    assert len(ids) == 3 and len(set(ids)) == 3 and {finished, killed} <= set(ids), rows
    assert all(r["status"] == "TERMINATED" and not r["error"] for r in rows), rows
    rows = {r["trial_id"]: r for r in rows}

    # Optuna's history in the server: the same study, each Tune trial once, nothing RUNNING
    # or FAIL (no orphan), every state what trials.parquet says
    db = postgres.storage()
    ostudy = optuna.load_study(study_name=STUDY, storage=db)
    after = optuna_trials_by_tune_id(ostudy)
    assert set(after) == set(rows) and all(len(fts) == 1 for fts in after.values()), after
    assert len(ostudy.trials) == 3 and sorted(t.number for t in ostudy.trials) == [0, 1, 2]
    for tid, (ft,) in after.items():
        r = rows[tid]
        if r["pruned"]:
            assert ft.state == TrialState.PRUNED and r["step"] < ITERS, (tid, r, ft)
        else:
            assert ft.state == TrialState.COMPLETE and r["step"] == ITERS, (tid, r, ft)
            assert ft.value == r["miou_final"], (tid, r, ft)
    # the finished trial is untouched: the same Optuna trial, state, value and end
    (done_after,) = after[finished]
    assert (done_after.number, done_after.state, done_after.value,
            done_after.datetime_complete) == (done_ft.number, done_ft.state, done_ft.value,
                                             done_ft.datetime_complete)
    # the killed trial is the Optuna trial asked before the kill (not a second one), told once
    # on its real end; the values it reported before the kill are kept, and it reported on
    (killed_after,) = after[killed]
    assert killed_after.number == killed_ft.number, (killed_ft, killed_after)
    assert killed_after.params == killed_ft.params
    assert killed_after.datetime_start == killed_ft.datetime_start
    assert killed_after.state in (TrialState.COMPLETE, TrialState.PRUNED), killed_after
    kept = {s: v for s, v in killed_after.intermediate_values.items()
            if s in killed_ft.intermediate_values}
    assert kept == killed_ft.intermediate_values, (killed_ft, killed_after)
    assert max(killed_after.intermediate_values) > max(killed_ft.intermediate_values)
    info = json.loads((study / "trials" / killed / "trial.json").read_text())
    assert info["status"] == "TERMINATED" and info["step"] == rows[killed]["step"]
    db.engine.dispose()

    # the sqlite snapshot the results read is a copy of the server's study; no journal
    assert not (study / OPTUNA_JOURNAL).exists()
    snap = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{study / OPTUNA_DB}")
    assert sorted((t.number, t.state, t.value) for t in snap.trials) == sorted(
        (t.number, t.state, t.value) for t in ostudy.trials)
    record = json.loads((study / "study.json").read_text())
    assert record["optuna_storage"] == postgres.url and len(record["resumed"]) == 1
    # the password is nowhere in the study's storage (Tune's pickles included) or the logs
    secret = postgres.password.encode()
    leaks = [p for p in study.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaks and postgres.password not in first_log + second_log, leaks
