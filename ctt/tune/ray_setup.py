"""Ray for a study: started in-process on loopback or joined, the study's signals kept from
Ray's start-up, and what a killed driver's Ray left behind stopped by the next study.

Ray runs in-process on loopback (no dashboard, small object store, every server bound to
127.0.0.1; a scenario test checks the listening sockets) unless ``address`` joins a running
cluster. Environment defaults set here: Ray's automatic loggers off (our callback writes
TensorBoard and HParams), the classic reporter API (the study's own progress line,
:mod:`ctt.tune.progress`, is one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import ray

from ctt.errors import UserError, one_line

__all__ = ["OBJECT_STORE_BYTES", "RAY_ENV_DEFAULTS", "QuietTuneInterrupt", "init_ray",
           "own_ray_processes", "ray_keeps_our_sigterm", "stop_ray_left_by",
           "tune_catches_sigint"]

OBJECT_STORE_BYTES = 300 * 1024**2
RAY_ENV_DEFAULTS = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0",
                    "RAY_USAGE_STATS_ENABLED": "0", "TUNE_GLOBAL_CHECKPOINT_S": "5",
                    # A deterministic failure's one result carries `error`, not the metric;
                    # Tune's strict check would abort the whole study on it.
                    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}



def init_ray(opts: Any) -> None:
    """Join ``opts.address`` or start Ray in-process on 127.0.0.1 (never a bare ``ray.init()``,
    which would attach to any running cluster).

    Sets our defaults for Ray's and Tune's environment variables first (a value the user set
    wins); Ray and Tune read them when a run starts, not at import: the study callback owns all
    logging, the classic progress output, no usage stats, experiment state synced every 5 s,
    results without the study's metric allowed (a failed trial's ``error`` result)."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    if opts.address:
        try:
            ray.init(address=opts.address, log_to_driver=opts.verbose > 1)
        except ConnectionError as e:  # e.g. auto with no cluster on this machine
            raise UserError(f"--address {opts.address}: cannot join a Ray cluster ("
                            f"{one_line(e)}); start one (ray up, or ray start --head) or "
                            "check the address") from None
        return
    # Ray "resolves" _node_ip_address=127.0.0.1 to the machine's routable IP, and then GCS,
    # raylet and workers listen on every interface ("::"). With cluster support off (the
    # macOS/Windows default) the node IP stays 127.0.0.1 and every gRPC server binds loopback.
    # The constant is read when Ray is imported, so set it on the module for this process and
    # in the environment for the processes Ray spawns.
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", _node_ip_address="127.0.0.1",
             num_cpus=opts.num_cpus or os.cpu_count(),
             num_gpus=None if opts.gpus_per_trial else 0,
             object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
             log_to_driver=opts.verbose > 1)



# What Tune logs when its SIGINT handler stops a fit: a multi-line "Resume experiment with:


_TUNE_INTERRUPT_LOGS = ("Stop signal received", "Experiment has been interrupted",
                        "Training has been interrupted", "Trials did not complete")


class QuietTuneInterrupt(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TUNE_INTERRUPT_LOGS)


def tune_catches_sigint() -> bool:
    """Whether ``Tuner.fit`` installs its graceful SIGINT handler (ray.tune.tune)."""
    return (threading.current_thread() is threading.main_thread()
            and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") or 0))


@contextlib.contextmanager
def ray_keeps_our_sigterm() -> Iterator[None]:
    """``ray.init`` installs SIGTERM handlers in the driver (``sys.exit(15)``, then the
    in-process head node's "stop Ray's processes, exit 1") that would replace the study's.
    Skip them while Ray starts: Ray's processes are still stopped at exit by its atexit hook
    and by fate-sharing with the driver."""
    from ray._private import utils as ray_utils

    real = getattr(ray_utils, "set_sigterm_handler", None)
    if real is None:
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = real


def own_ray_processes() -> list[list[float]]:
    """``[pid, start time]`` of every process of this driver's in-process Ray (its descendants:
    GCS, raylet, the agents and workers the raylet started)."""
    import psutil

    out = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            out.append([proc.pid, proc.create_time()])
    return out


def stop_ray_left_by(previous: dict[str, Any]) -> None:
    """Stop the Ray processes a driver killed with SIGKILL left running (its dashboard and
    runtime-env agents outlive it), as its lock recorded them: each only if a process with
    that pid and start time still runs, so no other process is touched."""
    import psutil

    left = []
    for pid, started in previous.get("ray_processes") or []:
        with contextlib.suppress(psutil.Error, TypeError, ValueError):
            proc = psutil.Process(int(pid))
            if abs(proc.create_time() - float(started)) < 0.01:
                left.append(proc)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if left:
        print(f"note: stopped {len(left)} Ray process(es) that the killed driver (pid "
              f"{previous.get('pid')}) left running", file=sys.stderr, flush=True)
