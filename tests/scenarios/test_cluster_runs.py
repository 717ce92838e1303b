"""Studies on a multi-node Ray cluster started on this machine (head + worker via
``ray.cluster_utils.Cluster``): node-local storage refused, trials on both nodes, a worker node
lost mid-trial and its trial resumed from its checkpoint on the head. (cluster/*.yaml against
the Ray autoscaler: tests/test_cluster.py.)

On one machine every node would report the same IP, so the worker node is put on 127.0.0.2 (the
whole 127/8 block is loopback on Linux): ``node_ip``/``node_id`` then tell the nodes apart, as
distinct hosts would on a real cluster. The study driver runs in a subprocess that joins the
cluster with ``--address``, like ``ray job submit`` on the head.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT, read_trial_metrics, read_trials_parquet

WORKER_IP = "127.0.0.2"
HEAD_IP = "127.0.0.1"
OBJECT_STORE = 200 * 1024**2  # bytes of Ray's object store on each node


def _ray_processes(temp_dir: str) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if temp_dir in cmd and p.pid != os.getpid():
            found.append(f"{p.pid}: {cmd[:120]}")
    return found


class LocalCluster:
    """Head on 127.0.0.1 and one worker on 127.0.0.2, one CPU each, so two trials must use
    both nodes."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        # Short: Ray's unix socket paths live under it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, object_store_memory=OBJECT_STORE, node_ip_address=HEAD_IP,
            temp_dir=self.temp_dir, include_dashboard=False))
        self.worker = self.cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE,
                                            node_ip_address=WORKER_IP)
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def shutdown(self) -> None:
        try:
            self.cluster.shutdown()
        finally:
            left = _ray_processes(self.temp_dir)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            assert not left, f"Ray processes left behind: {left}"


@pytest.fixture(scope="module")
def two_nodes():
    pytest.importorskip("psutil")
    c = LocalCluster()
    try:
        yield c
    finally:
        c.shutdown()


def _study_cmd(address: str, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "studies" / "voc_ablation.py"), "--smoke-test",
            "--address", address, "--storage", str(storage), "--variants", "supervised,ctt",
            "--seeds", "0", "--out", "mn", *extra]


def _driver_env(tmp: Path) -> dict[str, str]:
    # ray.init(address="127.0.0.1:port") rewrites a loopback address to the machine's IP,
    # where this loopback cluster does not listen; Ray's "no cluster networking" switch keeps
    # it on 127.0.0.1 (on Linux it changes nothing else).
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1",
               CTT_STAGING=str(tmp / "staging"))
    env.pop("RAY_ADDRESS", None)
    return env


def _run_study(cmd: list[str], tmp: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_driver_env(tmp), capture_output=True, text=True,
                          timeout=timeout)


def _tail(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_study_refuses_node_local_storage_on_multi_node_cluster(two_nodes, tmp_path):
    storage = tmp_path / "local_only"
    proc = _run_study(_study_cmd(two_nodes.address, storage), tmp_path, timeout=120)
    assert proc.returncode != 0, _tail(proc)
    # The message names the culprit (the path) and what to pass instead.
    assert "--storage-shared" in proc.stderr and str(storage) in proc.stderr, _tail(proc)
    assert not (storage / "mn").exists()  # refused before anything was written


@pytest.mark.slow
def test_study_runs_on_both_nodes(two_nodes, tmp_path):
    storage = tmp_path / "shared"
    # No shared warm-up (its finishing actor may still hold a node's CPU when the variants
    # start) and trials long enough that both are running at once, one per node: with
    # reuse_actors a trial that finishes before the other node's actor has started (importing
    # torch there takes seconds under load) hands its actor on, and both run on one node.
    # 24 iterations (about 3 s) lost that race in CI; 240 take about 30 s.
    proc = _run_study(_study_cmd(two_nodes.address, storage, "--storage-shared", "--no-fork",
                                 "--set", "optim.iters=240", "--set", "run.eval_every=60",
                                 "--set", "run.checkpoint_every=60"), tmp_path)
    assert proc.returncode == 0, _tail(proc)
    study = storage / "mn"
    trials = read_trials_parquet(study)
    assert sorted(t["variant"] for t in trials) == ["ctt", "supervised"]
    assert all(t["status"] == "TERMINATED" and not t["pruned"] for t in trials), trials
    assert all(t["step"] == t["optim.iters"] for t in trials)
    assert len({t["node_id"] for t in trials}) == 2, ([t["node_id"] for t in trials],
                                                       _tail(proc))
    for t in trials:  # every trial's results came back to the driver on the head
        assert [r["step"] for r in read_trial_metrics(study, t["trial_id"])][-1] == t["optim.iters"]
    for name in ("report.md", "metrics.parquet", "study.json"):
        assert (study / name).is_file(), name


@pytest.mark.slow
def test_worker_node_failure_resumes_trials_from_checkpoints(tmp_path):
    pytest.importorskip("psutil")
    every, iters = 3, 90  # long enough that the kill lands mid-trial
    cluster = LocalCluster()
    proc = None
    try:
        storage = tmp_path / "shared"
        study = storage / "mn"
        cmd = _study_cmd(cluster.address, storage, "--storage-shared", "--no-fork",
                         "--set", f"optim.iters={iters}", "--set", f"run.eval_every={every}",
                         "--set", f"run.checkpoint_every={every}")
        out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(out, "w") as stdout_file, open(err, "w") as stderr_file:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_driver_env(tmp_path),
                                    stdout=stdout_file, stderr=stderr_file,
                                    start_new_session=True)
            # Kill the worker once the driver knows a checkpoint of its trial and before the
            # trial finishes. The first checkpoint's result reaching metrics.jsonl is not
            # enough: Tune may register that checkpoint after the study's callback has written
            # the record, and a kill in between (seen on a loaded machine) restarts the trial
            # from scratch. Tune handles one result at a time, so once a second result is
            # recorded the first one's checkpoint is registered.
            victim, killed_at = None, None
            deadline = time.monotonic() + 180
            while victim is None and time.monotonic() < deadline and proc.poll() is None:
                for path in sorted(study.glob("trials/*/metrics.jsonl")):
                    recs = read_trial_metrics(study, path.parent.name)
                    steps = [r["step"] for r in recs if r.get("node_ip") == WORKER_IP]
                    if steps and max(steps) >= 2 * every:
                        victim, killed_at = path.parent.name, max(steps)
                        break
                time.sleep(0.1)
            assert victim is not None, "no trial on the worker reached a checkpoint"
            cluster.cluster.remove_node(cluster.worker, allow_graceful=False)
            rc = proc.wait(timeout=240)
        log = f"stdout:\n{out.read_text()[-4000:]}\nstderr:\n{err.read_text()[-4000:]}"
        assert rc == 0, log
        assert killed_at < iters, "the worker's trial had finished before the kill"

        trials = {t["trial_id"]: t for t in read_trials_parquet(study)}
        assert len(trials) == 2
        for t in trials.values():
            assert t["status"] == "TERMINATED" and t["step"] == iters and not t["pruned"], t
        info = json.loads((study / "trials" / victim / "trial.json").read_text())
        assert info["num_failures"] >= 1
        # Resumed, not restarted: the steps reported on the worker before the kill survive
        # (a restart from step 0 would replay and replace them), and the head took over after.
        recs = read_trial_metrics(study, victim)
        before = [r["step"] for r in recs if r.get("node_ip") == WORKER_IP]
        after = [r["step"] for r in recs if r.get("node_ip") == HEAD_IP]
        assert before and after, recs
        assert min(before) == every and min(after) > every and max(after) == iters
        assert [r["step"] for r in recs] == list(range(every, iters + 1, every))
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        cluster.shutdown()
