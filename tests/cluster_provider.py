"""A test-only node provider for Ray's cluster launcher: every "machine" of the cluster is a
fake host on this machine, so ``ray up`` / ``ray exec`` / ``ray down`` and the autoscaler that
``ray up`` starts on the head run for real, without a cloud (tests/scenarios/test_ray_up.py).

Ray's own ``fake_multinode`` provider cannot serve ``ray up`` (the wheel lacks its
``example.yaml``) and skips the node updater (setup and start commands), which is what a cluster
YAML is about; this one fakes only the cloud and SSH:

- **Machines** are records in ``<state_dir>/nodes.json`` (under a file lock: the ``ray up``
  process and the head's autoscaler both create, tag and terminate nodes). Each node has an id
  (``n1``, ``n2``, ... never reused), its tags (the autoscaler's ``ray-node-kind``,
  ``ray-user-node-type``, ``ray-node-status``, ``ray-launch-config``, ... as v1's
  ``StandardAutoscaler`` and v2's ``NodeProviderAdapter`` read them), an IP on loopback
  (the head ``127.0.0.1``, workers ``127.0.0.2``, ``127.0.0.3``, ...: all of 127/8 is
  loopback on Linux), free ports of its own and a host directory ``<state_dir>/h/<id>`` with
  its ``home`` and its Ray temp dir (``ray``). Creating a node starts nothing: the machine is
  "up" and the node updater runs the YAML's commands on it.
- **SSH** is :class:`LoopbackHostCommandRunner`: a command runs in ``bash -c`` in the node's
  own session with the node's environment (:meth:`LoopbackHostProvider.host_env`: its own
  ``HOME``, ``RAY_TMPDIR``, ``PATH``, ``PYTHONPATH`` with this directory, so the head's
  autoscaler imports this module too) instead of the caller's, and rsync is a file copy into
  the node's home (``~/ray_bootstrap_config.yaml``).
- **Network**: a node's ``ray start`` takes ``--node-ip-address=$FAKE_HOST_IP``,
  ``--temp-dir=$FAKE_HOST_TEMP_DIR`` and ``$FAKE_HOST_PORT_FLAGS`` (its six node ports) from
  that environment. Ray rewrites a loopback ``--address`` to the machine's routable IP
  (``resolve_ip_for_localhost``), where a head bound to 127.0.0.1 does not listen; so the
  ``ray`` first on a fake host's ``PATH`` (``<state_dir>/bin/ray``) is Ray's CLI without that
  rewrite, as a host whose own network is loopback would have. The head also gets Ray's "no
  cluster networking" switch (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``): its servers bind to
  127.0.0.1 and a job driver's ``--address auto`` stays there.
- **``ray stop``** on a real host stops the Ray processes of that host; here it would stop
  every Ray process of the machine, other tests' clusters included. On a fake host the
  ``ray`` on ``PATH`` runs ``stop`` as :func:`stop_host` (this host's processes only), which
  ``ray down`` relies on (it runs ``ray stop`` on the head); a YAML's start commands call it as
  ``python -m cluster_provider stop-host``.
- **Terminating** a node (the autoscaler removing an idle worker, ``ray down``) kills the
  node's processes: those whose environment carries the node's marker (``CTT_FAKE_HOST``),
  those whose command line names its host directory (Ray's processes carry their temp dir;
  ``setproctitle`` may overwrite a worker's command line and environment) and every
  descendant of those (workers, actors, job drivers).

Provider config keys besides ``type``/``module``: ``state_dir`` (required; keep it short, Ray's
unix socket paths under it have a 108-byte limit) and ``host_env`` (extra environment of every
host). ``python -m cluster_provider stop-host`` / ``kill-all <state_dir>`` stop one fake host
(from inside it) or every host of a state dir (test teardown).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers import alive_with_descendants
from ray.autoscaler._private.command_runner import _with_environment_variables
from ray.autoscaler._private.subprocess_output_util import ProcessRunnerError
from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND, TAG_RAY_NODE_STATUS

MARKER_ENV = "CTT_FAKE_HOST"  # "<state_dir>#<node id>" in every process a fake host starts
STATE_FILE = "nodes.json"
HEAD_IP = "127.0.0.1"
# The node ports of `ray start` each fake host gets (Ray's defaults would collide: two nodes on
# one machine, and the fixed dashboard agent port 52365 with other tests' clusters).
PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port")
# `ray` on a fake host: Ray's CLI, without the rewrite of a loopback --address, and with
# `ray stop` limited to this host.
RAY_SHIM = """#!{python}
import os, sys
if sys.argv[1:2] == ["stop"]:
    sys.path.insert(0, {here!r})
    import cluster_provider
    sys.exit(cluster_provider.main(["stop-host"]))
from ray._private import services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on every interface now (held open together)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def _locked(state_dir: Path):
    """The state file's lock: exclusive across processes and threads (each call opens its own
    file description, and flock locks belong to those)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "nodes.lock", "w") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def read_state(state_dir: str | Path) -> dict[str, Any]:
    """The provider's state: ``{"next": int, "nodes": {id: record}}``; a record has ``ip``,
    ``tags``, ``state`` (running / terminated), ``host_dir``, ``ports``, ``resources`` (what
    the launcher asked for, None for the head), ``created`` and ``terminated`` (epoch s) and
    ``status_times`` (each ``ray-node-status`` the node got, with its epoch s)."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return {"next": 1, "nodes": {}}
    return json.loads(path.read_text())


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, state_dir / STATE_FILE)


# --- processes of a fake host ---

def _ancestors() -> set[int]:
    import psutil

    pids = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        pids |= {p.pid for p in psutil.Process().parents()}
    return pids


def host_processes(state_dir: str | Path, node_id: str | None = None) -> list:
    """Alive processes of fake host ``node_id`` of ``state_dir`` (every host of it when None):
    the marker in their environment or the host directory in their command line, and every
    descendant of those; never this process or its ancestors."""
    import psutil

    state_dir = str(Path(state_dir).resolve())
    if node_id is None:
        marker, path = f"{state_dir}#", os.path.join(state_dir, "h") + os.sep
    else:
        marker, path = f"{state_dir}#{node_id}", os.path.join(state_dir, "h", node_id) + os.sep
    skip = _ancestors()
    found: dict[int, Any] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid in skip:
            continue
        cmd = " ".join(p.info["cmdline"] or []) + " "
        hit = path in cmd or path.rstrip(os.sep) + " " in cmd
        if not hit:
            with contextlib.suppress(psutil.Error):
                value = p.environ().get(MARKER_ENV, "")
                hit = value == marker or (node_id is None and value.startswith(marker))
        if hit:
            found[p.pid] = p
    return alive_with_descendants(found, skip)


def kill_host(state_dir: str | Path, node_id: str | None = None, grace: float = 5.0) -> list[str]:
    """Stop fake host ``node_id`` (every host of ``state_dir`` when None): SIGTERM, then SIGKILL
    what is left after ``grace`` seconds, until none of its processes is left (a process may
    start another while it is being stopped). Returns what was signalled."""
    import psutil

    signalled: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL, signal.SIGKILL):
        procs = host_processes(state_dir, node_id)
        if not procs:
            break
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if sig == signal.SIGTERM:
                    signalled.append(f"{p.pid}: {' '.join(p.cmdline())[:100]}")
                p.send_signal(sig)
        psutil.wait_procs(procs, timeout=grace if sig == signal.SIGTERM else 5)
    return signalled


def stop_host() -> int:
    """``ray stop`` of the fake host this process runs on (its marker in the environment)."""
    marker = os.environ.get(MARKER_ENV, "")
    state_dir, _, node_id = marker.rpartition("#")
    if not state_dir or not node_id:
        print(f"stop-host: {MARKER_ENV} is not set: not on a fake host", file=sys.stderr)
        return 2
    stopped = kill_host(state_dir, node_id)
    print(f"fake host {node_id}: stopped {len(stopped)} process(es)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["stop-host"]:
        return stop_host()
    if len(argv) == 2 and argv[0] == "kill-all":
        print("\n".join(kill_host(argv[1])))
        return 0
    print("usage: python -m cluster_provider stop-host | kill-all STATE_DIR", file=sys.stderr)
    return 2


# --- the provider ---

class LoopbackHostProvider(NodeProvider):
    """Nodes are fake hosts on this machine (see the module docstring)."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self.state_dir = Path(provider_config["state_dir"]).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_shim()

    def _write_shim(self) -> None:
        bin_dir = self.state_dir / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "ray"
        text = RAY_SHIM.format(python=sys.executable, here=str(Path(__file__).resolve().parent))
        if not shim.exists() or shim.read_text() != text:
            tmp = bin_dir / f".ray.{os.getpid()}"
            tmp.write_text(text)
            tmp.chmod(0o755)
            os.replace(tmp, shim)

    # state

    def _nodes(self) -> dict[str, dict[str, Any]]:
        with _locked(self.state_dir):
            return read_state(self.state_dir)["nodes"]

    def _node(self, node_id: str) -> dict[str, Any]:
        return self._nodes()[node_id]

    # NodeProvider

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        return [nid for nid, n in self._nodes().items()
                if n["state"] == "running"
                and all(n["tags"].get(k) == v for k, v in tag_filters.items())]

    def nodes_for_teardown(self, tag_filters: dict[str, str]) -> list[str]:
        return self.non_terminated_nodes(tag_filters)

    def is_running(self, node_id: str) -> bool:
        return self._node(node_id)["state"] == "running"

    def is_terminated(self, node_id: str) -> bool:
        return self._node(node_id)["state"] == "terminated"

    def node_tags(self, node_id: str) -> dict[str, str]:
        return dict(self._node(node_id)["tags"])

    def external_ip(self, node_id: str) -> str:
        return self._node(node_id)["ip"]

    def internal_ip(self, node_id: str) -> str:
        return self._node(node_id)["ip"]

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        with _locked(self.state_dir):
            state = read_state(self.state_dir)
            node = state["nodes"][node_id]
            status = tags.get(TAG_RAY_NODE_STATUS)
            if status and status != node["tags"].get(TAG_RAY_NODE_STATUS):
                node["status_times"].append([status, time.time()])
            node["tags"].update(tags)
            _write_state(self.state_dir, state)

    def create_node(self, node_config: dict[str, Any], tags: dict[str, str],
                    count: int) -> dict[str, Any]:
        return self._create(tags, count, None)

    def create_node_with_resources_and_labels(self, node_config: dict[str, Any],
                                              tags: dict[str, str], count: int,
                                              resources: dict[str, float],
                                              labels: dict[str, str]) -> dict[str, Any]:
        return self._create(tags, count, dict(resources))

    def _create(self, tags: dict[str, str], count: int,
                resources: dict[str, float] | None) -> dict[str, Any]:
        created = {}
        with _locked(self.state_dir):
            state = read_state(self.state_dir)
            for _ in range(count):
                nid = f"n{state['next']}"
                state["next"] += 1
                head = tags.get(TAG_RAY_NODE_KIND) == NODE_KIND_HEAD
                workers = sum(1 for n in state["nodes"].values() if n["ip"] != HEAD_IP)
                ip = HEAD_IP if head else f"127.0.{(workers + 2) // 256}.{(workers + 2) % 256}"
                host_dir = self.state_dir / "h" / nid
                (host_dir / "home").mkdir(parents=True, exist_ok=True)
                (host_dir / "ray").mkdir(exist_ok=True)
                state["nodes"][nid] = {
                    "ip": ip, "tags": dict(tags), "state": "running", "host_dir": str(host_dir),
                    "ports": _free_ports(len(PORT_FLAGS)), "resources": resources,
                    "created": time.time(), "terminated": None,
                    "status_times": [[tags.get(TAG_RAY_NODE_STATUS), time.time()]]}
                created[nid] = {"ip": ip}
            _write_state(self.state_dir, state)
        return created

    def terminate_node(self, node_id: str) -> dict[str, Any]:
        with _locked(self.state_dir):
            state = read_state(self.state_dir)
            node = state["nodes"][node_id]
            if node["state"] != "terminated":
                node["state"] = "terminated"
                node["terminated"] = time.time()
                _write_state(self.state_dir, state)
        # A terminated machine takes its processes with it.
        kill_host(self.state_dir, node_id, grace=2.0)
        return {node_id: {"ip": node["ip"]}}

    def get_command_runner(self, log_prefix: str, node_id: str, auth_config: dict[str, Any],
                           cluster_name: str, process_runner: Any, use_internal_ip: bool,
                           docker_config: dict[str, Any] | None = None
                           ) -> LoopbackHostCommandRunner:
        if docker_config and docker_config.get("container_name"):
            raise ValueError("fake hosts run no Docker: remove `docker` from the cluster YAML")
        return LoopbackHostCommandRunner(self, node_id, log_prefix, process_runner)

    # fake hosts

    def host_env(self, node_id: str) -> dict[str, str]:
        """The environment of every command on fake host ``node_id``: a fresh login's, not the
        caller's (the head's autoscaler runs a worker's commands with the worker's)."""
        node = self._node(node_id)
        host_dir = node["host_dir"]
        user = getpass.getuser()
        here = str(Path(__file__).resolve().parent)
        env = {
            "PATH": os.pathsep.join([str(self.state_dir / "bin"), os.path.dirname(sys.executable),
                                     "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": os.path.join(host_dir, "home"), "USER": user, "LOGNAME": user,
            "LANG": "C.UTF-8", "SHELL": "/bin/bash", "PYTHONPATH": here,
            "RAY_TMPDIR": host_dir, MARKER_ENV: f"{self.state_dir}#{node_id}",
            "FAKE_HOST_IP": node["ip"], "FAKE_HOST_TEMP_DIR": os.path.join(host_dir, "ray"),
            "FAKE_HOST_PORT_FLAGS": " ".join(
                f"{flag}={port}" for flag, port in zip(PORT_FLAGS, node["ports"], strict=True)),
        }
        if node["ip"] == HEAD_IP:
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        env.update({k: str(v) for k, v in (self.provider_config.get("host_env") or {}).items()})
        return env


class LoopbackHostCommandRunner(CommandRunnerInterface):
    """SSH to a fake host: ``bash -c`` in the host's environment and home, in a session of its
    own (as a remote process is: not in the caller's process group); rsync copies files."""

    def __init__(self, provider: LoopbackHostProvider, node_id: str, log_prefix: str,
                 process_runner: Any) -> None:
        self.provider = provider
        self.node_id = node_id
        self.log_prefix = log_prefix
        self.process_runner = process_runner or subprocess

    def _home(self) -> str:
        return self.provider.host_env(self.node_id)["HOME"]

    def _remote(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            return self._home() + path[1:]
        return path

    def run(self, cmd: str | None = None, timeout: int = 120, exit_on_fail: bool = False,
            port_forward: Any = None, with_output: bool = False,
            environment_variables: dict[str, object] | None = None, run_env: str = "auto",
            ssh_options_override_ssh_key: str = "", shutdown_after_run: bool = False,
            silent: bool = False) -> Any:
        if not cmd:  # `ray attach`: an interactive shell; nothing to do here
            return b"" if with_output else ""
        if shutdown_after_run:
            cmd += f"; {shlex.quote(sys.executable)} -m cluster_provider stop-host"
        if environment_variables:
            cmd = _with_environment_variables(cmd, environment_variables)
        env = self.provider.host_env(self.node_id)
        final = ["bash", "-c", cmd]
        kwargs = dict(env=env, cwd=env["HOME"], stdin=subprocess.DEVNULL,
                      start_new_session=True)
        try:
            if with_output:
                return self.process_runner.check_output(final, **kwargs)
            self.process_runner.check_call(final, **kwargs)
            return ""
        except subprocess.CalledProcessError as e:
            if exit_on_fail:
                sys.exit(e.returncode or 1)
            raise ProcessRunnerError("Command failed", "ssh_command_failed", code=e.returncode,
                                     command=cmd) from None

    def run_rsync_up(self, source: str, target: str,
                     options: dict[str, Any] | None = None) -> None:
        _copy(os.path.expanduser(source), self._remote(target))

    def run_rsync_down(self, source: str, target: str,
                       options: dict[str, Any] | None = None) -> None:
        _copy(self._remote(source), os.path.expanduser(target))

    def remote_shell_command_str(self) -> str:
        env = self.provider.host_env(self.node_id)
        return f"cd {shlex.quote(env['HOME'])} && bash  # fake host {self.node_id}\n"


def _copy(source: str, target: str) -> None:
    """rsync -a semantics for what the launcher syncs: a directory's contents into ``target``,
    a file to ``target`` (a directory when it ends with /)."""
    if os.path.isdir(source):
        shutil.copytree(source, target, dirs_exist_ok=True)
        return
    if target.endswith("/"):
        target = os.path.join(target, os.path.basename(source))
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    shutil.copy2(source, target)


if __name__ == "__main__":
    sys.exit(main())
