"""End-to-end tests of the study system (ctt/tune/study.py, cli.py, studies/*.py) on real Ray.

One in-process Ray instance serves the whole module (``ray_local``); the driver-kill test runs
its study in a subprocess with its own Ray (the process we kill) and also checks that every
socket that study listens on is loopback. Trials use the smoke-test settings (6 iterations,
tiny network), so every number here is deterministic for a seed and thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import io
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import psutil  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from fault_trainable import faulty_trainable  # noqa: E402
from PIL import Image  # noqa: E402
from tb_events import hparams_records  # noqa: E402

from ctt.config import get_preset  # noqa: E402
from ctt.tune import study as study_mod  # noqa: E402
from ctt.tune.cli import add_common_args, options_from_args  # noqa: E402
from ctt.tune.layout import (  # noqa: E402
    dedupe_by_step,
    metrics_jsonl_path,
    read_metrics_jsonl,
    tb_run_name,
    trial_json_path,
)
from ctt.tune.study import StorageError, StudyOptions, check_storage, init_ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLAT_KEYS = list(get_preset("tiny").to_flat())
TRIAL_COLUMNS = ["trial_id", "variant", "seed", "status", "error", "pruned", "step", "wall_s",
                 "miou_final", "miou_best", "node_id"]
METRIC_NAMES = ["step", "miou", "miou/student0", "miou/student1", "miou/teacher0",
                "miou/teacher1", "loss/total", "loss/sup", "loss/unsup", "loss/hc", "loss/lc",
                "pl/weight", "n/anchors_hc", "n/anchors_lc", "bank/fill", "contrast_on"]
ITERS = 6  # cli.SMOKE_OVERRIDES
KILLED_ITERS = 200


def load_script(name: str):
    """Import ``studies/<name>.py`` (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"_study_{name}", ROOT / "studies" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_main(script: str, argv: list[str]) -> str:
    """``studies/<script>.py main(argv)``; returns what it printed (the progress tables)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert load_script(script).main(argv) == 0
    return out.getvalue()


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def trials_of(study_dir: Path) -> list[dict]:
    return pq.read_table(study_dir / "trials.parquet").to_pylist()


def last_record(study_dir: Path, trial_id: str) -> dict:
    return dedupe_by_step(read_metrics_jsonl(metrics_jsonl_path(study_dir, trial_id)))[-1]


def deterministic(rec: dict) -> dict:
    """A metrics record without wall-clock and host fields."""
    return {k: v for k, v in rec.items()
            if not k.startswith("time/") and k not in ("trial_id", "hostname", "node_ip")}


def hparams_sessions(logdir: Path) -> list[dict[str, object]]:
    """HParams session-start hparams of every event file in ``logdir``, keyed by the columns'
    display names (the config keys; the leading columns' names carry a rank prefix)."""
    records = hparams_records(logdir)
    display = {h.name: h.display_name or h.name for r in records if r.HasField("experiment")
               for h in r.experiment.hparam_infos}
    return [{display.get(k, k): getattr(x, x.WhichOneof("kind"))
             for k, x in hp.session_start_info.hparams.items()}
            for hp in records if hp.HasField("session_start_info")]


def check_study_outputs(study_dir: Path, n_trials: int, kind: str) -> list[dict]:
    """The files every finished study holds (architecture.md, "Studies"); returns the trials."""
    table = pq.read_table(study_dir / "trials.parquet")
    for col in FLAT_KEYS + TRIAL_COLUMNS:
        assert col in table.column_names, f"trials.parquet lacks {col!r}"
    trials = table.to_pylist()
    assert len(trials) == n_trials
    assert len({t["trial_id"] for t in trials}) == n_trials
    metrics = pq.read_table(study_dir / "metrics.parquet")
    for col in ["trial_id", *METRIC_NAMES]:
        assert col in metrics.column_names, f"metrics.parquet lacks {col!r}"
    assert set(metrics.column("trial_id").to_pylist()) == {t["trial_id"] for t in trials}

    report = (study_dir / "report.md").read_text()
    for t in trials:
        if t["status"] == "TERMINATED" and kind == "sweep":
            # the top-trials table: the trial's row with its variant, step and mIoU
            assert re.search(rf"^\| \d+ \| {t['trial_id']} \| {t['variant']} \|.*\d+\.\d+",
                             report, re.M), report
        elif t["status"] == "TERMINATED":
            # a markdown table row naming the variant, with its mIoU as a number
            assert re.search(rf"^\| {t['variant']} \|.*\d+\.\d+", report, re.M), report
    info = read_json(study_dir / "study.json")
    assert info["kind"] == kind
    assert {"torch", "ray", "optuna", "python"} <= set(info["env"]["versions"])
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", info["env"]["git_commit"])

    for t in trials:
        sessions = hparams_sessions(study_dir / "tb" / tb_run_name(t["variant"], t["seed"],
                                                                    t["trial_id"]))
        assert len(sessions) == 1, t["trial_id"]
        hp = sessions[0]
        flat = set(FLAT_KEYS) - {"run.seed"}  # shown as `seed`
        assert flat <= set(hp), flat - set(hp)
        assert hp["variant"] == t["variant"] and hp["seed"] == t["seed"]
        assert not any(k.startswith("_") for k in hp)  # _fork_from, _until stay out
        assert hp["data.dataset"] == t["data.dataset"]
    return trials


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One loopback Ray for the module; sweeps keep their Optuna sqlite in a temp dir."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTT_OPTUNA_DIR", str(tmp_path_factory.mktemp("optuna")))
        started = not ray.is_initialized()
        init_ray(StudyOptions(name="tests", num_cpus=2))
        yield
        if started:
            ray.shutdown()


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
        mp.setattr(study_mod, "train_ctt", faulty)  # the trainable the study hands to Tune
        study_dir = study_mod.run_ablation(opts, ["supervised", "ctt"])
    return study_dir, {t["variant"]: t for t in trials_of(study_dir)}


def make_cityscapes_tree(root: Path, n_train: int = 6, n_val: int = 2, n_labeled: int = 4,
                         h: int = 32, w: int = 64) -> None:
    """A Cityscapes-layout dataset: leftImg8bit/ + gtFine/*_labelTrainIds.png for train and
    val, and splits/<n_labeled>/labeled.txt (pairs) + unlabeled.txt (image paths only)."""
    rng = np.random.default_rng(0)
    pairs: dict[str, list[tuple[str, str]]] = {}
    for split, city, n in (("train", "aachen", n_train), ("val", "frankfurt", n_val)):
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        pairs[split] = []
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            label = np.full((h, w), 255, np.uint8)
            label[: h // 2] = 0  # road
            label[h // 2:, : w // 2] = 13  # car
            label[h // 2:, w // 2: w - 4] = 10  # sky (a strip stays 255: ignore)
            image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            for c, colour in ((0, (128, 64, 128)), (13, (0, 0, 142)), (10, (70, 130, 180))):
                image[label == c] += np.array(colour, np.uint8) // 2
            img_rel = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
            lab_rel = f"gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png"
            Image.fromarray(image).save(root / img_rel)
            Image.fromarray(label).save(root / lab_rel)
            pairs[split].append((img_rel, lab_rel))
    split_dir = root / "splits" / str(n_labeled)
    split_dir.mkdir(parents=True)
    (split_dir / "labeled.txt").write_text(
        "".join(f"{i} {lab}\n" for i, lab in pairs["train"][:n_labeled]))
    (split_dir / "unlabeled.txt").write_text(
        "".join(f"{i}\n" for i, _ in pairs["train"][n_labeled:]))


# --- no Ray needed ---------------------------------------------------------------------------

ALL_VARIANTS = ["supervised", "mean_teacher", "dual_self", "cross", "cross_hc", "cross_lc", "ctt"]


def test_ablation_trials_start_longest_first_with_seeds_interleaved():
    opts = StudyOptions(name="order", seeds=[0, 1, 2])
    order = [(t["variant"], t["seed"]) for t in study_mod.ablation_trials(opts, ALL_VARIANTS)]
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
    configs = study_mod.ablation_trials(opts, list(variants))
    items = study_mod._grid_items(opts, configs, str(tmp_path), fork=True)
    space = study_mod._common_space(items)
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
        study_mod._check_warmups(tmp_path)


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
    monkeypatch.setattr(study_mod, "alive_nodes", lambda: 3)
    with pytest.raises(StorageError, match="--storage-shared") as e:
        check_storage("/tmp/studies", shared=False)
    assert "3 alive nodes" in str(e.value) and "/tmp/studies" in str(e.value)
    check_storage("/mnt/nfs/studies", shared=True)
    check_storage("s3://bucket/prefix", shared=False)
    check_storage("gs://bucket/prefix", shared=False)
    monkeypatch.setattr(study_mod, "alive_nodes", lambda: 1)
    check_storage("/tmp/studies", shared=False)


def test_fresh_study_refuses_an_existing_study_dir(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text("{}")
    opts = StudyOptions(name="s", storage=str(tmp_path))
    with pytest.raises(study_mod.StudyExistsError, match="--resume"):
        study_mod.run_ablation(opts, ["supervised"])
    assert (tmp_path / "s" / "study.json").exists()
    assert (tmp_path / "s" / ".study.lock").read_text() == ""  # taken, then released
    # --resume of a study without a Tune experiment yet starts it (the warm-ups may be all
    # that ran)...
    opts.resume = True
    assert study_mod._start_or_resume(opts, tmp_path / "s", str(tmp_path / "s" / "ray")) is False
    assert (tmp_path / "s" / "study.json").exists()
    # ... but a directory without a study is nothing to resume
    with pytest.raises(study_mod.NoStudyError, match="nothing to resume at"):
        study_mod._start_or_resume(opts, tmp_path, str(tmp_path / "ray"))
    # a smoke test replaces its own throwaway directory (all but the lock it holds), but
    # never one named with --out
    p = argparse.ArgumentParser()
    add_common_args(p)
    smoke = options_from_args(p.parse_args(["--smoke-test", "--storage", str(tmp_path)]), "s")
    assert smoke.replace_existing
    (tmp_path / "s" / "trials").mkdir()
    assert study_mod._start_or_resume(smoke, tmp_path / "s", str(tmp_path / "s" / "ray")) is False
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
    scratch = {t["variant"]: t for t in trials_of(tmp_path / "scratch")}
    assert not (tmp_path / "scratch" / "warmup.json").exists()
    forked_dir, _ = smoke_ablation
    forked = {t["variant"]: t for t in trials_of(forked_dir)}
    for variant in ("supervised", "ctt"):
        got = last_record(forked_dir, forked[variant]["trial_id"])
        want = last_record(tmp_path / "scratch", scratch[variant]["trial_id"])
        assert deterministic(got) == deterministic(want), variant
    assert "miou/teacher1" in deterministic(got)  # the final evaluation has the teachers


@pytest.mark.slow
def test_progress_table_shows_variant_seed_step_loss_miou(smoke_ablation):
    _, out = smoke_ablation
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
    make_cityscapes_tree(data)
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
    ref = next(t for t in trials_of(ref_dir) if t["variant"] == "ctt")
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
    proc = subprocess.Popen([sys.executable, str(ROOT / "studies" / f"{script}.py"), *argv],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
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
