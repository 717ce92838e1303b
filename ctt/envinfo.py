"""Environment facts written next to every result (package versions, git commit, hardware:
CPU model and instruction set, accelerator)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

_PACKAGES = ("ctt-studies", "torch", "torchvision", "numpy", "pillow", "pyarrow", "tensorboardX",
             "ray", "optuna", "scipy", "matplotlib")


def git_commit(path: str | Path | None = None) -> str:
    """The commit of the checkout holding ``path`` (default: this package), or ``"unknown"``;
    ``+dirty`` is appended when tracked files are modified."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=where, capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Installed versions (read from metadata, so Ray/Optuna are never imported here)."""
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# /proc/cpuinfo flags that decide which kernels oneDNN and ATen pick (x86 vector and matrix
# extensions, Arm SIMD): the ones worth a line in a report; the rest are left out.
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw",
              "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
              "amx_int8", "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm")
_MODEL_KEYS = ("model name", "cpu model", "hardware", "model")
# Environment variables that cap the instruction set oneDNN / ATen may use.
_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def cpu_info(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU model and the instruction set the kernels may use.

    ``model``: "model name" of ``cpuinfo`` (Linux; "Model"/"Hardware" on Arm boards), else
    ``platform.processor()``; ``flags``: which of the vector/matrix extensions that change
    kernel choice (``_ISA_FLAGS``) the CPU reports, in that order; ``torch_capability``: the
    ATen CPU kernel level torch dispatches to (``torch.backends.cpu.get_cpu_capability()``,
    e.g. AVX2, AVX512); ``isa_env``: the ISA-capping environment variables that are set.
    """
    import torch

    names: dict[str, str] = {}
    flags: set[str] = set()
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in _MODEL_KEYS:
                    names.setdefault(key, value.strip())
                elif key in ("flags", "features"):  # x86 / Arm
                    flags.update(value.split())
    except OSError:  # not Linux: no /proc
        pass
    # x86 "model" is a number; "model name" names the part. Arm boards may have only
    # "Model" or "Hardware".
    model = next((v for v in (names.get(k, "") for k in _MODEL_KEYS)
                  if v and not v.isdigit()), "")
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an old or unusual torch build
        capability = "unknown"
    return {
        "model": model or platform.processor() or platform.machine() or "unknown",
        "flags": [f for f in _ISA_FLAGS if f in flags],
        "torch_capability": capability,
        "isa_env": {k: os.environ[k] for k in _ISA_ENV if k in os.environ},
    }


def device_name(device: Any = None) -> str:
    """A readable name of the device a run or benchmark uses: the GPU's model for CUDA, else
    ``cpu (<processor>, <n> cores)``."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_info()['model']}, {os.cpu_count()} cores)"


def environment(device: Any = None) -> dict[str, Any]:
    """Versions, git commit, host, CPU (:func:`cpu_info`) and accelerator, for
    ``config.json``, ``study.json`` and benchmark results: one snapshot everywhere.

    With a ``device`` (``torch.device`` or string) it also names that device and, for CUDA,
    the numerics settings that change speed and results: cuDNN version, TF32 use, cuDNN
    autotuning and float32 matmul precision.
    """
    import torch

    env: dict[str, Any] = {
        "versions": versions(),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # the kernels oneDNN/ATen pick depend on the instruction set: results differ across
        # CPUs (docs/results.md#reproducibility-across-machines)
        "cpu": cpu_info(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    if device is not None:
        env["device"] = device_name(device)
        if torch.device(device).type == "cuda":
            env.update({
                "cudnn": torch.backends.cudnn.version(),
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "matmul_precision": torch.get_float32_matmul_precision(),
            })
    return env
