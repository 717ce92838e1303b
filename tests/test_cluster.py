"""cluster/*.yaml against the Ray autoscaler (offline), and studies on a multi-node Ray cluster
started on this machine (head + worker via ``ray.cluster_utils.Cluster``).

On one machine every node would report the same IP, so the worker node is put on 127.0.0.2 (the
whole 127/8 block is loopback on Linux): ``node_ip``/``node_id`` then tell the nodes apart, as
distinct hosts would on a real cluster. The study driver runs in a subprocess that joins the
cluster with ``--address``, like ``ray job submit`` on the head.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_YAML = ROOT / "cluster" / "gpu.yaml"
LOCAL_YAML = ROOT / "cluster" / "local.yaml"
CONFIGS = [GPU_YAML, LOCAL_YAML]
WORKER_IP = "127.0.0.2"
HEAD_IP = "127.0.0.1"
OBJECT_STORE = 200 * 1024**2


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connect or DNS lookup fails: 'offline' is enforced, not assumed."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during offline validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(_load(path)))
    validate_config(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# The YAML files, offline
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_against_ray_schema_offline(path, no_network):
    cfg = _prepared(path)
    assert cfg["head_node_type"] in cfg["available_node_types"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_validation_rejects_a_broken_copy(path):
    """The schema check is real: a misspelt top-level key and a wrong type are refused."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _load(path)
    bad["max_worker"] = 3  # typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(bad))
    bad = _load(path)
    bad["idle_timeout_minutes"] = "ten"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


CREDENTIAL_PATTERNS = [
    r"aws_access_key", r"aws_secret", r"AKIA[0-9A-Z]{16}", r"ASIA[0-9A-Z]{16}",
    r"aws_session_token", r"\b\d{12}\b", r"arn:aws:iam::\d+", r"BEGIN [A-Z ]*PRIVATE KEY",
    r"password", r"RAY_AUTH_TOKEN",
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_security(path):
    text = path.read_text()
    for pattern in CREDENTIAL_PATTERNS:
        assert not re.search(pattern, text, re.IGNORECASE), f"{path.name}: matches {pattern!r}"
    cfg = _prepared(path)
    dumped = yaml.safe_dump(cfg)  # comments may explain 0.0.0.0/0; settings may not hold it
    assert "0.0.0.0/0" not in dumped and "::/0" not in dumped
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "--dashboard-host=0.0.0.0" not in head and "--include-dashboard=false" not in head
    # The image is the Ray the tests run (ray up / job submit need the same version on both
    # ends), a CUDA image, and not the discontinued ray-ml line.
    import ray

    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "ray-ml" not in text


def test_gpu_yaml_ssh_and_iam():
    """Ray creates a default security group with SSH open to 0.0.0.0/0 for any node type
    without SecurityGroupIds (ray/autoscaler/_private/aws/config.py,
    _create_default_ssh_inbound_rules), so every node type must name the user's group; instance
    profiles are referenced by name (an ARN would carry an account id)."""
    cfg = _prepared(GPU_YAML)
    assert "security_group" not in cfg["provider"]  # ignored when groups are given: misleading
    for name, node_type in cfg["available_node_types"].items():
        nc = node_type["node_config"]
        assert nc.get("SecurityGroupIds"), f"{name}: no SecurityGroupIds"
        assert set(nc["IamInstanceProfile"]) == {"Name"}, name
    assert "SET_YOURS" in GPU_YAML.read_text()  # placeholders stay visible until edited


def test_gpu_yaml_node_types():
    cfg = _prepared(GPU_YAML)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # the head runs no trials
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert all(v["min_workers"] == 0 for v in workers.values())
    gpus = sorted(v["resources"]["GPU"] for v in workers.values())
    assert gpus[0] == 1 and gpus[-1] > 1  # one-trial nodes and nodes packing several
    assert 0 < cfg["max_workers"] <= 16 and 0 < cfg["idle_timeout_minutes"] <= 30
    assert cfg["provider"]["cache_stopped_nodes"] is False


def test_local_yaml_head_runs_no_trials():
    cfg = _prepared(LOCAL_YAML)
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    assert cfg["max_workers"] >= len(cfg["provider"]["worker_ips"])


def _pins(cfg: dict) -> dict[str, str]:
    cmds = " ".join(cfg["setup_commands"])
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)==([^"]+)"',
                                                                cmds)}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_setup_installs_every_project_dependency(path):
    """Each runtime dependency of pyproject.toml (core + the tune extra; Ray comes with the
    image) is pinned in setup_commands to a version its specifier admits."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in
            project["dependencies"] + project["optional-dependencies"]["tune"]]
    pins = _pins(_load(path))
    for req in reqs:
        name = req.name.lower()
        if name == "ray":
            continue
        assert name in pins, f"{path.name}: setup_commands do not install {name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{path.name}: {name}=={pins[name]} outside pyproject's {req.specifier}")


def _trials_at_once(cfg: dict, n_trials: int, cpus: float, gpus: float) -> tuple[dict, int]:
    """Nodes the Ray autoscaler would add for n_trials pending trials, and trials left over."""
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary,
    )
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )

    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary({}))
    add, left = get_nodes_for(cfg["available_node_types"], {cfg["head_node_type"]: 1},
                              cfg["head_node_type"], cfg["max_workers"],
                              [{"CPU": cpus, "GPU": gpus}] * n_trials, scorer)
    return dict(add), len(left)


def test_gpu_yaml_capacity_matches_readme():
    """The autoscaler's own bin packing: a 3-trial study gets three 1-GPU nodes; the full VOC
    ablation (21 trials, 4 CPUs + 1 GPU each) 14 trials at once, as README.md says."""
    cfg = _prepared(GPU_YAML)
    assert _trials_at_once(cfg, 3, 4, 1) == ({"gpu1": 3}, 0)
    add, left = _trials_at_once(cfg, 21, 4, 1)
    assert add == {"gpu4": 2, "gpu1": 6} and left == 7
    readme = (ROOT / "README.md").read_text()
    assert "14 trials at once" in readme


# --------------------------------------------------------------------------------------------
# Multi-node studies on this machine
# --------------------------------------------------------------------------------------------


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
    return [sys.executable, str(ROOT / "studies" / "voc_ablation.py"), "--smoke-test",
            "--address", address, "--storage", str(storage), "--variants", "supervised,ctt",
            "--seeds", "0", "--out", "mn", *extra]


def _driver_env(tmp: Path) -> dict[str, str]:
    # ray.init(address="127.0.0.1:port") rewrites a loopback address to the machine's IP,
    # where this loopback cluster does not listen; Ray's "no cluster networking" switch keeps
    # it on 127.0.0.1 (on Linux it changes nothing else).
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1",
               CTT_STAGING=str(tmp / "staging"), CTT_OPTUNA_DIR=str(tmp / "optuna"))
    env.pop("RAY_ADDRESS", None)
    return env


def _run_study(cmd: list[str], tmp: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_driver_env(tmp), capture_output=True, text=True,
                          timeout=timeout)


def _trials(study: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(study / "trials.parquet").to_pylist()


def _records(study: Path, trial_id: str) -> list[dict]:
    path = study / "trials" / trial_id / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    trials = _trials(study)
    assert sorted(t["variant"] for t in trials) == ["ctt", "supervised"]
    assert all(t["status"] == "TERMINATED" and not t["pruned"] for t in trials), trials
    assert all(t["step"] == t["optim.iters"] for t in trials)
    assert len({t["node_id"] for t in trials}) == 2, ([t["node_id"] for t in trials],
                                                       _tail(proc))
    for t in trials:  # every trial's results came back to the driver on the head
        assert [r["step"] for r in _records(study, t["trial_id"])][-1] == t["optim.iters"]
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
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=_driver_env(tmp_path), stdout=fo,
                                    stderr=fe, start_new_session=True)
            # Kill the worker once its trial has a checkpoint (a reported multiple of
            # checkpoint_every: the checkpoint is persisted before the result reaches the
            # driver) and before it finishes.
            victim, killed_at = None, None
            deadline = time.monotonic() + 180
            while victim is None and time.monotonic() < deadline and proc.poll() is None:
                for path in sorted(study.glob("trials/*/metrics.jsonl")):
                    recs = _records(study, path.parent.name)
                    steps = [r["step"] for r in recs if r.get("node_ip") == WORKER_IP]
                    if steps and max(steps) >= every:
                        victim, killed_at = path.parent.name, max(steps)
                        break
                time.sleep(0.1)
            assert victim is not None, "no trial on the worker reached a checkpoint"
            cluster.cluster.remove_node(cluster.worker, allow_graceful=False)
            rc = proc.wait(timeout=240)
        log = f"stdout:\n{out.read_text()[-4000:]}\nstderr:\n{err.read_text()[-4000:]}"
        assert rc == 0, log
        assert killed_at < iters, "the worker's trial had finished before the kill"

        trials = {t["trial_id"]: t for t in _trials(study)}
        assert len(trials) == 2
        for t in trials.values():
            assert t["status"] == "TERMINATED" and t["step"] == iters and not t["pruned"], t
        info = json.loads((study / "trials" / victim / "trial.json").read_text())
        assert info["num_failures"] >= 1
        # Resumed, not restarted: the steps reported on the worker before the kill survive
        # (a restart from step 0 would replay and replace them), and the head took over after.
        recs = _records(study, victim)
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
