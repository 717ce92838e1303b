"""ctt.envinfo: the one environment snapshot (runs, studies, benchmarks)."""

from __future__ import annotations

import json
import os
import sys
from unittest import mock

import torch

from ctt.envinfo import cpu_info, device_name, environment, versions


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


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_bf16 hypervisor

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_bf16 hypervisor
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes sve sve2 i8mm bf16
CPU implementer\t: 0x41
Hardware\t: Example Arm board
"""


def test_cpu_info_names_the_model_and_the_kernel_relevant_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    path = tmp_path / "cpuinfo"
    path.write_text(X86_CPUINFO)
    info = cpu_info(path)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"  # not the numeric "model"
    assert info["flags"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw",
                             "avx512_vnni", "amx_tile", "amx_bf16"]  # fpu, hypervisor: no
    assert info["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["isa_env"] == {}
    path.write_text(ARM_CPUINFO)
    arm = cpu_info(path)
    assert arm["model"] == "Example Arm board"
    assert arm["flags"] == ["asimd", "sve", "sve2", "bf16", "i8mm"]


def test_cpu_info_without_proc_and_with_an_isa_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with mock.patch("platform.processor", return_value="fallback-cpu"):
        info = cpu_info(tmp_path / "missing")
    assert info["model"] == "fallback-cpu" and info["flags"] == []
    assert info["isa_env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_environment_records_the_cpu():
    env = environment()
    assert env["cpu"] == cpu_info()
    assert env["cpu"]["model"] in device_name("cpu")
    json.loads(json.dumps(env))
