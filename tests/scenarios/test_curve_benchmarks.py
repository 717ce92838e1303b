"""README's recording and kernel-spread commands, run as written with only the sizes shrunk:
``python benchmarks/record_curves.py`` (then again: it resumes from its own output) and
``python benchmarks/kernel_spread.py`` (two real studies; slow). The replay of recorded curves
is tested in tests/test_replay_pruning.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

SMALL = ["--set", "optim.iters=40", "--set", "method.warmup_iters=10"]


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_record_curves_records_costed_curves_and_resumes_from_its_output(tmp_path):
    out = tmp_path / "curves.json"
    cmd = [str(REPO_ROOT / "benchmarks" / "record_curves.py"), "--configs", "2", "--seeds", "0",
           "--eval-every", "20", *SMALL, "--out", str(out)]
    proc = _run(cmd)
    assert "0 runs recorded, 2 to go" in proc.stdout
    data = json.loads(out.read_text())
    assert data["seeds"] == [0] and len(data["configs"]) == 2 and len(data["runs"]) == 2
    assert not out.with_suffix(".partial.jsonl").exists()
    for run in data["runs"]:
        assert run["params"] == data["configs"][run["config"]]
        assert (run["warmup_iters"], run["iters"]) == (10, 40)
        pts = run["points"]
        assert [p["step"] for p in pts] == [20, 40]
        assert 0 < pts[0]["cpu_s"] < pts[1]["cpu_s"]
        assert 0 < pts[0]["eval_cpu_s"] < pts[1]["eval_cpu_s"] < pts[1]["cpu_s"]
        assert all(0.0 <= p["miou"] <= 100.0 for p in pts)
    # The same command again finds every run in its output and trains nothing.
    again = _run(cmd)
    assert "2 runs recorded, 0 to go" in again.stdout
    assert json.loads(out.read_text())["runs"] == data["runs"]


@pytest.mark.slow
def test_live_pruning_runs_recorded_configs_as_sweeps_and_reproduces_their_curves(tmp_path):
    """README's live confirmation command, shrunk: the recorded configs run as real sweeps
    (Ray Tune, the sweeps' trainable, the replay's scheduler builder); a trial that runs to
    the end reproduces its recorded final mIoU exactly, and the unpruned sweep costs what the
    recording charged (compute 1.0, regret 0)."""
    curves = tmp_path / "curves.json"
    _run([str(REPO_ROOT / "benchmarks" / "record_curves.py"), "--configs", "3", "--seeds", "0",
          "--eval-every", "10", *SMALL, "--out", str(curves)])
    out = tmp_path / "live.json"
    proc = _run([str(REPO_ROOT / "benchmarks" / "live_pruning.py"), "--curves", str(curves),
                 "--replay", str(tmp_path / "none.json"), "--seed", "0", "--orders", "1",
                 "--every", "10", "--point", "none:grace_period=0",
                 "--point", "optuna-curve:grace_period=10,margin=0.0,n_min_points=2,"
                 "noise=0.5,reference=step", "--out", str(out)], timeout=600)
    assert "on the replayed front: None" in proc.stdout  # no replay file given
    data = json.loads(out.read_text())
    assert sorted(data["order_configs"]) == [0, 1, 2]
    none, curve = data["points"]
    assert none["family"] == "none" and none["stopped_early"] == 0
    assert none["compute"] == pytest.approx(1.0) and none["regret"] == pytest.approx(0.0)
    assert none["finals_match"] is True
    assert [t["config"] for t in none["trials"]] == data["order_configs"]
    assert curve["setting"] == "grace_period=10,margin=0.0,n_min_points=2,noise=0.5,reference=step"
    assert 0.0 < curve["compute"] <= 1.0 and curve["finals_match"] is True
    assert all(t["miou_final"] is not None for t in curve["trials"])


@pytest.mark.slow
def test_kernel_spread_runs_the_study_under_two_kernel_settings(tmp_path):
    out = tmp_path / "spread.json"
    _run([str(REPO_ROOT / "benchmarks" / "kernel_spread.py"), "--seeds", "0", *SMALL,
          "--set", "run.eval_every=20", "--set", "run.checkpoint_every=20",
          "--storage", str(tmp_path / "studies"), "--out", str(out)], timeout=600)
    data = json.loads(out.read_text())
    assert data["isa"] == "SSE41"
    rows = {(r["variant"], r["seed"]): r for r in data["trials"]}
    assert set(rows) == {("supervised", 0), ("ctt", 0)}
    for r in rows.values():
        assert r["change"] == pytest.approx(r["SSE41"] - r["default"])
    assert set(data["paired_differences"]) == {"default", "SSE41"}
    for setting, diffs in data["paired_differences"].items():
        assert diffs == [pytest.approx(rows[("ctt", 0)][setting]
                                       - rows[("supervised", 0)][setting])]
    # both studies are whole studies in the storage given
    for name in ("spread_default", "spread_sse41"):
        assert (tmp_path / "studies" / name / "trials.parquet").is_file()
