"""Helpers shared by the benchmark scripts: timing, memory probes, loading a file as a module,
the JSON every benchmark writes (its numbers plus the machine and versions behind them), and a
fixed list of trials run on Ray Tune.

The scripts in ``benchmarks/`` are not a package: running ``python benchmarks/<name>.py`` puts
this folder on ``sys.path``, which is how every script imports this module and the other
scripts, by plain name (``import common``, ``from common import write_json``, ``import
replay_pruning``); tests do the same through ``tests/benchmark_scripts.py``. ``ctt`` comes from
the installed package (``pip install -e .``); only ``gpu_bench.py``, which runs on bare GPU
machines, also puts the repository root on ``sys.path``. Code two scripts share lives here,
under a public name: a script never imports another's ``_private`` helper.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ctt.envinfo import environment
from ctt.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
# the JSON behind the figures of README and docs/ (tracked)
RESULTS_DIR = ROOT / "benchmarks" / "results"
MIB = 2.0 ** 20


# --- timing -------------------------------------------------------------------------------------

def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class Timer:
    """Synchronised wall time and this process's CPU time of named blocks, one list entry per
    block run: ``with timer("name"): ...``, then ``timer.wall["name"]``, ``timer.cpu["name"]``.

    CPU time (all threads of this process) is what other processes on shared cores inflate far
    less than wall time; on CUDA it only counts the host side."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.sync = synchronizer(device)
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.sync()
        self.wall.setdefault(name, []).append(time.perf_counter() - t0)
        self.cpu.setdefault(name, []).append(time.process_time() - c0)

    def clear(self) -> None:
        """Forget every time so far (after the untimed warm-up iterations)."""
        self.wall.clear()
        self.cpu.clear()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- memory (Linux /proc; ru_maxrss elsewhere) --------------------------------------------------

def proc_status_bytes(key: str) -> int | None:
    """``VmRSS``/``VmHWM`` (current / peak resident set) of this process in bytes, or ``None``
    without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> int | None:
    """Reset this process's peak-RSS mark (``VmHWM``) to its current RSS (Linux >= 4.0: write 5
    to /proc/self/clear_refs); return that RSS in bytes, or ``None`` where it cannot be reset.
    ``proc_status_bytes("VmHWM")`` minus this value, read after some work, is the extra resident
    memory the work needed at its peak."""
    rss = proc_status_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return rss


def maxrss_bytes() -> int:
    """This process's lifetime peak resident set (cannot be reset: it only shows peaks above
    every earlier one, e.g. importing torch)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB, macOS bytes


# --- modules and output -------------------------------------------------------------------------

def load_module(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """Import a Python file that is not on ``sys.path`` (e.g. ``tests/contrast_reference.py``)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metadata(device: torch.device | str, script: str, argv: list[str] | None, *,
             threads: int | None = None, note: str = "") -> dict[str, Any]:
    """What every benchmark JSON starts with: the command (``script`` with ``argv``, default
    ``sys.argv[1:]``), when, the device, torch threads, the 1-minute load average (other
    processes on the cores show here), the package versions and git commit
    (:func:`ctt.envinfo.environment`, with the device's numerics settings on CUDA) and a
    free-text ``note`` (e.g. "shared machine")."""
    env = environment(device)
    return {
        "command": ["python", f"benchmarks/{script}",
                    *(sys.argv[1:] if argv is None else argv)],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": env["device"],
        "threads": threads if threads is not None else torch.get_num_threads(),
        "load_avg_1m": load_average(),
        "note": note,
        "env": env,
    }


def load_average() -> float | None:
    """The 1-minute load average (runnable processes; above the core count, the benchmark
    shared the cores), or ``None`` where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def source_hash() -> str:
    """SHA-256 (16 hex digits) over ``ctt/**/*.py``: a long benchmark records it before and
    after, since a shared working tree may change under it (then the runs compare two
    programs)."""
    h = hashlib.sha256()
    package = ROOT / "ctt"
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def write_json(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    """Write ``obj`` as indented JSON (atomically: a reader never sees half a file); values JSON
    cannot hold become text. Returns the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
    return path


def finished_study(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """A finished study directory and its ``study.json``; one clear line
    (:class:`ctt.errors.UserError`) when it holds no finished study."""
    from ctt.errors import UserError

    study = Path(path)
    if not (study / "trials.parquet").is_file() or not (study / "study.json").is_file():
        raise UserError(f"{study} holds no finished study (trials.parquet and study.json): "
                        "pass the directory of a study that ran to the end")
    return study, json.loads((study / "study.json").read_text())


# --- a fixed list of trials on Ray Tune (bench_study.py's pruning part, live_pruning.py) --------
# Ray is imported inside these functions only: the other benchmarks run without the [tune] extra.

TRIAL_COMPUTE_KEY = "time/trial_compute_s"  # what a trial reports as its compute seconds so far


class FixedListRecord:
    """Driver-side record of every trial of a fixed list (Tune config ``{"point": i}``), filled
    by :func:`fit_fixed_list`: ``trials[trial_id]`` holds the trial's list ``index``, its last
    ``step``, last ``compute_s`` (:data:`TRIAL_COMPUTE_KEY`), ``miou_best`` and ``miou_final``,
    ``error`` and ``status`` (RUNNING, TERMINATED, ERROR)."""

    def __init__(self) -> None:
        self.trials: dict[str, dict[str, Any]] = {}

    def _rec(self, trial: Any) -> dict[str, Any]:
        if trial.trial_id not in self.trials:
            self.trials[trial.trial_id] = {
                "index": int(trial.config["point"]), "step": 0, "compute_s": 0.0,
                "miou_best": None, "miou_final": None, "error": None, "status": "RUNNING"}
        return self.trials[trial.trial_id]

    def on_result(self, trial: Any, result: dict[str, Any]) -> None:
        rec = self._rec(trial)
        if "step" in result:
            rec["step"] = max(rec["step"], int(result["step"]))
        if TRIAL_COMPUTE_KEY in result:
            rec["compute_s"] = float(result[TRIAL_COMPUTE_KEY])
        if result.get("miou") is not None:
            miou = float(result["miou"])
            rec["miou_final"] = miou
            rec["miou_best"] = miou if rec["miou_best"] is None else max(rec["miou_best"], miou)
        if result.get("error"):
            rec["error"] = str(result["error"])

    def on_complete(self, trial: Any) -> None:
        self._rec(trial)["status"] = "TERMINATED"

    def on_error(self, trial: Any) -> None:
        rec = self._rec(trial)
        rec["status"] = "ERROR"
        rec["error"] = rec["error"] or "trial raised (see the Ray experiment directory)"


def _recording_callback(record: FixedListRecord) -> Any:
    """A Tune callback passing each trial's results, completion and error on to ``record``."""
    from ray.tune import Callback

    class Recording(Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                            **info: Any) -> None:
            record.on_result(trial, result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                              **info: Any) -> None:
            record.on_complete(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            record.on_error(trial)

    return Recording()


def fixed_list_trainable(configs: list[dict[str, Any]], cpus_per_trial: float) -> Any:
    """A trainable that runs ``configs[config["point"]]`` with
    :func:`ctt.tune.trainable.train_ctt`: Tune then runs exactly the list, in order, as a grid
    over the index (its points stay comparable across schedulers whatever finishes first)."""
    from ray import tune

    from ctt.tune.trainable import train_ctt, trial_resources

    def run_point(config: dict[str, Any]) -> None:
        train_ctt(configs[int(config["point"])])

    return tune.with_resources(run_point, trial_resources(cpus_per_trial, 0))


def fit_fixed_list(configs: list[dict[str, Any]], storage: Path, name: str, *, scheduler: Any,
                   max_concurrent: int) -> tuple[float, FixedListRecord]:
    """Run the trial ``configs`` (flat config keys plus ``variant`` and ``seed``) in order as the
    Tune experiment ``storage/name``: one CPU each, ``max_concurrent`` at a time, under
    ``scheduler``, actors reused, no retries (a crash in a benchmark is a bug to see). Returns
    the wall seconds of ``Tuner.fit`` and the :class:`FixedListRecord` of every trial; raises
    RuntimeError when a trial never reported."""
    from ray import tune

    record = FixedListRecord()
    tuner = tune.Tuner(
        fixed_list_trainable(configs, 1.0),
        param_space={"point": tune.grid_search(list(range(len(configs))))},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage),
                                  callbacks=[_recording_callback(record)],
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  verbose=0))
    t0 = time.perf_counter()
    tuner.fit()
    wall = time.perf_counter() - t0
    if len(record.trials) != len(configs):
        raise RuntimeError(f"{name}: {len(configs)} trials submitted but {len(record.trials)} "
                           f"reported; see {storage / name}")
    return wall, record
