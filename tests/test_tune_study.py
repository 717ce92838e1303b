"""The study system without running a study (ctt/tune/ablation.py, runtime.py, cli.py, grid.py,
studies/*.py):
trial order, the forked grid's searcher, warm-up publishing, --dry-run, the checks that refuse
a study before Ray starts (storage, data root, directory in use, --resume of nothing), and how
a study submitted as a Ray job finds its cluster. The studies themselves run in
tests/scenarios/test_study_runs.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from helpers import load_script  # noqa: E402

from ctt.config import get_preset  # noqa: E402
from ctt.tune import ablation, runtime  # noqa: E402
from ctt.tune import storage as study_storage  # noqa: E402
from ctt.tune.cli import add_common_args, options_from_args  # noqa: E402
from ctt.tune.runtime import StudyOptions  # noqa: E402
from ctt.tune.storage import StorageError, check_storage  # noqa: E402

ALL_VARIANTS = ["supervised", "mean_teacher", "dual_self", "cross", "cross_hc", "cross_lc", "ctt"]


def test_ablation_trials_start_longest_first_with_seeds_interleaved():
    opts = StudyOptions(name="order", seeds=[0, 1, 2])
    order = [(t["variant"], t["seed"]) for t in ablation.ablation_trials(opts, ALL_VARIANTS)]
    assert order == [(v, s) for v in reversed(ALL_VARIANTS) for s in (0, 1, 2)]
    # the estimate behind it: per-iteration cost in the order the steps measure
    from ctt.config import apply_variant
    from ctt.tune.grid import relative_cost

    costs = [relative_cost(apply_variant(get_preset("tiny"), v).to_flat())
             for v in ALL_VARIANTS]
    assert costs == sorted(costs) and costs[0] * 4 < costs[-1]


def _grid(tmp_path: Path, seeds=(0, 1), variants=("supervised", "ctt"), max_concurrent=0):
    """A forked grid's searcher, its warm-up directories local under ``tmp_path``."""
    from ctt.tune.grid import GridSearcher

    opts = StudyOptions(name="g", seeds=list(seeds))
    configs = ablation.ablation_trials(opts, list(variants))
    items = ablation._grid_items(opts, configs, str(tmp_path), fork=True)
    space = ablation._common_space(items)
    searcher = GridSearcher(items, max_concurrent=max_concurrent,
                            record=str(tmp_path / "warmup.json"),
                            failures=str(tmp_path / "warmup-failed.json"))
    return searcher, space


def _publish(tmp_path: Path, seed: int) -> None:
    d = tmp_path / "warmup" / f"seed-{seed}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.pt").write_bytes(b"x")


def test_grid_searcher_releases_a_seeds_variants_when_its_warmup_is_done(tmp_path):
    """Warm-ups first; a variant waits only for its own seed's warm-up (no barrier), the
    longest first; the searcher's state survives save/restore (Tune's experiment snapshot)."""
    from ray.tune.search import Searcher

    searcher, space = _grid(tmp_path)
    assert space["optim.iters"] == get_preset("tiny").optim.iters  # shared keys live there
    w0, w1 = searcher.suggest("t0"), searcher.suggest("t1")
    assert (w0["variant"], w0["seed"], w1["variant"], w1["seed"]) == ("warmup", 0, "warmup", 1)
    assert w0["_publish"] == str(tmp_path / "warmup" / "seed-0")
    assert w0["_until"] == get_preset("tiny").method.warmup_iters
    assert searcher.suggest("t2") is None  # no variant may start before its warm-up
    assert not (tmp_path / "warmup.json").exists()
    # seed 1's warm-up ends first: its variants start, longest first, while seed 0 warms up
    _publish(tmp_path, 1)
    searcher.on_trial_complete("t1", {"step": 400, "error": None})
    assert json.loads((tmp_path / "warmup.json").read_text()) == {
        "1": str(tmp_path / "warmup" / "seed-1")}
    a = searcher.suggest("t3")
    assert (a["variant"], a["seed"]) == ("ctt", 1)
    assert a["_fork_from"] == str(tmp_path / "warmup" / "seed-1")
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    restored, _ = _grid(tmp_path / "other")
    restored.restore(str(path))
    for s in (searcher, restored):
        b = s.suggest("t4")
        assert (b["variant"], b["seed"]) == ("supervised", 1)
        assert s.suggest("t5") is None
        _publish(tmp_path, 0)
        s.on_trial_complete("t0", {"step": 400})
        assert [(c["variant"], c["seed"]) for c in (s.suggest("t6"), s.suggest("t7"))] == [
            ("ctt", 0), ("supervised", 0)]
        assert s.suggest("t8") is Searcher.FINISHED
        (tmp_path / "warmup" / "seed-0" / "state.pt").unlink()


def test_grid_searcher_limits_concurrency_and_drops_the_forks_of_a_failed_warmup(tmp_path):
    from ray.tune.search import Searcher

    searcher, _ = _grid(tmp_path, max_concurrent=1)
    assert searcher.suggest("t0")["seed"] == 0
    assert searcher.suggest("t1") is None  # one at a time
    searcher.on_trial_complete("t0", {"step": 4, "error": "non-finite loss/sup"})
    assert searcher.suggest("t1")["variant"] == "warmup"  # seed 1's warm-up
    searcher.on_trial_complete("t1", None, error=True)  # crashed beyond max_failures
    assert searcher.suggest("t2") is Searcher.FINISHED  # nothing of either seed may run
    assert sorted(searcher.dropped) == ["ctt/0", "ctt/1", "supervised/0", "supervised/1"]
    failed = json.loads((tmp_path / "warmup-failed.json").read_text())
    assert failed["warmup/0"] == "warm-up of seed 0 failed: non-finite loss/sup"
    assert failed["warmup/1"] == "warm-up of seed 1 failed: the trial failed"
    with pytest.raises(RuntimeError, match="warm-up of seed 0 failed: non-finite"):
        ablation._check_warmups(tmp_path)


def test_warmup_publishes_its_checkpoint_locally_and_to_a_storage_uri(tmp_path):
    """The warm-up trial's ``_publish`` copy, read back as the forks read it."""
    from ctt.tune.grid import published
    from ctt.tune.trainable import _fork_checkpoint, _publish

    state = tmp_path / "trial" / "state.pt"
    state.parent.mkdir()
    state.write_bytes(b"state")
    for dest in (str(tmp_path / "local" / "seed-0"),
                 f"file://{tmp_path}/bucket/study/warmup/seed-0"):
        assert not published(dest)
        _publish(state, dest)
        assert published(dest)
        with _fork_checkpoint(dest).as_directory() as d:
            assert (Path(d) / "state.pt").read_bytes() == b"state"
    assert (tmp_path / "bucket" / "study" / "warmup" / "seed-0" / "state.pt").is_file()


def test_grid_searcher_adopts_a_published_warmup(tmp_path):
    """A warm-up that finished after the last experiment snapshot (or in an earlier run of
    the study) is not run again: its published checkpoint counts."""
    _publish(tmp_path, 0)
    searcher, _ = _grid(tmp_path)
    assert json.loads((tmp_path / "warmup.json").read_text()) == {
        "0": str(tmp_path / "warmup" / "seed-0")}
    got = [(c["variant"], c["seed"]) for c in (searcher.suggest("a"), searcher.suggest("b"),
                                                searcher.suggest("c"))]
    assert got == [("warmup", 1), ("ctt", 0), ("supervised", 0)]


def test_dry_run_prints_trials_and_estimate_and_launches_nothing(monkeypatch, capsys):
    was_up = ray.is_initialized()

    def forbidden(*args, **kwargs):
        raise AssertionError("--dry-run must not start Ray or launch trials")

    monkeypatch.setattr(ray, "init", forbidden)
    monkeypatch.setattr(ray.tune.Tuner, "fit", forbidden)
    assert load_script("voc_ablation").main(
        ["--smoke-test", "--dry-run", "--variants", "supervised,ctt", "--storage", "/nonexistent"]
    ) == 0
    out = capsys.readouterr().out
    assert "2 trials" in out
    assert re.search(r"supervised\s+seed 0: 6 iters x [\d.]+ ms", out), out
    assert re.search(r"ctt\s+seed 0: 6 iters x [\d.]+ ms", out), out
    assert re.search(r"total compute [\d.]+ min", out), out
    assert load_script("voc_sweep").main(
        ["--smoke-test", "--dry-run", "--num-samples", "5", "--storage", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    assert "4 trials" in out and "search space: 1-method.ema_decay" in out
    assert "3 search trials, then 1 confirmation trials (top 1 x 1 fresh seeds)" in out
    # the search runs at the study's seed, the confirmation on the fresh seed after it
    assert re.findall(r"ctt\s+seed (\d+): 6 iters", out) == ["0", "0", "0", "1"], out
    assert "shared warm-up" not in out  # ema_decay is sampled: each trial runs its own
    assert load_script("voc_contrast_sweep").main(
        ["--smoke-test", "--dry-run", "--num-samples", "2", "--storage", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    assert "shared warm-up: 1 x 2 iters" in out, out  # counted once, not once per trial
    assert ray.is_initialized() == was_up
    assert not Path("/nonexistent").exists()


def test_cityscapes_sweep_requires_real_data_root(tmp_path, capsys):
    script = load_script("cityscapes_sweep")
    assert script.main(["--smoke-test", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "data.dataset='cityscapes' needs its dataset: pass --data-root" in err
    (tmp_path / "leftImg8bit").mkdir()
    assert script.main(["--data-root", str(tmp_path), "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data root") and "is not a Cityscapes root" in err
    assert "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leftImg8bit"]  # nothing written


def test_check_storage_refuses_local_path_on_several_nodes(monkeypatch):
    monkeypatch.setattr(study_storage, "alive_nodes", lambda: 3)
    with pytest.raises(StorageError, match="--storage-shared") as e:
        check_storage("/tmp/studies", shared=False)
    assert "3 alive nodes" in str(e.value) and "/tmp/studies" in str(e.value)
    check_storage("/mnt/nfs/studies", shared=True)
    check_storage("s3://bucket/prefix", shared=False)
    check_storage("gs://bucket/prefix", shared=False)
    monkeypatch.setattr(study_storage, "alive_nodes", lambda: 1)
    check_storage("/tmp/studies", shared=False)
    # one node now, but an autoscaler that adds workers: their trials' files would be theirs
    with pytest.raises(StorageError, match="--storage-shared") as e:
        check_storage("/tmp/studies", shared=False, autoscaler="/home/u/ray_bootstrap.yaml")
    assert "autoscaler (/home/u/ray_bootstrap.yaml) adds worker nodes" in str(e.value)
    check_storage("/mnt/nfs/studies", shared=True, autoscaler="/home/u/ray_bootstrap.yaml")
    check_storage("s3://bucket/prefix", shared=False, autoscaler="/home/u/ray_bootstrap.yaml")


def test_fresh_study_refuses_an_existing_study_dir(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text("{}")
    opts = StudyOptions(name="s", storage=str(tmp_path))
    with pytest.raises(runtime.StudyExistsError, match="--resume"):
        ablation.run_ablation(opts, ["supervised"])
    assert (tmp_path / "s" / "study.json").exists()
    assert (tmp_path / "s" / ".study.lock").read_text() == ""  # taken, then released
    # --resume of a study without a Tune experiment yet starts it (the warm-ups may be all
    # that ran)...
    opts.resume = True
    assert runtime._start_or_resume(opts, tmp_path / "s", str(tmp_path / "s" / "ray")) is False
    assert (tmp_path / "s" / "study.json").exists()
    # ... but a directory without a study is nothing to resume
    with pytest.raises(runtime.NoStudyError, match="nothing to resume at"):
        runtime._start_or_resume(opts, tmp_path, str(tmp_path / "ray"))
    # a smoke test replaces its own throwaway directory (all but the lock it holds), but
    # never one named with --out
    p = argparse.ArgumentParser()
    add_common_args(p)
    smoke = options_from_args(p.parse_args(["--smoke-test", "--storage", str(tmp_path)]), "s")
    assert smoke.replace_existing
    (tmp_path / "s" / "trials").mkdir()
    assert runtime._start_or_resume(smoke, tmp_path / "s", str(tmp_path / "s" / "ray")) is False
    assert [x.name for x in (tmp_path / "s").iterdir()] == [".study.lock"]
    named = p.parse_args(["--smoke-test", "--out", "mine", "--storage", str(tmp_path)])
    assert not options_from_args(named, "s").replace_existing


def test_study_refuses_a_directory_in_use_and_a_resume_of_nothing_before_ray(
        tmp_path, monkeypatch, capsys):
    """Two studies on one --out: the second fails at once (before Ray starts, before anything
    is written) naming the holder. --resume of a study that does not exist is an error and
    creates nothing."""
    import socket

    from ctt.rundir import STUDY_LOCK, DirLock

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(ray, "init", forbidden)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    script = load_script("voc_ablation")
    argv = ["--smoke-test", "--storage", str(tmp_path), "--out", "busy"]
    with DirLock(tmp_path / "busy", STUDY_LOCK, "study"):  # a study runs there
        assert script.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: study directory {tmp_path / 'busy'} is in use by pid "
                              f"{os.getpid()} on host {socket.gethostname()} since ")
        assert "\n" not in err
        assert [x.name for x in (tmp_path / "busy").iterdir()] == [STUDY_LOCK]
        assert script.main([*argv, "--resume"]) == 2  # a resume waits its turn too
        assert "is in use by" in capsys.readouterr().err

    for name in ("voc_ablation", "voc_sweep"):
        assert load_script(name).main(["--storage", str(tmp_path), "--out", "typo",
                                       "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: nothing to resume at {tmp_path / 'typo'}: it holds no "
                              "study"), err
        assert "without --resume" in err and "\n" not in err
        assert not (tmp_path / "typo").exists()


# --- a study submitted as a Ray job (README: ray job submit) -------------------------------

def test_a_job_refuses_relative_storage(monkeypatch, tmp_path):
    """Inside `ray job submit` the driver's working directory is Ray's temporary copy of
    --working-dir: a relative --storage (the default, studies_out) would vanish with it."""
    from ctt.tune.storage import RAY_JOB_ENV, check_job_storage

    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    check_job_storage("studies_out")  # a plain run: relative to where the user is
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    with pytest.raises(StorageError, match="studies_out.*Ray job"):
        check_job_storage("studies_out")
    check_job_storage(str(tmp_path / "shared"))
    check_job_storage("s3://bucket/prefix")


def test_a_job_joins_its_cluster_without_address(monkeypatch):
    """A study submitted with `ray job submit` but without --address joins the job's cluster
    instead of starting a second Ray on the head; outside a job nothing changes."""
    from ctt.tune.storage import RAY_JOB_ENV

    p = argparse.ArgumentParser()
    add_common_args(p)
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    assert options_from_args(p.parse_args([]), "s").address is None
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    assert options_from_args(p.parse_args([]), "s").address == "auto"
    assert options_from_args(p.parse_args(["--address", "10.0.0.1:6379"]), "s").address == (
        "10.0.0.1:6379")
