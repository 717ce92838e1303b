"""ctt.envinfo: the one environment snapshot (runs, studies, benchmarks)."""

from __future__ import annotations

import json
import os
import sys
from unittest import mock

import torch

from ctt.envinfo import device_name, environment, versions


def test_versions_read_metadata_without_importing_ray():
    before = "ray" in sys.modules
    v = versions()
    assert torch.__version__.startswith(v["torch"])  # metadata has no local "+cpu" suffix
    assert v["python"] == sys.version.split()[0] and "scipy" in v
    assert ("ray" in sys.modules) == before


def test_environment_is_json_and_names_the_device():
    env = environment()
    assert "device" not in env and env["cpu_count"] == os.cpu_count()
    cpu = environment("cpu")
    assert cpu["device"] == device_name("cpu") and cpu["device"].startswith("cpu (")
    assert f"{os.cpu_count()} cores" in cpu["device"] and "cudnn" not in cpu
    json.dumps(cpu)  # goes into config.json / study.json / benchmark JSON as is


def test_cuda_device_records_the_numerics_settings():
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA Test GPU"), \
            mock.patch("torch.backends.cudnn.version", return_value=90100):
        env = environment(torch.device("cuda", 0))
    assert env["device"] == "NVIDIA Test GPU" and env["cudnn"] == 90100
    assert {"cudnn_allow_tf32", "cuda_matmul_allow_tf32", "cudnn_benchmark",
            "matmul_precision"} <= set(env)
    json.dumps(env)
