"""ctt.bench and benchmarks/gpu_bench.py on a very small config (CPU, seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from ctt import bench
from ctt.config import VARIANTS

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


@pytest.mark.parametrize("variant, expected", [
    ("ctt", set(bench.COMPONENTS)),
    ("cross", {"teacher_label", "augment", "student_fwd_bwd", "loss_sup", "loss_unsup",
               "optimizer", "ema"}),
    ("supervised", {"student_fwd_bwd", "loss_sup", "optimizer"}),
])
def test_step_components_runs_exactly_the_parts_of_the_config(variant, expected):
    cfg = small_cfg(variant)
    state = bench.make_state(cfg, "cpu")
    before = [p.detach().clone() for p in state.students[0].parameters()]
    wall, cpu = bench.step_components(state, bench.make_batch(cfg, "cpu"),
                                      torch.Generator().manual_seed(0))
    assert set(wall) == expected and set(cpu) == expected
    assert all(v > 0 for v in wall.values())
    # the optimiser part really stepped and cleared the gradients
    after = list(state.students[0].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(p.grad is None for p in after)
    assert state.step == 0


def test_step_components_skip_contrast_when_not_latched():
    cfg = small_cfg()
    state = bench.make_state(cfg, "cpu", contrast_on=False)
    wall, _ = bench.step_components(state, bench.make_batch(cfg, "cpu"),
                                    torch.Generator().manual_seed(0))
    assert "loss_hc" not in wall and "loss_lc" not in wall and "bank" in wall


def test_bench_step_reports_ratio_and_shares():
    res = bench.bench_step(small_cfg(), "cpu", iters=2, warmup=1)
    assert set(res["parts_s"]) == set(bench.COMPONENTS)
    assert math.isclose(res["sum_s"], sum(res["parts_s"].values()))
    assert math.isclose(res["ratio"], res["step_s"] / res["sum_s"])
    assert math.isclose(res["contrast_s"], res["parts_s"]["loss_hc"] + res["parts_s"]["loss_lc"])
    assert 0 < res["contrast_share"] < 1 and len(res["step_s_all"]) == 2
    assert set(res["cpu"]["parts_s"]) == set(bench.COMPONENTS)
    assert "loss_hc" in bench.format_step_table(res)


def test_bench_variants_times_warmup_and_full():
    rows = bench.bench_variants("tiny", iters=1, warmup=0, variants=["supervised", "ctt"])
    assert list(rows) == ["supervised", "ctt"]
    for r in rows.values():
        assert set(r) == {"warmup_s", "s_per_iter", "cpu_warmup_s", "cpu_s_per_iter"}
        assert all(v > 0 for v in r.values())
    assert "ctt" in bench.format_variants_table(rows)
    assert set(VARIANTS) >= set(rows)


def test_main_writes_json_with_memory(tmp_path):
    out = tmp_path / "step.json"
    res = bench.main(["--iters", "1", "--warmup", "0", "--json", str(out),
                      "--memory-steps", "1", "--preset", "tiny", "--variant", "supervised"])
    saved = json.loads(out.read_text())
    for key in ("config", "device", "torch", "threads", "parts_s", "step_s", "sum_s", "ratio",
                "memory"):
        assert key in saved, key
    assert saved["config"]["method.warmup_iters"] == 0
    assert saved["config"]["method.pairs"] == 1 and saved["threads"] == 1
    mem = saved["memory"]
    assert "error" not in mem and mem["maxrss_growth_mib"] >= 0
    if Path("/proc/self/clear_refs").exists():
        assert mem["first_step_peak_delta_mib"] > 0
    assert res["ratio"] == saved["ratio"]


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid variants"):
        bench.bench_config("tiny", "nope")


def _load_gpu_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bench_contrast_matches_loop_and_summary():
    gb = _load_gpu_bench()
    res = gb.bench_contrast(torch.device("cpu"), classes=4, queue=8, dim=16, anchors=64,
                            iters=1, warmup=0)
    for key in ("high/fp32", "low/fp32"):
        assert res[key]["abs_value_diff"] < 1e-5, res[key]
    fake = {"parts": {"contrast": res, "step/none": {"error": "boom"},
                      "variants": {"ctt": {"warmup_s": 0.1, "s_per_iter": 0.2}}}}
    text = gb.summary(fake)
    assert "ERROR boom" in text and "variant ctt" in text and "contrast high/fp32" in text


def test_gpu_bench_guard_records_failure_and_continues(tmp_path):
    gb = _load_gpu_bench()
    gb.RESULTS.clear()
    res = gb._guard("bad", lambda: 1 / 0, tmp_path)
    assert res["error"].startswith("ZeroDivisionError")
    assert gb._guard("good", lambda: {"x": 1}, tmp_path) == {"x": 1}
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert set(saved["parts"]) == {"bad", "good"}
