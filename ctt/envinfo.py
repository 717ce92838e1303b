"""Environment facts written next to every result (package versions, git commit, hardware)."""

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


def device_name(device: Any = None) -> str:
    """A readable name of the device a run or benchmark uses: the GPU's model for CUDA, else
    ``cpu (<processor>, <n> cores)``."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device: Any = None) -> dict[str, Any]:
    """Versions, git commit, host and accelerator, for ``config.json``, ``study.json`` and
    benchmark results: one snapshot everywhere.

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
