"""End-to-end tests of the study system (ctt/tune/ablation.py, runtime.py, cli.py,
studies/*.py) on real Ray:
the smoke studies as scripts run them, faults injected into their trials, and a study whose
driver is killed, then resumed. (The study system without a study: tests/test_tune_study.py.)

One in-process Ray instance serves the whole module (``ray_local``); the driver-kill test runs
its study in a subprocess with its own Ray (the process we kill) and also checks that every
socket that study listens on is loopback. Trials use the smoke-test settings (6 iterations,
tiny network), so every number here is deterministic for a seed and thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray")

import psutil  # noqa: E402
from fault_trainable import faulty_trainable  # noqa: E402
from helpers import REPO_ROOT, deterministic, load_script, read_trials_parquet  # noqa: E402
from real_layouts import make_cityscapes  # noqa: E402
from study_outputs import check_study_outputs, read_json  # noqa: E402

from ctt.tune import ablation, experiment  # noqa: E402
from ctt.tune.cli import add_common_args, options_from_args  # noqa: E402
from ctt.tune.layout import (  # noqa: E402
    dedupe_by_step,
    metrics_jsonl_path,
    read_metrics_jsonl,
    trial_json_path,
)

ITERS = 6  # cli.SMOKE_OVERRIDES
KILLED_ITERS = 200


def run_main(script: str, argv: list[str]) -> str:
    """``studies/<script>.py main(argv)``; returns what it printed (the progress tables)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert load_script(script).main(argv) == 0
    return out.getvalue()


def last_record(study_dir: Path, trial_id: str) -> dict:
    """The trial's last metrics record (each step once, the last write of a replayed one)."""
    return dedupe_by_step(read_metrics_jsonl(metrics_jsonl_path(study_dir, trial_id)))[-1]


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_ablation(ray_local, tmp_path_factory):
    """``voc_ablation.py --smoke-test``: every variant, seed 0. (study_dir, printed output)."""
    storage = tmp_path_factory.mktemp("ablation")
    out = run_main("voc_ablation", ["--smoke-test", "--storage", str(storage)])
    return storage / "voc_ablation_smoke", out


@pytest.fixture(scope="module")
def fault_study(ray_local, smoke_ablation, tmp_path_factory):
    """The smoke ablation's supervised + ctt trials, with NaN images at step 4 of supervised
    and an injected crash at step 5 of ctt (restarted from its step-3 checkpoint)."""
    p = argparse.ArgumentParser()
    add_common_args(p)
    a = p.parse_args(["--smoke-test", "--storage", str(tmp_path_factory.mktemp("faults"))])
    opts = options_from_args(a, "faults")
    faulty = faulty_trainable(nan_at={"supervised": 4}, crash_at={"ctt": 5})
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(experiment, "train_ctt", faulty)  # the trainable the study hands to Tune
        study_dir = ablation.run_ablation(opts, ["supervised", "ctt"])
    return study_dir, {t["variant"]: t for t in read_trials_parquet(study_dir)}


# --- studies on the shared Ray ---------------------------------------------------------------

@pytest.mark.slow
def test_ablation_smoke_outputs(smoke_ablation):
    study_dir, _ = smoke_ablation
    trials = check_study_outputs(study_dir, n_trials=7, kind="ablation")
    assert {t["variant"] for t in trials} == {"supervised", "mean_teacher", "dual_self", "cross",
                                              "cross_hc", "cross_lc", "ctt"}
    for t in trials:
        assert t["status"] == "TERMINATED" and t["error"] is None and not t["pruned"]
        assert t["step"] == ITERS and t["seed"] == 0 and t["optim.iters"] == ITERS
        assert 0.0 <= t["miou_final"] <= 100.0 and t["miou_best"] >= t["miou_final"]
        assert isinstance(t["node_id"], str) and len(t["node_id"]) >= 16  # Ray node id
        # variants really differ where they should (the grid is not one config seven times)
    by = {t["variant"]: t for t in trials}
    assert by["supervised"]["method.pairs"] == 1 and by["supervised"]["method.unsup"] == "none"
    assert by["cross"]["method.unsup"] == "cross" and by["cross"]["method.lambda_h"] == 0.0
    # the shared warm-up was forked: one warm-up experiment, its checkpoint recorded per seed
    assert list(read_json(study_dir / "warmup.json")) == ["0"]


@pytest.mark.slow
def test_pipelined_warmup_forks_equal_training_from_scratch(ray_local, smoke_ablation, tmp_path):
    """The smoke grid (warm-up trial + forks in one experiment) against the same trials run
    from scratch (--no-fork): the final records are identical, teachers included."""
    run_main("voc_ablation", ["--smoke-test", "--no-fork", "--variants", "supervised,ctt",
                              "--storage", str(tmp_path), "--out", "scratch"])
    scratch = {t["variant"]: t for t in read_trials_parquet(tmp_path / "scratch")}
    assert not (tmp_path / "scratch" / "warmup.json").exists()
    forked_dir, _ = smoke_ablation
    forked = {t["variant"]: t for t in read_trials_parquet(forked_dir)}
    for variant in ("supervised", "ctt"):
        got = last_record(forked_dir, forked[variant]["trial_id"])
        want = last_record(tmp_path / "scratch", scratch[variant]["trial_id"])
        assert deterministic(got) == deterministic(want), variant
    assert "miou/teacher1" in deterministic(got)  # the final evaluation has the teachers


@pytest.mark.slow
def test_default_output_is_the_study_progress_line_not_rays_table(smoke_ablation):
    study_dir, out = smoke_ablation
    assert f"study voc_ablation_smoke: 7 trials + 1 shared warm-up in {study_dir}" in out
    assert re.search(r"^\[\s*\d+:\d\d\] trials 7 done, 0 running, 0 pending \| compute 100%",
                     out, re.M), out[-3000:]
    assert "| Trial name" not in out and "Result logdir" not in out


def test_verbose_shows_rays_table_with_variant_seed_step_loss_miou(ray_local, tmp_path):
    out = run_main("voc_ablation", ["--smoke-test", "--variants", "supervised,ctt", "--verbose",
                                    "--storage", str(tmp_path)])
    headers = [line for line in out.splitlines() if line.startswith("| Trial name")]
    assert any(re.search(r"\| variant\s+\|\s+seed \|\s+step \|\s+loss \|\s+mIoU \|", h)
               for h in headers), "\n".join(headers) or out[-3000:]
    rows = [line for line in out.splitlines() if "TERMINATED" in line and "| ctt " in line]
    assert rows and re.search(r"\|\s+0 \|\s+6 \|\s+[\d.]+\s+\|\s+[\d.]+\s+\|$", rows[-1]), rows


@pytest.mark.slow
def test_voc_sweep_smoke_outputs(ray_local, tmp_path):
    run_main("voc_sweep", ["--smoke-test", "--storage", str(tmp_path)])
    study_dir = tmp_path / "voc_sweep_smoke"
    trials = check_study_outputs(study_dir, n_trials=3, kind="sweep")
    decays = {t["method.ema_decay"] for t in trials}
    assert len(decays) == 3 and all(0.9 <= d <= 0.9999 for d in decays)  # "1-" key resolved
    info = read_json(study_dir / "study.json")
    assert info["best"]["trial_id"] in {t["trial_id"] for t in trials}
    assert "miou" in info["best"]["test"]  # best trial re-evaluated on the test split
    import optuna

    storage = f"sqlite:///{study_dir / 'optuna.db'}"
    summaries = optuna.get_all_study_summaries(storage)
    assert [x.n_trials for x in summaries] == [3]  # this study's trials only


@pytest.mark.slow
def test_cityscapes_sweep_smoke_on_a_tiny_cityscapes_tree(ray_local, tmp_path):
    data = tmp_path / "cityscapes"
    # 6 train images (labeled.txt: 4 pairs naming *_labelTrainIds.png; unlabeled.txt: image
    # paths only), 3 val
    make_cityscapes(data, train_ids=True, splits={"4": (4, "labelTrainIds")},
                    unlabeled_pairs=False)
    run_main("cityscapes_sweep", [
        "--smoke-test", "--storage", str(tmp_path / "out"), "--data-root", str(data),
        "--split", "4", "--num-samples", "2", "--set", "model.arch=tiny",
        "--set", "data.crop_size=32", "--set", "data.crop_width=64", "--set", "data.eval_size=0"])
    study_dir = tmp_path / "out" / "cityscapes_sweep_smoke"
    trials = check_study_outputs(study_dir, n_trials=2, kind="sweep")
    for t in trials:
        assert t["status"] == "TERMINATED" and t["step"] == ITERS, t["error"]
        assert t["data.dataset"] == "cityscapes" and t["data.root"] == str(data)
        assert t["data.num_classes"] == 19 and t["data.test_split"] == "none"
    assert "test" not in read_json(study_dir / "study.json")["best"]


@pytest.mark.slow
def test_crashed_trial_resumes_from_checkpoint_bit_exact(fault_study, smoke_ablation):
    study_dir, by = fault_study
    crashed = by["ctt"]
    info = read_json(trial_json_path(study_dir, crashed["trial_id"]))
    assert info["num_failures"] == 1  # it did crash once and FailureConfig restarted it
    assert crashed["status"] == "TERMINATED" and crashed["error"] is None
    ref_dir, _ = smoke_ablation
    ref = next(t for t in read_trials_parquet(ref_dir) if t["variant"] == "ctt")
    assert crashed["miou_final"] == ref["miou_final"]
    assert crashed["miou_best"] == ref["miou_best"]
    got, want = last_record(study_dir, crashed["trial_id"]), last_record(ref_dir, ref["trial_id"])
    assert got["step"] == want["step"] == ITERS
    assert deterministic(got) == deterministic(want)  # losses, mIoUs, bank fill, ... exact
    # the replayed steps are recorded once (metrics.jsonl truncated at the restart step)
    steps = [r["step"] for r in read_metrics_jsonl(metrics_jsonl_path(study_dir,
                                                                      crashed["trial_id"]))]
    assert steps == sorted(set(steps))


@pytest.mark.slow
def test_nan_trial_is_an_error_not_retried_and_others_finish(fault_study):
    study_dir, by = fault_study
    nan = by["supervised"]
    assert nan["status"] == "ERROR"
    assert "non-finite" in nan["error"], nan["error"]
    assert nan["step"] == 3  # the last good evaluation; step 4 was never applied
    assert read_json(trial_json_path(study_dir, nan["trial_id"]))["num_failures"] == 0
    assert by["ctt"]["status"] == "TERMINATED" and by["ctt"]["step"] == ITERS
    assert "supervised" in (study_dir / "report.md").read_text()


# --- a study in a subprocess: loopback sockets, driver kill, --resume --------------------------

def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            with contextlib.suppress(psutil.Error):
                out.append((c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()))
    return out


def _tree(pid: int) -> set[int]:
    try:
        proc = psutil.Process(pid)
        return {pid} | {p.pid for p in proc.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _statuses(study_dir: Path) -> dict[str, tuple[str, float]]:
    out = {}
    for path in glob.glob(str(study_dir / "trials" / "*" / "trial.json")):
        with contextlib.suppress(ValueError, OSError):
            out[Path(path).parent.name] = (read_json(path)["status"], os.path.getmtime(path))
    return out


def _start_and_kill(script: str, argv: list[str], storage: Path, study_dir: Path,
                    n_trials: int) -> SimpleNamespace:
    """Run ``studies/<script>.py argv`` in its own process group, record the listening sockets
    of its process tree, SIGKILL the group once a finished trial (but not all ``n_trials``) is
    in the experiment snapshot. Returns what the tests check."""
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    # init_ray sets this in our own environment; the child must show it does so itself
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    log = open(storage / "driver.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "studies" / f"{script}.py"), *argv],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                            start_new_session=True)
    sockets: set[tuple[str, int, str]] = set()
    seen: set[int] = set()
    finished: dict[str, dict[str, tuple[bytes, int]]] = {}
    max_running = 0
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            tree = _tree(proc.pid)
            seen |= tree
            statuses = _statuses(study_dir)
            if statuses:  # trials run: workers, raylet, GCS all listening
                sockets |= set(_listening(tree))
            max_running = max(max_running, sum(s == "RUNNING" for s, _ in statuses.values()))
            done = {t: m for t, (s, m) in statuses.items() if s == "TERMINATED"}
            snaps = glob.glob(str(study_dir / "ray" / "experiment_state-*.json"))
            if done and snaps and max(map(os.path.getmtime, snaps)) > max(done.values()) + 0.1:
                for tid in done:
                    files = [trial_json_path(study_dir, tid), metrics_jsonl_path(study_dir, tid)]
                    finished[tid] = {f: (Path(f).read_bytes(), os.stat(f).st_mtime_ns)
                                     for f in files}
                if len(done) < n_trials:
                    break
                finished.clear()  # all finished before we could kill: nothing to resume
            time.sleep(0.2)
    finally:
        seen |= _tree(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
        leftovers = _wait_gone(seen)
    driver_log = (storage / "driver.log").read_text()
    assert finished, f"no trial finished before the kill (or all did):\n{driver_log[-3000:]}"
    return SimpleNamespace(argv=argv, study_dir=study_dir, sockets=sockets, finished=finished,
                           leftovers=leftovers, max_running=max_running)


@pytest.fixture(scope="module")
def killed_study(tmp_path_factory):
    """A 3-trial ablation (one trial at a time), killed after its first trial finished."""
    storage = tmp_path_factory.mktemp("killed")
    # long enough trials that the kill lands between the first and the last (the cheaper tiny
    # of 2026-12 runs a smoke step in ~0.02 s, so 60 iterations let all three finish first)
    argv = ["--smoke-test", "--variants", "supervised,mean_teacher,dual_self", "--no-fork",
            "--max-concurrent", "1", "--storage", str(storage), "--out", "killed",
            "--iters", str(KILLED_ITERS), "--set", "run.eval_every=20",
            "--set", "run.checkpoint_every=20"]
    return _start_and_kill("voc_ablation", argv, storage, storage / "killed", n_trials=3)


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory):
    """A 3-trial Optuna sweep (one trial at a time), killed after its first trial finished."""
    storage = tmp_path_factory.mktemp("killed_sweep")
    argv = ["--smoke-test", "--num-samples", "3", "--scheduler", "none", "--max-concurrent", "1",
            "--storage", str(storage), "--out", "ksweep", "--iters", str(KILLED_ITERS),
            "--set", "run.eval_every=20", "--set", "run.checkpoint_every=20"]
    return _start_and_kill("voc_sweep", argv, storage, storage / "ksweep", n_trials=3)


def _wait_gone(pids: set[int], timeout: float = 15.0) -> list[str]:
    """Wait for the processes we started to exit; kill any straggler by pid (they are ours)
    and return their names."""
    deadline = time.time() + timeout
    alive = [p for p in (_proc(pid) for pid in pids) if p is not None]
    while alive and time.time() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    names = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            names.append(p.name())
            p.kill()
    return names


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.mark.slow
def test_study_listens_on_loopback_only(killed_study):
    sockets = killed_study.sockets
    names = {name for _, _, name in sockets}
    assert any("gcs_server" in n for n in names), sockets  # else this test could not fail
    assert any("raylet" in n for n in names), sockets
    public = [s for s in sockets if not _is_loopback(s[0])]
    assert not public, f"listening on non-loopback addresses: {public}"


@pytest.mark.slow
def test_killed_driver_leaves_no_processes(killed_study):
    leftovers = killed_study.leftovers
    assert leftovers == [], f"processes survived SIGKILL of the driver's group: {leftovers}"


@pytest.mark.slow
def test_max_concurrent_limits_ablation_trials(killed_study):
    assert killed_study.max_running == 1  # --max-concurrent 1 (Tune ignores it for grids)


def _check_resumed(trials: list[dict], finished: dict[str, dict[str, tuple[bytes, int]]]) -> None:
    """Every trial ran to the end, and those finished before the kill were not re-run."""
    assert all(t["status"] == "TERMINATED" and t["step"] == KILLED_ITERS for t in trials)
    assert set(finished) <= {t["trial_id"] for t in trials}
    for files in finished.values():
        for path, (data, mtime_ns) in files.items():
            assert Path(path).read_bytes() == data, path
            assert os.stat(path).st_mtime_ns == mtime_ns, path


@pytest.mark.slow
def test_resume_after_driver_kill_keeps_finished_trials(ray_local, killed_study):
    argv, study_dir, finished = killed_study.argv, killed_study.study_dir, killed_study.finished
    run_main("voc_ablation", [*argv, "--resume"])
    trials = check_study_outputs(study_dir, n_trials=3, kind="ablation")
    assert sorted(t["variant"] for t in trials) == ["dual_self", "mean_teacher", "supervised"]
    _check_resumed(trials, finished)
    info = read_json(study_dir / "study.json")
    assert len(info["resumed"]) == 1 and len(info["wall_s_runs"]) == 1


@pytest.mark.slow
def test_sweep_resume_after_driver_kill_keeps_finished_trials(ray_local, killed_sweep):
    argv, study_dir, finished = killed_sweep.argv, killed_sweep.study_dir, killed_sweep.finished
    run_main("voc_sweep", [*argv, "--resume"])
    trials = check_study_outputs(study_dir, n_trials=3, kind="sweep")
    _check_resumed(trials, finished)
    info = read_json(study_dir / "study.json")
    assert len(info["resumed"]) == 1
    assert info["best"]["trial_id"] in {t["trial_id"] for t in trials}
