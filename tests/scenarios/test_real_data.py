"""The documented real-data commands, run as a user runs them, on trees in the real layouts.

Every command is the real entry point in a subprocess (``studies/*.py``, ``python -m
ctt.train``) with a real preset; only the network and the crop are shrunk (``model.arch=tiny``,
``data.crop_size=32``; Cityscapes also ``crop_width=64``, ``eval_size=32``), with
``--smoke-test`` for studies and a few iterations for ``ctt.train``. The data trees come from
``tests/real_layouts.py`` (Pascal VOC 2012 + SBD, Cityscapes, as downloaded).

After EVERY command, failing ones included, the data root must be byte-for-byte the tree it
was before (``hash_tree``: no file, directory or lock created, changed or deleted), and a root
that did not exist must still not exist. Bad input (missing root, another dataset's layout, a
half-prepared or empty directory) must exit 2 with one ``error:`` line on stderr that names the
root, and no traceback. A study whose every trial failed must exit non-zero and say why.

Each subprocess runs in its own scratch directory (its working directory, ``--out``,
``--storage``, the Optuna and cache directories), in its own process group, killed whole on a
timeout. Study runs take 15-40 s each on 2 cores (Ray start-up, a warm-up and two trials), so
they are marked ``slow``; there is one study per preset or dataset, and the split-file forms are
parametrized on the cheap ``ctt.train`` path instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import REPO_ROOT
from real_layouts import hash_tree, make_cityscapes, make_half_prepared, make_voc

SMOKE_ITERS = 6  # ctt.tune.cli.SMOKE_OVERRIDES
TRAIN_ITERS = 4
SPLIT = "4"
SHRINK = ["--set", "model.arch=tiny", "--set", "data.crop_size=32"]
SHRINK_CITYSCAPES = [*SHRINK, "--set", "data.crop_width=64", "--set", "data.eval_size=32"]
STUDY_TIMEOUT_S = 300
FAIL_TIMEOUT_S = 120


@dataclass
class Run:
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def tail(self, n: int = 4000) -> str:
        return (f"$ {' '.join(self.args)}\nexit {self.rc} after {self.seconds:.1f} s\n"
                f"--- stdout ---\n{self.stdout[-n:]}\n--- stderr ---\n{self.stderr[-n:]}")


def run_entry(args: list[str], work: Path, data_roots: list[Path],
              timeout: float = STUDY_TIMEOUT_S) -> Run:
    """``python <args>`` with ``work`` as working directory and scratch space; asserts that
    every path in ``data_roots`` is exactly as before (or still absent) afterwards."""
    work.mkdir(parents=True, exist_ok=True)
    before = {root: hash_tree(root) for root in data_roots}
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                         if p),
           # everything a run may write outside its --out/--storage goes to scratch
           "CTT_STAGING": str(work / "staging"),
           "CTT_CACHE": str(work / "cache"),
           "RAY_USAGE_STATS_ENABLED": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
           "RAY_AIR_NEW_OUTPUT": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we started: driver, Ray, workers
        out, err = proc.communicate()
        run = Run(args, -9, out, err, time.perf_counter() - t0)
        pytest.fail(f"timed out after {timeout} s\n{run.tail()}")
    run = Run(args, proc.returncode, out, err, time.perf_counter() - t0)
    for root, tree in before.items():
        after = hash_tree(root)
        if after != tree:
            added = sorted(set(after) - set(tree))[:10]
            removed = sorted(set(tree) - set(after))[:10]
            changed = sorted(k for k in set(tree) & set(after) if tree[k] != after[k])[:10]
            pytest.fail(f"the command changed the data root {root}: added {added}, removed "
                        f"{removed}, changed {changed}\n{run.tail()}")
    return run


def train_args(preset: str, data_root: Path, out: Path, *extra: str) -> list[str]:
    shrink = SHRINK_CITYSCAPES if preset.startswith("cityscapes") else SHRINK
    if preset == "tiny":  # its 200-iteration warm-up would outlast --iters (refused as such)
        shrink = [*shrink, "--set", "method.warmup_iters=2"]
    return ["-m", "ctt.train", "--preset", preset, "--data-root", str(data_root),
            "--iters", str(TRAIN_ITERS), "--out", str(out), *shrink, *extra]


def study_args(script: str, data_root: Path, storage: Path, *extra: str,
               preset: str | None = None) -> list[str]:
    shrink = SHRINK_CITYSCAPES if script == "cityscapes_sweep" else SHRINK
    args = [str(REPO_ROOT / "studies" / f"{script}.py"), "--data-root", str(data_root),
            "--smoke-test", "--storage", str(storage), "--max-failures", "0", *shrink, *extra]
    return args if preset is None else [*args, "--preset", preset]


def assert_user_error(run: Run, path: Path) -> str:
    """Exit 2, stderr exactly one ``error:`` line naming ``path``, no traceback; the line."""
    assert run.rc == 2, run.tail()
    assert "Traceback" not in run.stderr, run.tail()
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.tail()
    assert str(path) in lines[0], run.tail()
    return lines[0]


def assert_train_outputs(run: Run, out: Path, *, dataset: str, num_classes: int,
                         data_root: Path) -> dict:
    """A finished ``ctt.train`` run: config, a final evaluated record, a checkpoint."""
    assert run.rc == 0, run.tail()
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["data.dataset"] == dataset
    assert cfg["data.num_classes"] == num_classes
    assert cfg["data.root"] == str(data_root)
    assert cfg["data.labeled_split"] == SPLIT
    assert cfg["data.test_split"] == "none"  # neither VOC nor Cityscapes has public test labels
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    last = records[-1]
    assert last["step"] == TRAIN_ITERS
    assert math.isfinite(last["miou"]) and 0.0 <= last["miou"] <= 100.0, last
    assert math.isfinite(last["loss/total"]), last
    assert (out / "checkpoints" / f"step_{TRAIN_ITERS:08d}.pt").is_file()
    assert re.search(r"done: mIoU [\d.]+ at step 4", run.stdout), run.tail()
    return cfg


def assert_study_outputs(run: Run, study_dir: Path, *, n_trials: int, dataset: str,
                         num_classes: int, data_root: Path, preset: str) -> list[dict]:
    """A finished study: every trial TERMINATED at the last smoke step with an mIoU, on the
    preset's dataset and our root; the report lists them."""
    assert run.rc == 0, run.tail()
    trials = pq.read_table(study_dir / "trials.parquet").to_pylist()
    assert len(trials) == n_trials, run.tail()
    for t in trials:
        assert t["status"] == "TERMINATED" and t["error"] is None, (t["error"], run.tail())
        assert t["step"] == SMOKE_ITERS
        assert math.isfinite(t["miou_final"]) and 0.0 <= t["miou_final"] <= 100.0
        assert t["data.dataset"] == dataset and t["data.num_classes"] == num_classes
        assert t["data.root"] == str(data_root) and t["data.labeled_split"] == SPLIT
        assert t["data.test_split"] == "none"
    metrics = pq.read_table(study_dir / "metrics.parquet").to_pylist()
    assert {m["trial_id"] for m in metrics} == {t["trial_id"] for t in trials}
    report = (study_dir / "report.md").read_text()
    for t in trials:
        # an ablation's row starts with the variant, a sweep's top-trials row with rank and id
        row = rf"^\|( \d+ \| {t['trial_id']} \|)? {re.escape(t['variant'])} \|.*\d+\.\d+"
        assert re.search(row, report, re.M), report
    assert json.loads((study_dir / "study.json").read_text())["preset"] == preset
    return trials


# --- python -m ctt.train -----------------------------------------------------------------------

@pytest.mark.parametrize("form", ["pair_class", "pair_aug", "ids"])
def test_train_voc_r101_each_split_form(tmp_path: Path, form: str) -> None:
    data = tmp_path / "data"
    make_voc(data, splits={SPLIT: (4, form)})
    out = tmp_path / "work" / "run"
    run = run_entry(train_args("voc-r101", data, out, "--split", SPLIT), tmp_path / "work",
                    [data])
    assert_train_outputs(run, out, dataset="voc", num_classes=21, data_root=data)


@pytest.mark.parametrize("kind", ["labelIds", "labelTrainIds"])
def test_train_cityscapes_r101(tmp_path: Path, kind: str) -> None:
    """labelIds-only tree (pairs in both lists, as UniMatch ships them) and a tree with
    labelTrainIds (unlabeled list of image paths)."""
    data = tmp_path / "data"
    train_ids = kind == "labelTrainIds"
    make_cityscapes(data, train_ids=train_ids, splits={SPLIT: (4, kind)},
                    unlabeled_pairs=not train_ids)
    out = tmp_path / "work" / "run"
    run = run_entry(train_args("cityscapes-r101", data, out, "--split", SPLIT),
                    tmp_path / "work", [data])
    cfg = assert_train_outputs(run, out, dataset="cityscapes", num_classes=19, data_root=data)
    assert cfg["data.eval_size"] == 32


# --- studies -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("preset", "form"), [("voc-r101", "pair_class"),
                                              ("voc-r101-v3plus", "pair_aug")])
def test_voc_ablation_on_voc(tmp_path: Path, preset: str, form: str) -> None:
    data = tmp_path / "data"
    make_voc(data, splits={SPLIT: (4, form)})
    storage = tmp_path / "work" / "studies"
    run = run_entry(study_args("voc_ablation", data, storage, "--split", SPLIT,
                               "--variants", "supervised,ctt", preset=preset),
                    tmp_path / "work", [data])
    trials = assert_study_outputs(run, storage / "voc_ablation_smoke", n_trials=2,
                                  dataset="voc", num_classes=21, data_root=data, preset=preset)
    assert sorted(t["variant"] for t in trials) == ["ctt", "supervised"]


@pytest.mark.slow
def test_voc_sweep_on_voc(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_voc(data, splits={SPLIT: (4, "ids")})
    storage = tmp_path / "work" / "studies"
    run = run_entry(study_args("voc_sweep", data, storage, "--split", SPLIT, "--num-samples", "2",
                               preset="voc-r101"), tmp_path / "work", [data])
    study_dir = storage / "voc_sweep_smoke"
    trials = assert_study_outputs(run, study_dir, n_trials=2, dataset="voc", num_classes=21,
                                  data_root=data, preset="voc-r101")
    best = json.loads((study_dir / "study.json").read_text())["best"]
    assert best["trial_id"] in {t["trial_id"] for t in trials}
    assert "test" not in best  # no test split to re-evaluate on


@pytest.mark.slow
def test_voc_contrast_sweep_on_voc_forks_one_warmup(tmp_path: Path) -> None:
    """The contrast sweep (EMA decay fixed) on the VOC layout: one shared warm-up trained once
    from the user's data, both search trials forked from it, the root left untouched."""
    data = tmp_path / "data"
    make_voc(data, splits={SPLIT: (4, "pair_aug")})
    storage = tmp_path / "work" / "studies"
    run = run_entry(study_args("voc_contrast_sweep", data, storage, "--split", SPLIT,
                               "--num-samples", "2", preset="voc-r101"), tmp_path / "work", [data])
    study_dir = storage / "voc_contrast_sweep_smoke"
    assert_study_outputs(run, study_dir, n_trials=2, dataset="voc", num_classes=21,
                         data_root=data, preset="voc-r101")
    info = json.loads((study_dir / "study.json").read_text())
    assert info["warmup"]["shared"] is True
    assert (study_dir / "warmup" / "seed-0" / "state.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["labelIds", "labelTrainIds"])
def test_cityscapes_sweep(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    make_cityscapes(data, train_ids=kind == "labelTrainIds", splits={SPLIT: (4, kind)})
    storage = tmp_path / "work" / "studies"
    run = run_entry(study_args("cityscapes_sweep", data, storage, "--split", SPLIT,
                               "--num-samples", "1"), tmp_path / "work", [data])
    assert_study_outputs(run, storage / "cityscapes_sweep_smoke", n_trials=1,
                         dataset="cityscapes", num_classes=19, data_root=data,
                         preset="cityscapes-r101")


@pytest.mark.slow
def test_study_whose_trials_all_fail_exits_nonzero_naming_the_error(tmp_path: Path) -> None:
    """Every label PNG holds the value 40 (no class of 21): the trial fails on its first
    batch, and the study must not report success."""
    data = tmp_path / "data"
    make_voc(data, splits={SPLIT: (4, "pair_class")}, invalid_value=40)
    storage = tmp_path / "work" / "studies"
    run = run_entry(study_args("voc_ablation", data, storage, "--split", SPLIT,
                               "--variants", "supervised", preset="voc-r101"),
                    tmp_path / "work", [data])
    assert run.rc != 0, run.tail()
    assert "[40]" in run.stderr, run.tail()  # the reader's message: the bad values ...
    assert re.search(r"\d{4}_\d{6}\.png", run.stderr), run.tail()  # ... and the label file


# --- bad data roots: exit 2, one line, nothing touched --------------------------------------------

def _tree(kind: str, path: Path) -> None:
    if kind == "voc":
        make_voc(path, splits={SPLIT: (4, "pair_class")})
    elif kind == "cityscapes":
        make_cityscapes(path, splits={SPLIT: (4, "labelIds")})
    elif kind == "half":
        make_half_prepared(path, n_labeled=4)
    elif kind == "empty":
        path.mkdir()
    else:
        assert kind == "missing"


BAD_ROOTS = [
    # (entry point, preset, what the root holds). Both entry points where a past bug lived
    # (a missing root; a half-prepared root deleted and regenerated); one each elsewhere, as
    # every subprocess costs 5-15 s of interpreter and torch start-up.
    ("train", "voc-r101", "missing"),
    ("voc_ablation", "voc-r101", "missing"),
    ("cityscapes_sweep", "cityscapes-r101", "voc"),
    ("train", "voc-r101", "cityscapes"),
    ("voc_ablation", "tiny", "half"),
    ("train", "tiny", "half"),
    ("train", "voc-r101", "half"),
    ("voc_ablation", "voc-r101", "half"),
    ("train", "tiny", "empty"),
]


@pytest.mark.parametrize(("entry", "preset", "holds"), BAD_ROOTS,
                         ids=[f"{h}-{p}-{e}" for e, p, h in BAD_ROOTS])
def test_bad_data_root_exits_2_and_is_left_alone(tmp_path: Path, entry: str, preset: str,
                                                 holds: str) -> None:
    data = tmp_path / "data"
    _tree(holds, data)
    work = tmp_path / "work"
    out = work / "run"
    if entry == "train":
        args = train_args(preset, data, out, "--split", SPLIT)
    elif entry == "cityscapes_sweep":  # its default preset is cityscapes-r101
        args = study_args(entry, data, work / "studies", "--split", SPLIT, "--num-samples", "1")
    else:
        args = study_args(entry, data, work / "studies", "--split", SPLIT, "--variants",
                          "supervised,ctt", preset=preset)
    run = run_entry(args, work, [data], timeout=FAIL_TIMEOUT_S)
    line = assert_user_error(run, data)
    if holds == "missing":
        assert not data.exists()
    rest = line.replace(str(data), "<root>")
    if holds == "voc":  # the layout found, and what reads it
        assert re.search(r"voc-r101|data\.dataset=voc", rest), line
    if holds == "cityscapes":
        assert re.search(r"cityscapes-r101|data\.dataset=cityscapes", rest), line
    if entry == "train":  # refused before anything is written
        assert not out.exists(), sorted(p.name for p in out.iterdir())
