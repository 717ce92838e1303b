"""cluster/gpu.yaml through Ray's real cluster launcher: ``ray up`` of a cluster YAML generated
from it, on fake hosts of this machine (tests/cluster_provider.py: the cloud and SSH faked,
everything else Ray's own), a study submitted to the head with ``ray job submit``, and the
autoscaler that ``ray up`` started on the head (v2 in Ray 2.60) launching a gpu1-shaped worker
for the study's 1-GPU trial, running it there, and removing the worker once it is idle; then
``ray down``.

The generated YAML (:func:`fake_host_config`) keeps gpu.yaml's node types (names, GPU counts,
``max_workers``), its setup command lists (each command replaced by a line appended to the
node's ``~/setup.log``, so the test counts how often each node ran each command: once; the v2
autoscaler would run ``setup_commands`` twice on a worker, cluster/gpu.yaml) and its start
commands with the flags that matter, and changes what one machine needs: the provider, free
ports, per-host IPs and temp dirs (``$FAKE_HOST_*``, set by the provider), a small object
store, a 30 s idle timeout, no Docker, and ``ray stop`` replaced by a stop of this fake host
(``ray stop`` stops every Ray process of the machine, other tests' clusters included).

The GPU is a Ray resource only (no CUDA here): trials train with ``--set run.device=cpu``.
``ray job submit --working-dir .`` ships this checkout as it is on disk.

The commands, in order (``$YAML`` the generated file, ``$DASH`` its dashboard port):

    ray up -y --no-config-cache $YAML
    ray exec --no-config-cache $YAML "ray status"
    ray job submit --address http://127.0.0.1:$DASH --working-dir . -- \
        python studies/voc_ablation.py --smoke-test --variants supervised --seeds 0 \
        --address auto --gpus-per-trial 1 --cpus-per-trial 1 --set run.device=cpu \
        --storage $TMP/shared --storage-shared --out rayup
    ray exec --no-config-cache $YAML "python -c '<a 1-GPU task: ray.get_gpu_ids()>'"
    (wait for the autoscaler to terminate the idle gpu1 worker)
    ray exec --no-config-cache $YAML "ray status"
    ray down -y $YAML
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO_ROOT, read_trial_metrics, read_trials_parquet

TESTS_DIR = REPO_ROOT / "tests"
GPU_YAML = REPO_ROOT / "cluster" / "gpu.yaml"
PROVIDER = "cluster_provider.LoopbackHostProvider"
HEAD_IP = "127.0.0.1"
IDLE_TIMEOUT_MIN = 0.5
OBJECT_STORE = 100_000_000  # bytes per node
SETUP_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands",
               "worker_setup_commands")
# the start flags of gpu.yaml the test keeps as they are
HEAD_FLAGS = ("--autoscaling-config=~/ray_bootstrap_config.yaml", "--dashboard-host=127.0.0.1",
              "--disable-usage-stats")
STOP_HOST = "python -m cluster_provider stop-host"


# --------------------------------------------------------------------------------------------
# The generated cluster YAML
# --------------------------------------------------------------------------------------------


def _gpu_types(cfg: dict) -> list[str]:
    return [name for name, spec in cfg["available_node_types"].items()
            if (spec.get("resources") or {}).get("GPU")]


def _log_line(list_name: str, index: int) -> str:
    return f"echo {list_name}[{index}] >> ~/setup.log"


def _start_command(cmd: str, gcs_port: int, head_ports: tuple[int, int] | None) -> str:
    """gpu.yaml's start command on a fake host: ``ray stop`` stops this host only; ``ray
    start`` keeps its flags but takes the GCS port chosen free, the node's IP, temp dir and six
    node ports from the host's environment (replacing gpu.yaml's fixed object manager port),
    and a small object store; the head also gets free dashboard and client server ports."""
    if cmd.strip() == "ray stop":
        return STOP_HOST
    assert "ray start" in cmd, cmd
    from cluster_provider import PORT_FLAGS

    cmd = re.sub(r"--port=\d+", f"--port={gcs_port}", cmd)
    cmd = re.sub(r"(--address=\$RAY_HEAD_IP):\d+", rf"\1:{gcs_port}", cmd)
    for flag in PORT_FLAGS:
        cmd = re.sub(rf"\s{flag}=\S+", "", cmd)
    extra = ["--node-ip-address=$FAKE_HOST_IP", "--temp-dir=$FAKE_HOST_TEMP_DIR",
             "$FAKE_HOST_PORT_FLAGS", f"--object-store-memory={OBJECT_STORE}"]
    if head_ports:
        extra += [f"--dashboard-port={head_ports[0]}", f"--ray-client-server-port={head_ports[1]}"]
    return f"{cmd.rstrip()} {' '.join(extra)}"


def fake_host_config(state_dir: Path, ports: tuple[int, int, int] = (41001, 41002, 41003),
                     source: Path = GPU_YAML, gpus: str = "kept") -> dict:
    """The cluster YAML ``ray up`` gets: ``source`` (cluster/gpu.yaml) on fake hosts whose
    state lives in ``state_dir``; ``ports``: GCS, dashboard, Ray client server.

    ``gpus``: ``kept``; ``removed`` (every node type with GPUs deleted) or ``zero`` (their GPU
    count set to 0): broken copies no 1-GPU trial fits."""
    cfg = yaml.safe_load(source.read_text())
    gcs, dashboard, client = ports
    cfg.pop("docker", None)
    cfg["provider"] = {"type": "external", "module": PROVIDER, "state_dir": str(state_dir)}
    cfg["auth"] = {"ssh_user": cfg["auth"]["ssh_user"]}  # required by the schema; unused
    cfg["idle_timeout_minutes"] = IDLE_TIMEOUT_MIN
    cfg["file_mounts"] = {}
    # fields of Ray's provider defaults (an external provider gets none of them)
    for key, value in (("cluster_synced_files", []), ("file_mounts_sync_continuously", False),
                       ("rsync_exclude", []), ("rsync_filter", [])):
        cfg.setdefault(key, value)
    for spec in cfg["available_node_types"].values():
        spec["node_config"] = {}
        res = spec.get("resources") or {}
        if res.get("GPU"):  # the GPU count kept, CPUs scaled down: 1 per 2 GPUs, at least 1
            spec["resources"] = {"CPU": max(1, res["GPU"] // 2), "GPU": res["GPU"]}
    for name in SETUP_LISTS:
        cfg[name] = [_log_line(name, i) for i, _ in enumerate(cfg.get(name) or [])]
    cfg["head_start_ray_commands"] = [
        _start_command(c, gcs, (dashboard, client)) for c in cfg["head_start_ray_commands"]]
    cfg["worker_start_ray_commands"] = [
        _start_command(c, gcs, None) for c in cfg["worker_start_ray_commands"]]
    if gpus == "removed":
        for name in _gpu_types(cfg):
            del cfg["available_node_types"][name]
    elif gpus == "zero":
        for name in _gpu_types(cfg):
            cfg["available_node_types"][name]["resources"]["GPU"] = 0
    else:
        assert gpus == "kept", gpus
    return cfg


def _prepared(cfg: dict) -> dict:
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    out = prepare_config(copy.deepcopy(cfg))
    validate_config(out)
    return out


def _schedule_one_trial(cfg: dict, cpus: float = 1, gpus: float = 1) -> tuple[dict, int]:
    """What the v2 autoscaler does for one pending trial (a placement group of one bundle) on
    a cluster of ``cfg`` running its head only: node types it launches, and the requests it
    leaves infeasible."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import GangResourceRequest

    auto = AutoscalingConfig(_prepared(cfg), skip_content_hash=True)
    types = auto.get_node_type_configs()
    types.pop(auto.get_head_node_type())
    request = SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=types,
        max_num_nodes=auto.get_max_num_worker_nodes(),
        gang_resource_requests=[GangResourceRequest(
            requests=[ResourceRequestUtil.make({"CPU": cpus, "GPU": gpus})])])
    reply = ResourceDemandScheduler().schedule(request)
    launched: dict[str, int] = {}
    for launch in reply.to_launch:
        launched[launch.instance_type] = launched.get(launch.instance_type, 0) + launch.count
    return launched, len(reply.infeasible_gang_resource_requests)


def test_generated_config_keeps_gpu_yaml_shape(tmp_path):
    src = yaml.safe_load(GPU_YAML.read_text())
    cfg = fake_host_config(tmp_path)
    _prepared(cfg)  # valid for Ray's schema
    assert list(cfg["available_node_types"]) == list(src["available_node_types"])
    for name, spec in cfg["available_node_types"].items():
        orig = src["available_node_types"][name]
        assert spec.get("max_workers") == orig.get("max_workers"), name
        assert spec["resources"].get("GPU") == orig["resources"].get("GPU"), name
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert cfg["max_workers"] == src["max_workers"]
    for name in SETUP_LISTS:
        assert len(cfg[name]) == len(src.get(name) or []), name
    head = " ".join(cfg["head_start_ray_commands"])
    assert all(flag in head for flag in HEAD_FLAGS), head
    assert "--port=41001" in head and "--dashboard-port=41002" in head, head
    assert all("$RAY_HEAD_IP:41001" in cmd for cmd in cfg["worker_start_ray_commands"]
               if "ray start" in cmd)
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "ray stop" not in cmd, cmd  # it would stop every Ray process of the machine
        assert not re.search(r"[:=](6379|8076)\b", cmd), cmd  # gpu.yaml's fixed ports


@pytest.mark.parametrize("gpus", ["kept", "removed", "zero"])
def test_one_gpu_trial_placed_on_gpu1_only_when_a_gpu_type_exists(tmp_path, gpus):
    """Ray's v2 scheduler on the generated YAML: a 1-GPU trial gets one gpu1 node; with the
    GPU node types removed, or their GPUs set to 0, it is infeasible (the study's trial could
    never start)."""
    launched, infeasible = _schedule_one_trial(fake_host_config(tmp_path, gpus=gpus))
    if gpus == "kept":
        assert (launched, infeasible) == ({"gpu1": 1}, 0)
    else:
        assert (launched, infeasible) == ({}, 1)


# --------------------------------------------------------------------------------------------
# `ray up` for real
# --------------------------------------------------------------------------------------------


class RayUpCluster:
    """A generated YAML, the environment of the ``ray`` commands run against it, and the
    teardown that stops everything even when a step failed."""

    def __init__(self, tmp_path: Path) -> None:
        from cluster_provider import _free_ports

        # Short: the fake hosts' Ray temp dirs live under it (108-byte unix socket paths).
        self.state_dir = Path(tempfile.mkdtemp(prefix="rup", dir="/tmp"))
        self.gcs_port, self.dashboard_port, self.client_port = _free_ports(3)
        self.cfg = fake_host_config(self.state_dir,
                                    (self.gcs_port, self.dashboard_port, self.client_port))
        self.yaml = self.state_dir / "cluster.yaml"
        self.yaml.write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        self.tmp_path = tmp_path
        self.log: list[str] = []
        self.downed = False

    @property
    def dashboard(self) -> str:
        return f"http://{HEAD_IP}:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """The laptop's environment: this interpreter's ``ray`` first on PATH, tests/ on
        PYTHONPATH (``ray up`` imports the provider module), no cluster of the caller's."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RAY_") or k == "RAY_USAGE_STATS_ENABLED"}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(TESTS_DIR), env.get("PYTHONPATH", "")] if p)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def run(self, args: list[str], timeout: float, check: bool = True
            ) -> subprocess.CompletedProcess:
        """``args`` in its own process group (killed whole on timeout), output kept."""
        t0 = time.monotonic()
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            self.log.append(f"$ {shlex.join(args)}\nTIMEOUT after {timeout} s\n{out[-6000:]}")
            raise AssertionError(self.log[-1]) from None
        result = subprocess.CompletedProcess(args, proc.returncode, out, "")
        self.log.append(f"$ {shlex.join(args)}  ({time.monotonic() - t0:.1f} s, "
                        f"rc={proc.returncode})\n{out[-6000:]}")
        assert proc.returncode == 0 or not check, self.log[-1]
        return result

    def ray(self, *args: str, timeout: float = 240, check: bool = True
            ) -> subprocess.CompletedProcess:
        return self.run([str(Path(sys.executable).parent / "ray"), *args], timeout, check)

    def exec(self, cmd: str, timeout: float = 120) -> str:
        """``ray exec``: ``cmd`` on the head; its output."""
        return self.ray("exec", "--no-config-cache", str(self.yaml), cmd, timeout=timeout).stdout

    # what the provider recorded

    def nodes(self) -> dict[str, dict[str, Any]]:
        from cluster_provider import read_state

        return read_state(self.state_dir)["nodes"]

    def workers(self) -> dict[str, dict[str, Any]]:
        return {nid: n for nid, n in self.nodes().items() if n["ip"] != HEAD_IP}

    def head(self) -> tuple[str, dict[str, Any]]:
        heads = [(nid, n) for nid, n in self.nodes().items() if n["ip"] == HEAD_IP]
        assert len(heads) == 1, self.nodes()
        return heads[0]

    def setup_log(self, node: dict[str, Any]) -> list[str]:
        path = Path(node["host_dir"]) / "home" / "setup.log"
        return path.read_text().splitlines() if path.exists() else []

    def processes(self, node_id: str | None = None) -> list[str]:
        from cluster_provider import host_processes

        out = []
        for p in host_processes(self.state_dir, node_id):
            with contextlib.suppress(Exception):
                out.append(f"{p.pid}: {' '.join(p.cmdline())[:150]}")
        return out

    def teardown(self) -> list[str]:
        """``ray down`` (unless done), then SIGKILL whatever of the fake hosts is left; returns
        what had to be killed."""
        from cluster_provider import kill_host

        if not self.downed:
            with contextlib.suppress(AssertionError, OSError):
                self.ray("down", "-y", str(self.yaml), timeout=180, check=False)
        killed = kill_host(self.state_dir, None, grace=2.0)
        # `ray down` caches the resolved config in the temp dir (it has no --no-config-cache)
        for path in Path(tempfile.gettempdir()).glob("ray-config-*"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                if json.loads(path.read_text())["config"]["provider"].get(
                        "state_dir") == str(self.state_dir):
                    path.unlink()
        return killed

    def dump(self) -> str:
        """Everything for a failure message: the commands' output, the provider's state, the
        autoscaler's log."""
        parts = self.log[-8:]
        with contextlib.suppress(Exception):
            parts.append("provider state: " + json.dumps(self.nodes(), indent=1)[-4000:])
        for pattern in ("monitor.log", "monitor.out", "monitor.err"):
            for path in sorted(self.state_dir.glob(f"h/*/ray/session_latest/logs/{pattern}")):
                with contextlib.suppress(OSError):
                    parts.append(f"--- {path}\n{path.read_text()[-5000:]}")
        return "\n\n".join(parts)


def _wait(what: str, cond, timeout: float, cluster: RayUpCluster, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what}\n{cluster.dump()}")


GPU_CHECK = """
import json, os, ray
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
@ray.remote(num_cpus=1, num_gpus=1)
def where():
    return {"gpu_ids": ray.get_gpu_ids(), "node_ip": ray.util.get_node_ip_address(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
print("GPU-CHECK " + json.dumps(ray.get(where.remote(), timeout=180)))
"""


@pytest.mark.slow
def test_ray_up_autoscales_a_gpu1_worker_for_a_study(tmp_path):
    """``ray up`` -> head only; a 1-GPU study -> the autoscaler launches one gpu1 node, the
    trial runs there; idle -> the node is removed; ``ray down`` -> nothing left."""
    pytest.importorskip("psutil")
    from ray.autoscaler.tags import (
        NODE_KIND_HEAD,
        NODE_KIND_WORKER,
        STATUS_UP_TO_DATE,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_STATUS,
        TAG_RAY_USER_NODE_TYPE,
    )

    c = RayUpCluster(tmp_path)
    timeline: list[str] = []
    t0 = time.monotonic()

    def note(msg: str) -> None:
        timeline.append(f"{time.monotonic() - t0:6.1f} s  {msg}")

    left: list[str] = []
    try:
        # --- ray up: the head, its setup commands once, its autoscaler (v2) ---
        c.ray("up", "-y", "--no-config-cache", str(c.yaml), timeout=300)
        note("ray up returned")
        head_id, head = c.head()
        assert not c.workers(), c.dump()
        assert head["tags"][TAG_RAY_USER_NODE_TYPE] == "ray.head.default", head
        assert head["tags"][TAG_RAY_NODE_KIND] == NODE_KIND_HEAD, head
        assert head["tags"][TAG_RAY_NODE_STATUS] == STATUS_UP_TO_DATE, head
        assert sorted(c.setup_log(head)) == sorted(
            [f"initialization_commands[{i}]" for i in range(len(c.cfg["initialization_commands"]))]
            + [f"head_setup_commands[{i}]" for i in range(len(c.cfg["head_setup_commands"]))]
        ), c.setup_log(head)
        bootstrap = Path(head["host_dir"]) / "home" / "ray_bootstrap_config.yaml"
        assert yaml.safe_load(bootstrap.read_text())["provider"]["module"] == PROVIDER
        monitors = [p for p in c.processes(head_id)
                    if "ray/autoscaler/" in p and "monitor.py" in p]
        assert len(monitors) == 1, c.processes(head_id)
        # the autoscaler the head runs: v2 (`ray up` starts the head with
        # RAY_enable_autoscaler_v2=1), its v2 monitor module on the command line
        assert "autoscaler/v2/monitor.py" in monitors[0], monitors

        status = c.exec("ray status")
        alive = status.split("Active:", 1)[1].split("Pending:", 1)[0]  # Active + Idle nodes
        assert "ray.head.default" in alive and "gpu1" not in alive, status

        # --- a trial shape no node type holds: refused with one line, nothing launched ---
        storage = tmp_path / "shared"
        refused = c.ray("job", "submit", "--address", c.dashboard, "--working-dir", ".", "--",
                        "python", "studies/voc_ablation.py", "--smoke-test", "--variants",
                        "supervised", "--seeds", "0", "--gpus-per-trial", "8",
                        "--cpus-per-trial", "1", "--set", "run.device=cpu", "--storage",
                        str(storage), "--storage-shared", "--out", "too-big", timeout=300,
                        check=False)
        out = refused.stdout + refused.stderr
        assert "--cpus-per-trial 1 --gpus-per-trial 8: no node of this cluster has that much" \
            in out and "ray_bootstrap_config.yaml" in out and "Traceback" not in out, out[-3000:]
        assert not c.workers(), c.dump()
        note("an 8-GPU trial shape refused")

        # --- a study whose one trial asks for 1 GPU: nothing on the head fits it ---
        submitted = time.time()
        note("ray job submit (blocks until the job ends)")
        job = c.ray("job", "submit", "--address", c.dashboard, "--working-dir", ".", "--",
                    "python", "studies/voc_ablation.py", "--smoke-test", "--variants",
                    "supervised", "--seeds", "0", "--address", "auto", "--gpus-per-trial", "1",
                    "--cpus-per-trial", "1", "--set", "run.device=cpu", "--storage",
                    str(storage), "--storage-shared", "--out", "rayup", timeout=480)
        job_done = time.time()
        note("job ended")
        assert re.search(r"Job 'raysubmit_\w+' succeeded", job.stdout), job.stdout[-4000:]
        workers = c.workers()
        assert len(workers) == 1, c.dump()
        wid, worker = next(iter(workers.items()))
        times = dict(worker["status_times"][1:])
        note(f"worker {wid} ({worker['ip']}) created {worker['created'] - submitted:.1f} s "
             f"after the submission, up-to-date (Ray started) "
             f"{times.get(STATUS_UP_TO_DATE, float('nan')) - worker['created']:.1f} s later")
        assert worker["tags"][TAG_RAY_USER_NODE_TYPE] == "gpu1", worker
        assert worker["tags"][TAG_RAY_NODE_KIND] == NODE_KIND_WORKER, worker
        assert worker["resources"] == {"CPU": 1, "GPU": 1}, worker
        assert sorted(c.setup_log(worker)) == sorted(
            [f"initialization_commands[{i}]" for i in range(len(c.cfg["initialization_commands"]))]
            + [f"worker_setup_commands[{i}]" for i in range(len(c.cfg["worker_setup_commands"]))]
        ), c.setup_log(worker)

        study = storage / "rayup"
        for name in ("report.md", "trials.parquet", "metrics.parquet", "study.json"):
            assert (study / name).is_file(), name
        trials = read_trials_parquet(study)
        assert [(t["variant"], t["status"]) for t in trials] == [("supervised", "TERMINATED")]
        records = read_trial_metrics(study, trials[0]["trial_id"])
        assert records and {r["node_ip"] for r in records} == {worker["ip"]}, records

        # Ray's view of that node: GPU 1, the worker's IP, the trial's node id. The study
        # records no GPU ids, so ask the node directly (while it is still there).
        from ray.util.state import list_nodes

        ray_nodes = {n.node_ip: n for n in list_nodes(address=c.dashboard, detail=True)}
        assert ray_nodes[worker["ip"]].resources_total.get("GPU") == 1, ray_nodes
        assert ray_nodes[worker["ip"]].resources_total.get("CPU") == 1, ray_nodes
        assert not ray_nodes[HEAD_IP].resources_total.get("CPU"), ray_nodes  # {"CPU": 0}
        assert trials[0]["node_id"] == ray_nodes[worker["ip"]].node_id
        last_use = job_done
        if c.workers()[wid]["state"] == "running":
            out = c.exec(f"python -c {shlex.quote(GPU_CHECK)}", timeout=240)
            last_use = time.time()
            check = json.loads(out.split("GPU-CHECK ", 1)[1].splitlines()[0])
            note(f"a 1-GPU task on the cluster: {check}")
            assert check["gpu_ids"] == [0] and check["cuda_visible_devices"] == "0", check
            assert check["node_ip"] in {n["ip"] for n in c.workers().values()}, check

        # --- idle: the autoscaler terminates the worker(s), their processes go ---
        _wait("the idle gpu1 worker terminated",
              lambda: all(n["state"] == "terminated" for n in c.workers().values()),
              timeout=240, cluster=c)
        gone = c.workers()[wid]["terminated"]
        note(f"worker {wid} terminated {gone - last_use:.1f} s after its last task ended "
             f"(idle_timeout_minutes {IDLE_TIMEOUT_MIN})")
        _wait("no process of the terminated worker(s)",
              lambda: not any(c.processes(n) for n in c.workers()), timeout=60, cluster=c)
        assert [n["tags"][TAG_RAY_USER_NODE_TYPE] for n in c.workers().values()].count(
            "gpu1") == len(c.workers()), c.dump()
        assert all(c.setup_log(n).count("worker_setup_commands[0]") == 1
                   for n in c.workers().values())
        status = c.exec("ray status")
        alive = status.split("Active:", 1)[1].split("Pending:", 1)[0]
        assert "ray.head.default" in alive and "gpu1" not in alive, status
        assert c.processes(head_id), "the head stopped with its worker"

        # --- ray down: the head goes, nothing of any fake host is left ---
        down = c.ray("down", "-y", str(c.yaml), timeout=180).stdout
        c.downed = True
        note("ray down returned")
        # its `ray stop` on the head was the fake host's (this host's processes only)
        assert f"fake host {head_id}: stopped" in down, down[-3000:]
        assert all(n["state"] == "terminated" for n in c.nodes().values()), c.nodes()
        _wait("no process of any fake host after ray down", lambda: not c.processes(),
              timeout=60, cluster=c)
    finally:
        try:
            left = c.teardown()
        finally:
            shutil.rmtree(c.state_dir, ignore_errors=True)
        print("\n".join(timeline))
    assert not left, f"ray down left processes that teardown had to kill: {left}"
