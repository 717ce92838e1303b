"""Trial shapes against a cluster's node types: how many trials a cluster launcher config runs
at once, and whether a study's trial shape fits any node the cluster has or its autoscaler can
add.

Ray keeps a trial whose resources no node can ever give pending forever, warning once a minute,
so a study that joins a cluster checks its shape first (:func:`check_cluster_fits`).

The counts come from the scheduler of the autoscaler that ``ray up`` starts on the head (Ray
2.60: autoscaler v2, ``ray.autoscaler.v2.scheduler``). It places each pending trial's placement
group on its own, on the node type that fits it best, so 1-GPU trials fill the 1-GPU node type
up to its ``max_workers`` before any 4-GPU node is launched; the older v1 bin packing would mix
the types differently. ``cluster/README.md#capacity`` shows the figures for ``cluster/gpu.yaml``
and ``tests/test_cluster.py`` checks them against this module.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ctt.errors import UserError

__all__ = ["Capacity", "autoscaler_config_path", "check_cluster_fits", "fit_problem",
           "node_types_text", "trial_bundle", "trials_at_once"]

# The autoscaler's monitor process on the head carries both in its command line.
_GCS_FLAG = "--gcs-address="
_CONFIG_FLAG = "--autoscaling-config="


@dataclass(frozen=True)
class Capacity:
    """What the autoscaler does for ``at_once + waiting`` pending trials of one shape on an
    empty cluster: the worker nodes it launches, by node type, and how many trials they run."""

    nodes: dict[str, int]
    at_once: int
    waiting: int


def trial_bundle(cpus: float, gpus: float) -> dict[str, float]:
    """The resources one trial asks for (:func:`ctt.tune.trainable.trial_resources`'s bundle)."""
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


@contextlib.contextmanager
def _quiet_autoscaler_logs() -> Iterator[None]:
    # prepare_config logs each default it fills in ("setting max workers for head node type
    # to 0") at INFO; a study's output is its own.
    logger = logging.getLogger("ray.autoscaler")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def trials_at_once(config: Mapping[str, Any], n_trials: int, cpus: float,
                   gpus: float) -> Capacity:
    """Schedule ``n_trials`` pending trials of ``cpus`` CPUs and ``gpus`` GPUs on a cluster
    launched from ``config`` (a cluster launcher YAML, as loaded) with no worker running yet,
    using the autoscaler's own scheduler, in one round: the steady state it scales to."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import GangResourceRequest

    config = copy.deepcopy(dict(config))
    # The key files only feed a launch-config hash (not compared here); they need not exist.
    config["auth"] = {k: v for k, v in (config.get("auth") or {}).items()
                      if k not in ("ssh_private_key", "ssh_public_key")}
    with _quiet_autoscaler_logs():
        auto = AutoscalingConfig(config, skip_content_hash=True)
    bundle = trial_bundle(cpus, gpus)
    # The head is running already: trials it can hold go there first (none when its resources
    # are {"CPU": 0}), the scheduler sees the rest, and the head type is not one it may launch.
    head = auto.get_head_node_type()
    types = auto.get_node_type_configs()
    head_spec = types.pop(head, None)
    on_head = min(n_trials, _slots(bundle, head_spec.resources)) if head_spec else 0
    # Tune asks for each trial's resources as a placement group of one bundle: a gang request.
    gangs = [GangResourceRequest(requests=[ResourceRequestUtil.make(bundle)])
             for _ in range(n_trials - on_head)]
    request = SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=types,
        max_num_nodes=auto.get_max_num_worker_nodes(), gang_resource_requests=gangs)
    reply = ResourceDemandScheduler().schedule(request)
    nodes: collections.Counter[str] = collections.Counter()
    for launch in reply.to_launch:
        nodes[launch.instance_type] += launch.count
    waiting = len(reply.infeasible_gang_resource_requests)
    return Capacity(nodes=dict(sorted(nodes.items())), at_once=n_trials - waiting,
                    waiting=waiting)


def _slots(bundle: Mapping[str, float], resources: Mapping[str, float]) -> int:
    """How many bundles fit at once in ``resources``."""
    needed = [(resources.get(k, 0.0), v) for k, v in bundle.items() if v > 0]
    return int(min(have // want for have, want in needed)) if needed else 0


def node_types_text(config: Mapping[str, Any]) -> str:
    """The node types a study's shape is checked against, for an error line:
    ``ray.head.default (CPU 0, head); gpu1 (CPU 8, GPU 1, at most 8); ...``."""
    parts = []
    head = config.get("head_node_type")
    for name, spec in (config.get("available_node_types") or {}).items():
        res = ", ".join(f"{k} {v:g}" for k, v in sorted((spec.get("resources") or {}).items()))
        count = "head" if name == head else f"at most {spec.get('max_workers', 0)}"
        parts.append(f"{name} ({res or 'no resources'}, {count})")
    return "; ".join(parts)


def _shape_text(cpus: float, gpus: float) -> str:
    return f"--cpus-per-trial {cpus:g} --gpus-per-trial {gpus:g}"


def _fits(bundle: Mapping[str, float], resources: Mapping[str, float]) -> bool:
    return all(resources.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)


def fit_problem(cpus: float, gpus: float, alive: list[Mapping[str, float]],
                config: Mapping[str, Any] | None, config_path: str | None) -> str | None:
    """Why no trial of this shape could ever start on this cluster, or None when one can.

    ``alive``: the total resources of each alive node. ``config``: the autoscaler's cluster
    config (None when the cluster has no autoscaler this driver can see): a shape that fits no
    alive node is refused only when the autoscaler cannot launch a node for it either. Without
    an autoscaler a node that fits may still join by hand (``ray start --address``), so that
    case is not refused here."""
    bundle = trial_bundle(cpus, gpus)
    if any(_fits(bundle, node) for node in alive):
        return None
    if config is None:
        return None
    if trials_at_once(config, 1, cpus, gpus).at_once:
        return None
    return (f"{_shape_text(cpus, gpus)}: no node of this cluster has that much and its "
            f"autoscaler ({config_path}) cannot add one: node types {node_types_text(config)}. "
            "No trial could ever start; ask for less per trial or add a node type that fits")


def autoscaler_config_path(gcs_address: str) -> str | None:
    """The cluster config of the autoscaler serving ``gcs_address``, read off its monitor
    process's command line; None when that process is not on this machine (the driver is not
    on the head, or the cluster was started without an autoscaler)."""
    import psutil

    want = _GCS_FLAG + gcs_address
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if want in cmd:
            for arg in cmd:
                if arg.startswith(_CONFIG_FLAG):
                    return str(Path(arg[len(_CONFIG_FLAG):]).expanduser())
    return None


def check_cluster_fits(cpus: float, gpus: float) -> str | None:
    """Refuse (:class:`ctt.errors.UserError`) a trial shape the joined cluster can never run.
    Returns the path of the autoscaler's config when the cluster has an autoscaler this driver
    can see (the cluster may add nodes), else None."""
    import ray

    alive = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    path = autoscaler_config_path(ray.get_runtime_context().gcs_address)
    config = None
    if path:
        try:
            config = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            config = None  # unreadable here: judge by the alive nodes only
    problem = fit_problem(cpus, gpus, alive, config, path)
    if problem:
        raise UserError(problem)
    return path
