"""README's cluster workflow against a real Ray head started with the ``ray`` CLI: ``ray start
--head`` plus one ``ray start --address`` worker node, studies submitted with ``ray job submit
--working-dir .`` exactly as README.md says, logs followed to the end, the study's files found
in the shared storage; then the head lost mid-study and the same submission with ``--resume``
on a fresh head.

One machine plays two hosts, as in tests/scenarios/test_cluster_runs.py: the head on 127.0.0.1,
the worker node on 127.0.0.2 (the whole 127/8 block is loopback on Linux), each with its own
temp dir (two hosts have two disks: with one shared temp dir the worker node's runtime-env agent
manages the head's copy of the working directory, and deleted it under the running job driver).
Every port is chosen free and named, the dashboard and every server of the head listen on
127.0.0.1 only (checked; Ray binds the worker node's raylet, whose node IP is not 127.0.0.1, on
every interface), and the cluster uses token authentication with a token of its own (in the
environment, so ``~/.ray/auth_token`` is neither read nor written).

``ray stop`` would stop every Ray process of this user on the machine, other tests' clusters
included; this file stops only its own cluster (:meth:`CLICluster.kill`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT, alive_with_descendants, read_trial_metrics, read_trials_parquet

HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"
OBJECT_STORE = 200 * 1024**2
# The worker node's `ray start`, with one change: Ray rewrites a loopback --address to the
# machine's routable IP (ray._private.services.resolve_ip_for_localhost), where this head, bound
# to 127.0.0.1, does not listen. On real hosts the head's address is not loopback and the
# plain `ray start --address` is the command.
WORKER_START = (
    "import sys\n"
    "from ray._private import services\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "sys.exit(main())\n")
STUDY = ["python", "studies/voc_ablation.py"]  # the job's entrypoint, as README writes it


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HEAD_IP, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ports(ports: list[int]) -> list[str]:
    names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port"]
    return [f"{name}={port}" for name, port in zip(names, ports, strict=True)]


class CLICluster:
    """A head (127.0.0.1, ``--num-cpus 1``) and one worker node (127.0.0.2, ``--num-cpus 1``)
    started with ``ray start``; :meth:`kill` stops exactly these processes."""

    def __init__(self) -> None:
        # Short: Ray's unix socket paths live under them (108-byte limit).
        self.temp_dirs = [tempfile.mkdtemp(prefix="rjh", dir="/tmp"),
                          tempfile.mkdtemp(prefix="rjw", dir="/tmp")]
        ports = _free_ports(16)
        self.port, self.dashboard_port, self.client_port = ports[:3]
        self.head_ports, self.worker_ports = ports[3:9], ports[9:15]
        self.token = secrets.token_hex(16)
        self.log: list[str] = []

    @property
    def dashboard(self) -> str:
        return f"http://{HEAD_IP}:{self.dashboard_port}"

    @property
    def gcs(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment of every ``ray`` command here: README's ``RAY_ADDRESS`` and this
        cluster's token."""
        # This interpreter's `ray`, and its `python` for the job's entrypoint (the head's
        # processes pass their PATH on to the job driver), as in an activated environment.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = dict(os.environ, RAY_ADDRESS=self.dashboard, RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                   PYTHONUNBUFFERED="1", PATH=path)
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        return env

    def _run(self, cmd: list[str], env: dict[str, str], timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        self.log.append(f"$ {' '.join(cmd[-12:])}\nrc={proc.returncode}\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        assert proc.returncode == 0 or not check, self.log[-1]
        return proc

    def start(self) -> None:
        common = ["--num-cpus=1", f"--object-store-memory={OBJECT_STORE}",
                  "--disable-usage-stats"]
        head_env = self.env()
        head_env.pop("RAY_ADDRESS")
        # Ray's "no cluster networking" switch keeps the head's node IP on 127.0.0.1 and its
        # servers bound there (without it they listen on every interface); it reaches the job
        # driver, whose `--address auto` would otherwise be rewritten to the routable IP too.
        head_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        self._run(["ray", "start", "--head", f"--node-ip-address={HEAD_IP}",
                   f"--port={self.port}", f"--dashboard-host={HEAD_IP}",
                   f"--dashboard-port={self.dashboard_port}",
                   f"--ray-client-server-port={self.client_port}",
                   f"--temp-dir={self.temp_dirs[0]}", *_node_ports(self.head_ports), *common],
                  head_env)
        worker_env = self.env()
        worker_env.pop("RAY_ADDRESS")
        self._run([sys.executable, "-c", WORKER_START, "start", f"--address={self.gcs}",
                   f"--node-ip-address={WORKER_IP}", f"--temp-dir={self.temp_dirs[1]}",
                   *_node_ports(self.worker_ports), *common], worker_env)

    def processes(self) -> list:
        """This cluster's processes: those whose command line names its temp dirs or its GCS
        address (Ray's client server names only the latter), every descendant of those
        (workers, actors, job drivers renamed by setproctitle) and any process left working
        in a temp dir (an orphaned job driver)."""
        import psutil

        marks = [*self.temp_dirs, f"{self.gcs} ", f"={self.gcs}"]
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.pid == os.getpid():
                continue
            cmd = " ".join(p.info["cmdline"] or []) + " "
            cwd = ""
            with contextlib.suppress(psutil.Error):
                cwd = p.cwd()
            if any(m in cmd for m in marks) or any(cwd.startswith(t) for t in self.temp_dirs):
                found[p.pid] = p
        return alive_with_descendants(found)

    def head_listening(self) -> set[str]:
        """host:port of every listening socket of the head's processes (its temp dir in their
        command line, Ray's client server, and their descendants)."""
        import psutil

        marks = [self.temp_dirs[0], f"--port={self.client_port}"]
        head = {p.pid: p for p in self.processes()
                if any(m in " ".join(p.cmdline()) for m in marks)}
        for p in list(head.values()):
            with contextlib.suppress(psutil.Error):
                head.update({c.pid: c for c in p.children(recursive=True)})
        listening = set()
        for p in head.values():
            with contextlib.suppress(psutil.Error):
                listening |= {f"{c.laddr.ip}:{c.laddr.port}" for c in p.net_connections("inet")
                              if c.status == psutil.CONN_LISTEN}
        return listening

    def kill(self) -> list[str]:
        """SIGKILL every process of this cluster (head and worker node, the job driver and
        its trials): a lost head machine. Returns what was killed."""
        import psutil

        procs = self.processes()
        killed = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                killed.append(f"{p.pid}: {' '.join(p.cmdline())[:100]}")
                p.kill()
        psutil.wait_procs(procs, timeout=30)
        return killed

    def shutdown(self) -> None:
        try:
            self.kill()
            time.sleep(1)
            left = [f"{p.pid}: {' '.join(p.cmdline())[:120]}" for p in self.processes()]
        finally:
            for d in self.temp_dirs:
                shutil.rmtree(d, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


@contextlib.contextmanager
def _cluster():
    pytest.importorskip("psutil")
    c = CLICluster()
    try:
        c.start()
        yield c
    finally:
        c.shutdown()


def _submission_id(output: str) -> str:
    m = re.search(r"Job '(raysubmit_\w+)' submitted successfully", output)
    assert m, output[-3000:]
    return m.group(1)


def _job_status(c: CLICluster, sid: str) -> str:
    """``ray job status``: RUNNING, PENDING (its "Status for job" line) or the verdict of an
    ended job ("Job '...' succeeded"), upper-cased like Ray's JobStatus."""
    out = c._run(["ray", "job", "status", sid], c.env()).stdout
    m = (re.search(r"Status for job '[^']+': (\w+)", out)
         or re.search(rf"Job '{sid}' (succeeded|failed|stopped)", out))
    assert m, out
    return m.group(1).upper()


def _trial_json(study: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(study.glob("trials/*/trial.json")):
        with contextlib.suppress(ValueError, OSError):
            out[path.parent.name] = json.loads(path.read_text())
    return out


def _shipped_working_dir(c: CLICluster) -> Path:
    """The head's copy of the job's working directory (Ray unpacks it under its temp dir)."""
    dirs = [p for p in Path(c.temp_dirs[0]).glob(
        "session_latest/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _check_shipped(pkg: Path) -> None:
    """``--working-dir .`` ships the checkout without what .gitignore leaves out."""
    files = [p for p in pkg.rglob("*") if p.is_file()]
    names = {p.relative_to(pkg).parts[0] for p in files}
    assert "studies" in names and "ctt" in names, sorted(names)
    assert not names & {".venv", ".ci-venv", ".git", "studies_out", "runs"}, sorted(names)
    size = sum(p.stat().st_size for p in files)
    big = [(str(p.relative_to(pkg)), p.stat().st_size) for p in files
           if p.stat().st_size > 2 * 1024**2]
    assert not big and size < 20 * 1024**2, (size, big)
    print(f"shipped working dir: {len(files)} files, {size / 1024**2:.1f} MiB")


@pytest.mark.slow
def test_readme_job_submit_runs_a_study_on_a_real_head(tmp_path):
    """README's `ray job submit --working-dir . -- python studies/voc_ablation.py --address
    auto ...` on a `ray start` head: logs followed to the end, SUCCEEDED, files in storage."""
    storage = tmp_path / "shared"
    with _cluster() as c:
        cmd = ["ray", "job", "submit", "--working-dir", ".", "--", *STUDY, "--address", "auto",
               "--smoke-test", "--storage", str(storage), "--storage-shared"]
        proc = c._run(cmd, c.env(), timeout=400)
        out = proc.stdout + proc.stderr
        sid = _submission_id(out)
        # Followed to the end: the study's progress, its last lines, Ray's verdict.
        assert re.search(r"\] trials 7 done, 0 running, 0 pending", out), out[-3000:]
        assert "results in" in out, out[-3000:]
        assert f"Job '{sid}' succeeded" in out, out[-3000:]
        assert _job_status(c, sid) == "SUCCEEDED"
        _check_shipped(_shipped_working_dir(c))
        listening = c.head_listening()
        assert f"{HEAD_IP}:{c.dashboard_port}" in listening, listening
        assert any(a.endswith(f":{c.port}") for a in listening), listening  # the GCS
        open_ = [a for a in listening if not a.startswith((f"{HEAD_IP}:", f"::ffff:{HEAD_IP}:"))]
        assert not open_, f"the head listens beyond loopback: {open_}"
        # Without --storage the study would write into the job's copy of the working dir.
        proc = c._run(cmd[:cmd.index("--storage")], c.env(), timeout=300, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-3000:]
        assert "'studies_out' is a relative path and this study runs as a Ray job" in out, (
            out[-3000:])
        assert _job_status(c, _submission_id(out)) == "FAILED"
    study = storage / "voc_ablation_smoke"
    for name in ("study.json", "trials.parquet", "metrics.parquet", "report.md"):
        assert (study / name).is_file(), name
    trials = read_trials_parquet(study)
    assert len(trials) == 7 and len({t["trial_id"] for t in trials}) == 7
    assert all(t["status"] == "TERMINATED" and t["step"] == 6 for t in trials), trials
    for t in trials:
        assert (study / "trials" / t["trial_id"] / "trial.json").is_file()
        assert [r["step"] for r in read_trial_metrics(study, t["trial_id"])] == [3, 6]


def _snapshot_state(study: Path) -> float:
    """mtime of Tune's newest experiment snapshot in storage (0 when none yet)."""
    snaps = list((study / "ray").glob("experiment_state-*.json"))
    return max((p.stat().st_mtime for p in snaps), default=0.0)


def _wait_for_a_finished_trial(study: Path, c: CLICluster, sid: str,
                               timeout: float) -> dict[str, dict]:
    """Poll storage until a trial has finished (its trial.json says TERMINATED) and Tune has
    written an experiment snapshot since: the driver saves that state every
    TUNE_GLOBAL_CHECKPOINT_S (5 s, ctt.tune.runtime), and a head lost before the next snapshot
    would restart a trial the callback had already written as finished. Returns trial.json of
    every trial. Fails at once, with the job's logs, when job ``sid`` ends first."""
    deadline = time.monotonic() + timeout
    asked = time.monotonic()
    while time.monotonic() < deadline:
        if time.monotonic() - asked > 10:
            asked = time.monotonic()
            status = _job_status(c, sid)
            if status not in ("PENDING", "RUNNING"):
                logs = c._run(["ray", "job", "logs", sid], c.env(), check=False).stdout
                raise AssertionError(f"job {sid} {status} before a trial finished:\n"
                                     f"{logs[-4000:]}")
        infos = _trial_json(study)
        done = [tid for tid, info in infos.items() if info.get("status") == "TERMINATED"]
        if done:
            finished_at = max((study / "trials" / tid / "trial.json").stat().st_mtime
                              for tid in done)
            if _snapshot_state(study) > finished_at:
                return infos
        time.sleep(0.2)
    raise AssertionError(f"no trial finished within {timeout} s: {_trial_json(study)}")


@pytest.mark.slow
def test_head_loss_then_resume_on_a_fresh_head(tmp_path):
    """README's "after a head restart": the head is lost mid-study (every process of the
    cluster killed, the job driver with it), a fresh head with empty temp dirs gets the same
    submission plus --resume: finished trials are kept as they were, the rest complete, and
    the report holds each trial once."""
    storage = tmp_path / "shared"
    study = storage / "headloss"
    iters, every = 60, 10
    args = [*STUDY, "--address", "auto", "--smoke-test", "--storage", str(storage),
            "--storage-shared", "--out", "headloss",
            "--variants", "supervised,mean_teacher,cross,ctt",
            "--set", f"optim.iters={iters}", "--set", f"run.eval_every={every}",
            "--set", f"run.checkpoint_every={every}"]
    t0 = time.monotonic()
    timeline: list[str] = []

    def note(msg: str) -> None:
        timeline.append(f"{time.monotonic() - t0:6.1f} s  {msg}")

    with _cluster() as first:
        note("head 1 and its worker node started")
        out = first._run(["ray", "job", "submit", "--no-wait", "--working-dir", ".", "--",
                          *args], first.env())
        sid = _submission_id(out.stdout + out.stderr)
        note(f"submitted {sid} with --no-wait")
        before = _wait_for_a_finished_trial(study, first, sid, timeout=300)
        assert _job_status(first, sid) == "RUNNING"
        files = {tid: (study / "trials" / tid / "metrics.jsonl").read_bytes() for tid in before}
        mtimes = {tid: (study / "trials" / tid / "metrics.jsonl").stat().st_mtime_ns
                  for tid in before}
        # What `ray stop` on the head machine does, for this cluster only (ray stop would
        # stop other tests' Ray processes too): every Ray process killed, the job driver and
        # its trials with them. The worker node goes as well; it would exit on its own once
        # its GCS stays unreachable, and `ray up` restarts the workers with a new head.
        killed = first.kill()
        note(f"head lost: {len(killed)} processes of the cluster SIGKILLed")
    finished = sorted(t for t, i in before.items() if i["status"] == "TERMINATED")
    unfinished = sorted(t for t, i in before.items() if i["status"] != "TERMINATED")
    for tid, info in sorted(before.items()):
        steps = [r["step"] for r in read_trial_metrics(study, tid)]
        note(f"  at the kill: {info['variant']:13s} {tid} {info['status']:10s} "
             f"steps {steps}")
    note(f"  at the kill: {4 - len(before)} trial(s) not started yet")
    assert finished, before
    assert len(before) < 4 or unfinished, "every trial had finished: the kill was not mid-study"

    with _cluster() as second:
        note("head 2 started (empty temp dirs, new ports)")
        out = second._run(["ray", "job", "submit", "--no-wait", "--working-dir", ".", "--",
                           *args, "--resume"], second.env())
        sid = _submission_id(out.stdout + out.stderr)
        note(f"resubmitted with --resume: {sid}; following its logs")
        logs = second._run(["ray", "job", "logs", "--follow", sid], second.env(), timeout=400)
        note("ray job logs --follow returned")
        assert "results in" in logs.stdout, logs.stdout[-3000:]
        assert _job_status(second, sid) == "SUCCEEDED"

    trials = read_trials_parquet(study)
    ids = [t["trial_id"] for t in trials]
    assert len(ids) == 4 and len(set(ids)) == 4, ids  # each trial once in the report's table
    assert sorted(t["variant"] for t in trials) == ["cross", "ctt", "mean_teacher",
                                                     "supervised"]
    assert set(before) <= set(ids)  # trials known before the kill kept their ids
    for t in trials:
        assert t["status"] == "TERMINATED" and t["step"] == iters and not t["pruned"], t
        steps = [r["step"] for r in read_trial_metrics(study, t["trial_id"])]
        assert steps == list(range(every, iters + 1, every)), (t["trial_id"], steps)
    for tid in finished:  # kept as they were: not rerun, not even rewritten
        path = study / "trials" / tid / "metrics.jsonl"
        assert path.read_bytes() == files[tid] and path.stat().st_mtime_ns == mtimes[tid], tid
    for t in sorted(trials, key=lambda t: t["variant"]):
        tid = t["trial_id"]
        old = files.get(tid, b"").decode().splitlines()
        new = (study / "trials" / tid / "metrics.jsonl").read_text().splitlines()
        kept = 0
        while kept < min(len(old), len(new)) and old[kept] == new[kept]:
            kept += 1
        rerun = [json.loads(line)["step"] for line in new[kept:]]
        what = ("kept (finished before the kill)" if tid in finished else
                f"kept steps {[json.loads(x)['step'] for x in new[:kept]]}, ran {rerun}")
        nodes = sorted({str(json.loads(line).get("node_ip")) for line in new})
        note(f"  after resume: {t['variant']:13s} {tid} {what} (on {', '.join(nodes)})")
    info = json.loads((study / "study.json").read_text())
    assert len(info.get("resumed", [])) == 1
    report = (study / "report.md").read_text()
    for variant in ("supervised", "mean_teacher", "cross", "ctt"):
        assert variant in report
    print("\nhead-loss timeline:\n" + "\n".join(timeline))
