"""benchmarks/bench_step.py and benchmarks/gpu_bench.py on a very small config (CPU, seconds).
That the benchmark's phases compose to train_step exactly is tested in tests/test_step.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

from ctt.config import VARIANTS
from ctt.models import build_model

bench = load_benchmark("bench_step")
common = load_benchmark("common")

SMALL = {"data.crop_size": 32, "data.batch_size": 2, "data.batch_size_u": 2,
         "model.width": 8, "model.feat_dim": 16, "method.bank_size": 8,
         "method.bank_min_fill": 4, "method.max_anchors": 16}


def small_cfg(variant: str = "ctt", **extra):
    return bench.bench_config("tiny", variant, threads=1).override({**SMALL, **extra})


def test_make_batch_has_every_kind_of_label():
    cfg = small_cfg()
    b = bench.make_batch(cfg, "cpu")
    assert b["x_l"].shape == (2, 3, 32, 32) and b["x_u"].shape == (2, 3, 32, 32)
    assert 0.0 <= float(b["x_l"].min()) and float(b["x_l"].max()) <= 1.0
    y = b["y_l"]
    assert y.dtype == torch.long and y.shape == (2, 32, 32)
    assert (y[:, :2] == 255).all() and (y[:, :, -2:] == 255).all()
    inner = y[:, 2:-2, 2:-2]
    assert ((inner >= 0) & (inner < cfg.data.num_classes)).all()


def test_make_state_fills_banks_and_latches_contrast():
    state = bench.make_state(small_cfg(), "cpu")
    assert state.contrast_on and len(state.banks) == 2
    for b in state.banks:
        assert b.full
        assert torch.allclose(b.features.norm(dim=-1), torch.ones(7, 8), atol=1e-5)
    # no banks -> the flag stays off (the step would never read it)
    assert not bench.make_state(small_cfg("cross"), "cpu").contrast_on


@pytest.mark.parametrize("variant", ["ctt", "cross", "supervised"])
def test_phased_step_times_every_phase_once_and_steps(variant):
    cfg = small_cfg(variant)
    state = bench.make_state(cfg, "cpu")
    before = [p.detach().clone() for p in state.students[0].parameters()]
    timer = common.Timer("cpu")
    out = bench.phased_step(state, bench.make_batch(cfg, "cpu"), timer)
    assert tuple(timer.wall) == bench.PHASES and tuple(timer.cpu) == bench.PHASES
    assert all(len(v) == 1 and v[0] >= 0 for v in timer.wall.values())
    # the optimiser phase really stepped; the step counter moved like train_step's
    after = list(state.students[0].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert state.step == 1 and out["step"] == 1
    assert (out["loss/hc"] > 0) == (variant == "ctt")


def test_bench_step_reports_overhead_and_contrast_shares():
    res = bench.bench_step(small_cfg(), "cpu", iters=2, warmup=1)
    assert tuple(res["phases_s"]) == bench.PHASES
    assert math.isclose(res["sum_s"], sum(res["phases_s"].values()))
    assert math.isclose(res["ratio"], res["step_s"] / res["sum_s"])
    assert len(res["step_s_all"]) == 2 and res["ratio_per_iter_median"] > 0
    assert set(res["without_s"]) == set(res["contrast_shares"]) == {"hc", "lc", "both"}
    for name, share in res["contrast_shares"].items():
        assert math.isclose(share, 1 - res["without_s"][name] / res["step_s"])
    assert res["contrast_share"] == res["contrast_shares"]["both"]
    assert tuple(res["cpu"]["phases_s"]) == bench.PHASES and "contrast_share" in res["cpu"]
    text = bench.format_step_table(res)
    assert "update_teachers_and_banks" in text and "overhead step/sum" in text
    # a variant without banks has no contrastive terms to switch off
    assert "contrast_share" not in bench.bench_step(small_cfg("cross"), "cpu", iters=1,
                                                    warmup=0)


def test_bench_variants_times_warmup_and_full():
    rows = bench.bench_variants("tiny", iters=1, warmup=0, variants=["supervised", "ctt"])
    assert list(rows) == ["supervised", "ctt"]
    for r in rows.values():
        assert set(r) == {"warmup_s", "s_per_iter", "cpu_warmup_s", "cpu_s_per_iter",
                          "gflop_warmup_s", "gflop_s_per_iter"}
        assert all(v > 0 for v in r.values())
    # a ctt step runs two students, two teachers and the contrast: several supervised steps
    assert rows["ctt"]["gflop_s_per_iter"] > 4 * rows["supervised"]["gflop_s_per_iter"]
    # its warm-up step trains both students on labels only (and fills the banks)
    sup, ctt = rows["supervised"], rows["ctt"]
    assert 2 * sup["gflop_warmup_s"] <= ctt["gflop_warmup_s"] < ctt["gflop_s_per_iter"]
    assert "ctt" in bench.format_variants_table(rows)
    assert set(VARIANTS) >= set(rows)


def test_main_writes_json_with_memory_and_metadata(tmp_path):
    out = tmp_path / "step.json"
    res = bench.main(["--iters", "1", "--warmup", "0", "--json", str(out), "--memory-steps",
                      "1", "--preset", "tiny", "--variant", "supervised", "--note", "busy"])
    saved = json.loads(out.read_text())
    for key in ("config", "device", "threads", "env", "command", "load_avg_1m", "phases_s",
                "step_s", "sum_s", "ratio", "memory", "flops", "throughput", "floor_s",
                "floor_ratio", "floor_ratio_cpu", "network"):
        assert key in saved, key
    assert saved["note"] == "busy"
    assert torch.__version__.startswith(saved["env"]["versions"]["torch"])  # 2.x.y(+cpu)
    assert saved["command"][:2] == ["python", "benchmarks/bench_step.py"]
    assert saved["config"]["method.warmup_iters"] == 0
    assert saved["config"]["method.pairs"] == 1 and saved["threads"] == 1
    mem = saved["memory"]
    assert "error" not in mem and mem["maxrss_growth_mib"] >= 0
    if Path("/proc/self/clear_refs").exists():
        assert mem["first_step_peak_delta_mib"] > 0
    assert res["ratio"] == saved["ratio"]
    assert saved["flops"] == bench.step_flops(bench.bench_config("tiny", "supervised"), "cpu")
    assert math.isclose(saved["floor_s"],
                        saved["flops"] / (saved["throughput"]["peak_gflops"] * 1e9))


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid variants"):
        bench.bench_config("tiny", "nope")


def test_memory_probes_see_an_allocation():
    if common.reset_peak_rss() is None:
        pytest.skip("no writable /proc/self/clear_refs")
    rss = common.reset_peak_rss()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = common.proc_status_bytes("VmHWM")
    assert peak - rss >= 60 * 2**20
    del block


def test_bench_contrast_times_both_and_agrees(tmp_path):
    bc = load_benchmark("bench_contrast")
    out = tmp_path / "contrast.json"
    assert bc.main(["--classes", "3", "--queue", "4", "--dim", "8", "--anchors", "32",
                    "--repeat", "1", "--threads", "1", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    for loss in ("high", "low"):
        row = saved[loss]
        assert row["max_abs_value_diff"] < 1e-5 and row["max_abs_grad_diff"] < 1e-5, row
        for impl in ("vectorised", "loop"):
            assert row[impl]["best_s"] > 0 and math.isfinite(row[impl]["peak_mib"]), row
    assert saved["config"]["anchors"] == 32 and "env" in saved


def test_gpu_bench_contrast_matches_loop_and_summary():
    gb = load_benchmark("gpu_bench")
    res = gb.bench_contrast(torch.device("cpu"), classes=4, queue=8, dim=16, anchors=64,
                            iters=1, warmup=0)
    for key in ("high/fp32", "low/fp32"):
        assert res[key]["abs_value_diff"] < 1e-5, res[key]
    fake = {"parts": {"contrast": res, "step/none": {"error": "boom"},
                      "variants": {"ctt": {"warmup_s": 0.1, "s_per_iter": 0.2}}}}
    text = gb.summary(fake)
    assert "ERROR boom" in text and "variant ctt" in text and "contrast high/fp32" in text


def test_gpu_bench_guard_records_failure_and_continues(tmp_path):
    gb = load_benchmark("gpu_bench")
    gb.RESULTS.clear()
    res = gb._guard("bad", lambda: 1 / 0, tmp_path)
    assert res["error"].startswith("ZeroDivisionError")
    assert gb._guard("good", lambda: {"x": 1}, tmp_path) == {"x": 1}
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert set(saved["parts"]) == {"bad", "good"}


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_part(tmp_path):
    """The script the lent GPU machines run, end to end on the CPU (about a minute)."""
    gb = load_benchmark("gpu_bench")
    out = gb.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--no-variants"])
    parts = out["parts"]
    assert "error" not in parts["contrast"] and "error" not in parts["step/none"], parts
    assert tuple(parts["step/none"]["phases_s"]) == load_benchmark("bench_step").PHASES
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["smoke"] is True


def test_network_cost_counts_the_students_parameters_and_times_each_thread_count():
    cfg = small_cfg()
    threads_before = torch.get_num_threads()
    net = bench.network_cost(cfg, "cpu", threads=(1, 2), reps=1)
    assert torch.get_num_threads() == threads_before
    assert net["parameters"] == sum(p.numel() for p in build_model(cfg).parameters())
    assert net["batch"] == [cfg.data.batch_size, 3, cfg.data.crop_size, cfg.data.crop_size]
    assert set(net["fwd_bwd_s"]) == {"1", "2"} and all(v > 0 for v in net["fwd_bwd_s"].values())
    text = bench.format_network(net)
    assert f"{net['parameters']:,} parameters" in text and "(2 threads)" in text
