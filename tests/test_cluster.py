"""cluster/*.yaml against the Ray autoscaler, offline: schema, security settings, node types,
the setup commands' pins and the capacity README.md states. (Studies on a multi-node cluster
started on this machine: tests/scenarios/test_cluster_runs.py.)
"""

from __future__ import annotations

import copy
import functools
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
