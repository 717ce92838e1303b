"""cluster/*.yaml against the Ray autoscaler, offline: schema, security settings, node types,
the setup commands' pins and the capacity README.md states. (Studies on a multi-node cluster
started on this machine: tests/scenarios/test_cluster_runs.py.)
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_YAML = ROOT / "cluster" / "gpu.yaml"
LOCAL_YAML = ROOT / "cluster" / "local.yaml"
CONFIGS = [GPU_YAML, LOCAL_YAML]


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
    """What every worker installs (the head runs the same lines and its viewers)."""
    cmds = " ".join(cfg["setup_commands"] + cfg["worker_setup_commands"])
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)==([^"]+)"',
                                                                cmds)}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_setup_installs_every_project_dependency(path):
    """Each runtime dependency of pyproject.toml (core + the tune extra; Ray comes with the
    image) is pinned in the workers' setup commands to a version its specifier admits."""
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
        assert name in pins, f"{path.name}: the workers' setup commands do not install {name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{path.name}: {name}=={pins[name]} outside pyproject's {req.specifier}")


def _capacity_table() -> list[tuple[float, float, dict[str, int], int]]:
    """cluster/README.md's capacity rows: (GPUs, CPUs per trial, nodes launched, at once)."""
    rows = []
    text = (ROOT / "cluster" / "README.md").read_text()
    row = r"^\| `--gpus-per-trial (\S+) --cpus-per-trial (\S+)` \| (.*?) \| (\d+) \|$"
    for m in re.finditer(row, text, re.M):
        nodes = {t: int(n) for n, t in re.findall(r"(\d+) × `(\w+)`", m.group(3))}
        rows.append((float(m.group(1)), float(m.group(2)), nodes, int(m.group(4))))
    return rows


def test_ray_up_starts_the_v2_autoscaler():
    """The capacity figures use v2's scheduler because `ray up` starts v2 unless told not to;
    a Ray that changes that default must change cluster_capacity and the README table."""
    import inspect

    from ray.autoscaler._private import commands

    src = inspect.getsource(commands.get_or_create_head_node)
    assert 'os.getenv("RAY_UP_enable_autoscaler_v2", "1") == "1"' in src


def test_gpu_yaml_capacity_matches_readme():
    """Every trial shape of cluster/README.md's capacity table, for the 21-trial VOC ablation,
    as the autoscaler's own v2 scheduler places it on gpu.yaml."""
    from ctt.tune.cluster_capacity import trials_at_once

    cfg = _load(GPU_YAML)
    rows = _capacity_table()
    assert len(rows) >= 5 and {g for g, *_ in rows} >= {0.5, 1, 2, 8}
    for gpus, cpus, nodes, at_once in rows:
        cap = trials_at_once(cfg, 21, cpus, gpus)
        assert (cap.nodes, cap.at_once) == (nodes, at_once), (gpus, cpus, cap)
        assert cap.waiting == 21 - at_once
    assert trials_at_once(cfg, 3, 4, 1).nodes == {"gpu1": 3}
    assert "three `gpu1` nodes" in (ROOT / "cluster" / "README.md").read_text()
    top = max(at for g, c, _, at in rows if (g, c) == (1, 4))
    assert f"runs {top} trials at once" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("broken", ["no gpu types", "gpu types without GPUs", "max_workers 0"])
def test_capacity_of_a_gpu_yaml_without_usable_gpu_nodes_is_zero(broken):
    """The capacity check fails when gpu.yaml's GPU node types go or stop fitting a trial."""
    from ctt.tune.cluster_capacity import fit_problem, trials_at_once

    cfg = _load(GPU_YAML)
    types = cfg["available_node_types"]
    for name in ("gpu1", "gpu4"):
        if broken == "no gpu types":
            del types[name]
        elif broken == "gpu types without GPUs":
            types[name]["resources"].pop("GPU")
        else:
            types[name]["max_workers"] = 0
    cap = trials_at_once(cfg, 21, 4, 1)
    assert (cap.nodes, cap.at_once, cap.waiting) == ({}, 0, 21)
    line = fit_problem(4, 1, [{"CPU": 0.0}], cfg, "/home/ubuntu/ray_bootstrap_config.yaml")
    assert line and line.startswith("--cpus-per-trial 4 --gpus-per-trial 1: no node")
    assert "ray_bootstrap_config.yaml" in line and "\n" not in line


def test_fit_problem_reference_cases():
    """A shape fits when an alive node holds it (whatever the autoscaler), or when the
    autoscaler can add a node type that holds it; with no autoscaler it is not refused (a node
    may still join by hand)."""
    from ctt.tune.cluster_capacity import fit_problem, trials_at_once

    cfg = _load(GPU_YAML)
    head = [{"CPU": 0.0}]
    assert fit_problem(4, 1, head, cfg, "c.yaml") is None  # gpu1 will be launched
    assert fit_problem(12, 4, head, cfg, "c.yaml") is None  # gpu4
    assert fit_problem(4, 8, head, cfg, "c.yaml") is not None
    assert fit_problem(49, 1, head, cfg, "c.yaml") is not None  # no type has 49 CPUs
    assert fit_problem(4, 8, [*head, {"CPU": 64.0, "GPU": 8.0}], cfg, "c.yaml") is None
    assert fit_problem(4, 8, head, None, None) is None
    # the head's own resources count: a CPU head runs CPU trials itself
    local = _load(LOCAL_YAML)
    local["available_node_types"] = {
        "head": {"resources": {"CPU": 4}, "node_config": {}, "max_workers": 0},
        "w": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 1}}
    local["head_node_type"] = "head"
    local["provider"] = {"type": "aws", "region": "us-east-1"}
    assert trials_at_once(local, 3, 2, 0).at_once == 3  # 2 on the head, 1 on a new worker
    assert trials_at_once(local, 3, 2, 0).nodes == {"w": 1}
    assert trials_at_once(local, 5, 2, 0).waiting == 2


def _setup_lists(cfg: dict) -> tuple[list[str], list[str]]:
    return cfg["head_setup_commands"], cfg["worker_setup_commands"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_node_runs_each_setup_command_once(path):
    """`ray up` merges setup_commands into the head and worker lists for its bootstrap config;
    the v2 autoscaler on the head merges the already-merged config again. Both merges must
    leave each command once per node (the config keeps setup_commands empty)."""
    from ray.autoscaler._private.util import prepare_config

    raw = _load(path)
    once = prepare_config(copy.deepcopy(raw))
    twice = prepare_config(copy.deepcopy(once))
    for cmds in (*_setup_lists(once), *_setup_lists(twice)):
        assert len(cmds) == len(set(cmds)), cmds
    assert _setup_lists(once) == _setup_lists(twice)
    # the workers install what the head installs (the head adds its viewers)
    head, worker = _setup_lists(twice)
    assert worker and set(worker) <= set(head)
    if raw["provider"]["type"] == "local":
        return  # Ray prepares a local-provider config once (prepare_local): no second merge
    # negative case: the same commands under setup_commands run twice on a v2 head
    moved = copy.deepcopy(raw)
    moved["setup_commands"], moved["worker_setup_commands"] = worker, []
    again = prepare_config(prepare_config(moved))
    assert len(again["worker_setup_commands"]) == 2 * len(worker)


def test_study_finds_its_clusters_autoscaler_and_refuses_a_shape_it_cannot_launch(
        tmp_path, monkeypatch):
    """check_cluster_fits reads the autoscaler config off the monitor process of the cluster
    the study joined (matched by GCS address, not any monitor on the machine), then refuses a
    shape no alive node and no node type holds: one line naming the config."""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    import ray

    from ctt.errors import UserError
    from ctt.tune import cluster_capacity

    config = tmp_path / "ray_bootstrap_config.yaml"
    config.write_text(GPU_YAML.read_text())
    sleeper = "import time; time.sleep(60)"
    # two monitors on one machine: another cluster's, and ours
    procs = [subprocess.Popen([sys.executable, "-c", sleeper, f"--gcs-address={gcs}",
                               f"--autoscaling-config={path}"])
             for gcs, path in (("127.0.0.1:7001", tmp_path / "other.yaml"),
                               ("127.0.0.1:7002", config))]
    try:
        deadline = time.monotonic() + 30
        while (cluster_capacity.autoscaler_config_path("127.0.0.1:7002") is None
               and time.monotonic() < deadline):
            time.sleep(0.1)
        assert cluster_capacity.autoscaler_config_path("127.0.0.1:7002") == str(config)
        assert cluster_capacity.autoscaler_config_path("127.0.0.1:7003") is None

        monkeypatch.setattr(ray, "nodes", lambda: [
            {"Alive": True, "Resources": {"CPU": 0.0}},
            {"Alive": False, "Resources": {"CPU": 96.0, "GPU": 8.0}}])  # dead: no help
        monkeypatch.setattr(ray, "get_runtime_context",
                            lambda: SimpleNamespace(gcs_address="127.0.0.1:7002"))
        assert cluster_capacity.check_cluster_fits(4, 1) == str(config)
        with pytest.raises(UserError) as e:
            cluster_capacity.check_cluster_fits(4, 8)
        msg = str(e.value)
        assert msg.startswith("--cpus-per-trial 4 --gpus-per-trial 8: no node of this cluster")
        assert str(config) in msg and "gpu4 (CPU 48, GPU 4, at most 2)" in msg
        # an unreadable config: judged by the alive nodes only, so not refused
        config.write_text("{not yaml: [")
        assert cluster_capacity.check_cluster_fits(4, 8) == str(config)
    finally:
        for p in procs:
            p.kill()
            p.wait()
