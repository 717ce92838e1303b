"""Bad inputs and faults at every entry point: one ``error:`` line, exit code 2, no traceback,
and nothing that existed before is changed.

Each case runs in a directory of its own (a small VOC-layout data root and whatever study or
run files the case needs). The table row gives the entry point, its arguments (``{d}`` is the
case directory), the fault to plant and a regex the error line must match. The checks:

- exit code (2 unless the row says otherwise);
- stderr holds exactly one non-empty line, ``error: ...`` matching the row's regex (rows marked
  ``argparse`` allow argparse's usage lines above its ``<prog>: error: ...`` line);
- no ``Traceback`` anywhere in stdout or stderr;
- the sha256 of every file (and the set of directories) under the case directory is the same
  before and after, so nothing was modified, deleted or created: a run refused before its
  first checkpoint (a data file found bad once training started, rows marked ``trains``)
  leaves no --out behind that would block the corrected command; rows list the few paths a
  case may leave (a released lock file).

Most rows call the entry points' ``main(argv)`` in this process (each is wrapped by
``ctt.errors.guarded``, which is what turns an error into the line and the 2); the ``slow``
subprocess rows run the real commands (``python -m ...``, ``python studies/...``), including
``--debug``, which must show the traceback.

Rows for directory locks, ``--resume`` mistakes and interrupts belong in the same table
(section "runs and studies owning their directories").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark
from helpers import REPO_ROOT, load_script
from real_layouts import flat_label, hash_tree, make_flat_voc, voc_pair, write_label_png

SIZE = 16  # px; every image and label of the fixture data
IDS = [f"2007_{i:06d}" for i in range(6)]

# ctt.train on the VOC fixture: the voc-r101 preset shrunk to a tiny network, one iteration
TRAIN = ["--preset", "voc-r101", "--data-root", "{d}/voc", "--split", "2", "--iters", "1",
         "--out", "{d}/out", "--device", "cpu", "--set", "model.arch=tiny", "--set",
         "model.width=4", "--set", "model.feat_dim=8", "--set", f"data.crop_size={SIZE}",
         "--set", "data.batch_size=2", "--set", "data.batch_size_u=2", "--set",
         "method.bank_size=4"]
TINY = ["--preset", "tiny", "--out", "{d}/out"]
# a study of the voc-r101 preset on the VOC fixture (checks pass; it would then start Ray)
VOC_STUDY = ["--preset", "voc-r101", "--data-root", "{d}/voc", "--split", "2", "--storage",
             "{d}/s"]


# --- fixture data -------------------------------------------------------------------------------

def make_case_voc(root: Path) -> Path:
    """A 6-image VOC 2012 layout (real_layouts.make_flat_voc): splits/2 (2 labeled after a
    comment line, 4 unlabeled) and val (2 images); no train.txt."""
    return make_flat_voc(root, IDS, size=(SIZE, SIZE), val_ids=IDS[4:],
                         labeled=f"# two labels\n{voc_pair(IDS[0])}\n{voc_pair(IDS[1])}\n",
                         unlabeled=IDS[:4], train_list=False)


def voc(d: Path) -> Path:
    return d / "voc"


# faults planted in the VOC fixture (line numbers: labeled.txt has a comment on line 1)
def missing_image(d: Path) -> None:
    (voc(d) / "JPEGImages" / f"{IDS[1]}.jpg").unlink()


def missing_label(d: Path) -> None:
    (voc(d) / "SegmentationClass" / f"{IDS[0]}.png").unlink()


def label_value_ge_c(d: Path) -> None:
    bad = flat_label(0, (SIZE, SIZE))
    bad[5, 5] = 30
    write_label_png(voc(d) / "SegmentationClass" / f"{IDS[1]}.png", bad)


def rgb_label(d: Path) -> None:
    write_label_png(voc(d) / "SegmentationClass" / f"{IDS[0]}.png", flat_label(0, (SIZE, SIZE)),
                    mode="RGB")


def size_mismatch(d: Path) -> None:
    write_label_png(voc(d) / "SegmentationClass" / f"{IDS[1]}.png",
                    flat_label(1, (SIZE, SIZE + 4)))


def empty_split(d: Path) -> None:
    (voc(d) / "splits" / "2" / "labeled.txt").write_text("# nothing labeled yet\n\n")


def truncated_jpeg(d: Path) -> None:
    path = voc(d) / "JPEGImages" / f"{IDS[1]}.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage_image(d: Path) -> None:
    (voc(d) / "JPEGImages" / f"{IDS[0]}.jpg").write_bytes(b"this is not a JPEG file\n" * 8)


def latin1_split(d: Path) -> None:
    text = f"# étiquettes\n{voc_pair(IDS[0])}\n{voc_pair(IDS[1])}\n"
    (voc(d) / "splits" / "2" / "labeled.txt").write_bytes(text.encode("latin-1"))


def three_token_line(d: Path) -> None:
    with (voc(d) / "splits" / "2" / "labeled.txt").open("a") as f:
        f.write(f"{voc_pair(IDS[2])} extra\n")


def repeated_split_item(d: Path) -> None:
    with (voc(d) / "splits" / "2" / "labeled.txt").open("a") as f:
        f.write(f"{voc_pair(IDS[0])}\n")


def bad_val_label(d: Path) -> None:
    bad = flat_label(4, (SIZE, SIZE))
    bad[2, 2] = 99
    write_label_png(voc(d) / "SegmentationClass" / f"{IDS[4]}.png", bad)


def data_root_is_file(d: Path) -> None:
    (d / "afile").write_text("not a directory\n")


def foreign_dir(d: Path) -> None:
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("my own files\n")


def synthetic_root(d: Path) -> None:
    from ctt.data import synthetic

    synthetic.generate(d / "syn", num_train=4, num_val=2, num_test=2, size=16,
                       label_counts=(2,))


# --- study result files -------------------------------------------------------------------------

def study(d: Path, *, study_json: bytes | None = b'{"name": "s", "kind": "ablation"}',
          trial_json: bytes | None = None, metrics: bytes | None = None) -> None:
    t = d / "st" / "trials" / "t0"
    t.mkdir(parents=True)
    if study_json is not None:
        (d / "st" / "study.json").write_bytes(study_json)
    (t / "trial.json").write_bytes(trial_json if trial_json is not None else (
        b'{"trial_id": "t0", "variant": "ctt", "seed": 0, "status": "TERMINATED", '
        b'"config": {"optim.iters": 4}}'))
    (t / "metrics.jsonl").write_bytes(metrics if metrics is not None else (
        b'{"step": 2, "miou": 10.0}\n{"step": 4, "miou": 12.0}\n'))


def out_with_notes(d: Path) -> None:
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("my notes\n")


def out_not_a_run(d: Path) -> None:
    """A directory with a run's folder names but no run: the user's own checkpoint and notes."""
    (d / "out" / "checkpoints").mkdir(parents=True)
    (d / "out" / "checkpoints" / "model.pth").write_bytes(b"weights")
    (d / "out" / "tb").mkdir()
    (d / "out" / "tb" / "README").write_text("my runs\n")


def run_with_user_checkpoint(d: Path) -> None:
    """A run's directory (config.json, an event file, a step checkpoint) where the user also
    keeps a checkpoint of their own inside checkpoints/."""
    out = d / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "tb").mkdir()
    (out / "config.json").write_text("{}")
    (out / "tb" / "events.out.tfevents.1.host.from000000000").write_bytes(b"e")
    (out / "checkpoints" / "step_00000001.pt").write_bytes(b"c")
    (out / "checkpoints" / "best_by_hand.pth").write_bytes(b"mine")


def run_with_checkpoint(d: Path, data: bytes | None = None) -> None:
    """A run's directory whose only checkpoint is ``data`` (default: a checkpoint that pickles a
    class, which torch's weights_only loader refuses)."""
    import io

    import torch

    from ctt.state import CHECKPOINT_FORMAT

    (d / "out" / "checkpoints").mkdir(parents=True)
    (d / "out" / "config.json").write_text("{}")
    if data is None:
        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "payload": Case}, buf)
        data = buf.getvalue()
    (d / "out" / "checkpoints" / "step_00000001.pt").write_bytes(data)


def old_study(directory: Path, **fields) -> None:
    """The study.json of an earlier ablation in ``directory``."""
    directory.mkdir(parents=True)
    (directory / "study.json").write_text(json.dumps({"kind": "ablation", **fields}))


_HELD: list = []  # DirLocks held by a row's setup (released after each test)


def hold_lock(directory: Path, name: str) -> None:
    """Another holder of the directory: flock is per open file, so a second open in this
    process conflicts like another process would."""
    from ctt.rundir import DirLock

    lock = DirLock(directory, name, "run")
    lock.acquire()
    _HELD.append(lock)


def read_only(path: Path) -> None:
    path.chmod(0o555)


# --- the table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One bad input: entry point, argv (``{d}`` = case dir), fault, expected error line."""

    id: str
    entry: str
    argv: list[str]
    pattern: str
    setup: Callable[[Path], None] | None = None
    code: int = 2
    argparse: bool = False
    may_create: tuple[str, ...] = ()
    trains: bool = False  # the fault shows once training has started (a file read then)
    no_cuda: bool = False
    before_ray: bool = False  # a study that must fail without starting Ray
    marks: tuple = field(default=())


def C(*args, **kwargs) -> pytest.param:  # noqa: N802 - a table row
    case = Case(*args, **kwargs)
    return pytest.param(case, id=case.id, marks=case.marks)


LOCK = ("out/.run.lock",)  # a resume refused under the lock leaves its (released) lock file
CASES = [
    # --- ctt.train: configuration ----------------------------------------------------------
    C("train-unknown-key", "train", [*TINY, "--set", "method.lamda_h=0.1"],
      r"unknown config key 'method.lamda_h': did you mean 'method.lambda_h'"),
    C("train-key-in-wrong-section", "train", [*TINY, "--set", "method.lr=0.1"],
      r"unknown config key 'method.lr': did you mean 'optim.lr'\?"),
    C("train-wrong-type", "train", [*TINY, "--set", "optim.lr=fast"],
      r"optim.lr: expected a number, got 'fast'"),
    C("train-out-of-range", "train", [*TINY, "--set", "optim.lr=-1"],
      r"optim.lr: value -1.0 out of range; valid range \(0, inf\]"),
    C("train-set-without-equals", "train", [*TINY, "--set", "optim.lr"],
      r"--set expects key=value, got 'optim.lr'"),
    C("train-unknown-variant", "train", [*TINY, "--variant", "cttt"],
      r"unknown variant 'cttt'; valid variants: supervised, .*ctt"),
    C("train-unknown-preset", "train", ["--preset", "tinyy"], r"invalid choice: 'tinyy'",
      argparse=True),
    C("train-cross-with-one-pair", "train", [*TINY, "--set", "method.pairs=1"],
      r"method.unsup='cross' needs method.pairs=2"),
    C("train-lambda-l-on-one-pair", "train",
      [*TINY, "--variant", "mean_teacher", "--set", "method.lambda_l=0.5"],
      r"method.lambda_l=0.5 cannot act with method.pairs=1 \(variant mean_teacher\)"),
    C("train-contrast-on-supervised", "train",
      [*TINY, "--variant", "supervised", "--set", "method.lambda_h=0.1"],
      r"method.lambda_h=0.1 cannot act with method.unsup='none' \(variant supervised\)"),
    C("train-iters-inside-warmup", "train", [*TINY, "--variant", "ctt", "--iters", "6"],
      r"optim.iters=6 <= method.warmup_iters=200 \(variant ctt\): .*raise optim.iters"),
    C("train-min-fill-above-bank", "train", [*TINY, "--set", "method.bank_size=8"],
      r"method.bank_min_fill=16 exceeds method.bank_size=8"),
    C("train-scale-min-above-max", "train",
      [*TINY, "--set", "data.scale_min=2", "--set", "data.scale_max=1.5"],
      r"data.scale_min \(2.0\) must be <= data.scale_max"),
    C("train-iters-zero", "train", [*TINY, "--iters", "0"],
      r"optim.iters: value 0 out of range"),
    C("train-cuda-without-device", "train", [*TINY, "--iters", "500", "--device", "cuda"],
      r"run.device='cuda' but torch sees no CUDA device.*--device cpu", no_cuda=True),
    # --- ctt.train: data roots ------------------------------------------------------------
    C("train-root-missing", "train", [*TRAIN[:2], "--data-root", "{d}/nowhere", *TRAIN[4:]],
      r"data root .*nowhere does not exist; pass --data-root"),
    C("train-root-is-file", "train", [*TRAIN[:2], "--data-root", "{d}/afile", *TRAIN[4:]],
      r"data root .*afile is not a directory", setup=data_root_is_file),
    C("train-root-foreign-layout", "train",
      [*TRAIN[:2], "--data-root", "{d}/mine", *TRAIN[4:]],
      r"data root .*mine is not a Pascal VOC 2012 root.*found: notes.txt", setup=foreign_dir),
    C("train-root-of-other-dataset", "train",
      [*TRAIN[:2], "--data-root", "{d}/syn", *TRAIN[4:]],
      r"data root .*syn is not a Pascal VOC.*holds a synthetic dataset; use --preset tiny",
      setup=synthetic_root),
    C("train-cityscapes-without-root", "train", ["--preset", "cityscapes-r101", "--out",
                                                 "{d}/out"],
      r"data.dataset='cityscapes' needs its dataset: pass --data-root"),
    # --- ctt.train: data files (the split line is named where there is one) --------------
    C("train-missing-split", "train", [*TRAIN[:4], "--split", "9", *TRAIN[6:]],
      r"split 'splits/9/labeled' not found under root .*voc' \(tried .* and \d+ more\)",
      trains=True),
    C("train-missing-image", "train", TRAIN,
      rf"missing file .*JPEGImages/{IDS[1]}.jpg \(listed in .*labeled.txt, line 3\)",
      setup=missing_image, trains=True),
    C("train-missing-label", "train", TRAIN,
      rf"missing file .*SegmentationClass/{IDS[0]}.png \(listed in .*labeled.txt, line 2\)",
      setup=missing_label, trains=True),
    C("train-label-value-ge-c", "train", TRAIN,
      rf"label file .*{IDS[1]}.png \(listed in .*labeled.txt, line 3\) has values \[30\] "
      r"outside \[0, 21\)", setup=label_value_ge_c, trains=True),
    C("train-label-value-ge-c-in-worker", "train", [*TRAIN, "--set", "data.num_workers=1"],
      rf"^error: label file .*{IDS[1]}.png \(listed in .*labeled.txt, line 3\) has values "
      r"\[30\]", setup=label_value_ge_c, trains=True),
    C("train-rgb-label", "train", TRAIN,
      rf"label file .*{IDS[0]}.png \(listed in .*labeled.txt, line 2\) has image mode 'RGB'",
      setup=rgb_label, trains=True),
    C("train-size-mismatch", "train", TRAIN,
      rf"size mismatch: image .*{IDS[1]}.jpg is \(16, 16\).*label .*{IDS[1]}.png is "
      r"\(16, 20\) \(listed in .*line 3\)", setup=size_mismatch, trains=True),
    C("train-empty-split", "train", TRAIN,
      r"split file .*labeled.txt lists no items", setup=empty_split, trains=True),
    C("train-truncated-jpeg", "train", TRAIN,
      rf"cannot read image .*{IDS[1]}.jpg \(listed in .*labeled.txt, line 3\): "
      r"truncated file \(", setup=truncated_jpeg, trains=True),
    C("train-not-an-image", "train", TRAIN,
      rf"cannot read image .*{IDS[0]}.jpg \(listed in .*labeled.txt, line 2\): cannot "
      r"identify image file", setup=garbage_image, trains=True),
    C("train-latin1-split", "train", TRAIN,
      r"split file .*labeled.txt, line 1 is not UTF-8 text \(byte 0xe9\)",
      setup=latin1_split, trains=True),
    C("train-three-token-split-line", "train", TRAIN,
      r"split file .*labeled.txt, line 4: expected 'image_path label_path' or an id",
      setup=three_token_line, trains=True),
    C("train-split-lists-an-item-twice", "train", TRAIN,
      rf"split file .*labeled.txt, line 4 lists JPEGImages/{IDS[0]}.jpg again \(first on line "
      r"2\): list each item once", setup=repeated_split_item, trains=True),
    C("train-bad-val-label", "train", TRAIN,
      rf"label file .*{IDS[4]}.png \(listed in .*val.txt, line 1\) has values \[99\]",
      setup=bad_val_label, trains=True),
    # --- studies (checked before Ray starts) ------------------------------------------------
    C("ablation-key-in-wrong-section", "voc_ablation",
      ["--set", "method.lr=0.1", "--storage", "{d}/s"],
      r"unknown config key 'method.lr': did you mean 'optim.lr'\?", before_ray=True),
    C("ablation-iters-inside-warmup", "voc_ablation", ["--iters", "6", "--storage", "{d}/s"],
      r"optim.iters=6 <= method.warmup_iters=200 \(variant mean_teacher\)", before_ray=True),
    C("ablation-dry-run-iters-inside-warmup", "voc_ablation",
      ["--variants", "supervised,ctt", "--iters", "150", "--dry-run", "--storage", "{d}/s"],
      r"optim.iters=150 <= method.warmup_iters=200 \(variant ctt\)", before_ray=True),
    C("sweep-iters-inside-warmup", "voc_sweep", ["--iters", "100", "--storage", "{d}/s"],
      r"optim.iters=100 <= method.warmup_iters=200 \(variant ctt\)", before_ray=True),
    C("ablation-rare-checkpoints", "voc_ablation",
      ["--set", "run.checkpoint_every=300", "--storage", "{d}/s"],
      r"run.checkpoint_every=300 is not a multiple of run.eval_every=200: a study trial saves "
      r"a checkpoint only when it reports an evaluation", before_ray=True),
    C("ablation-unknown-variant", "voc_ablation", ["--variants", "ctt,cttt"],
      r"unknown variants \['cttt'\]", argparse=True, before_ray=True),
    # --- study flags: refused before anything runs instead of a silently wrong study ------
    C("ablation-seed-twice", "voc_ablation", [*VOC_STUDY, "--seeds", "0,0"],
      r"argument --seeds: seed 0 listed twice in '0,0': each seed is one paired sample",
      argparse=True, before_ray=True),
    C("ablation-seeds-not-integers", "voc_ablation", [*VOC_STUDY, "--seeds", "0,one"],
      r"argument --seeds: '0,one' is not a comma-separated list of integers", argparse=True,
      before_ray=True),
    C("ablation-no-seed", "voc_ablation", [*VOC_STUDY, "--seeds", ""],
      r"argument --seeds: no seed given", argparse=True, before_ray=True),
    C("ablation-variant-twice", "voc_ablation", [*VOC_STUDY, "--variants", "supervised,ctt,ctt"],
      r"--variants: ctt listed twice; list each once", before_ray=True),
    C("ablation-no-variant", "voc_ablation", [*VOC_STUDY, "--variants", ","],
      r"--variants ',' names nothing: pass at least one", before_ray=True),
    C("ablation-zero-cpus-per-trial", "voc_ablation", [*VOC_STUDY, "--cpus-per-trial", "0"],
      r"argument --cpus-per-trial: '0' is not a number > 0", argparse=True, before_ray=True),
    C("ablation-negative-gpus-per-trial", "voc_ablation", [*VOC_STUDY, "--gpus-per-trial=-1"],
      r"argument --gpus-per-trial: '-1' is not a number >= 0", argparse=True, before_ray=True),
    C("ablation-negative-max-concurrent", "voc_ablation", [*VOC_STUDY, "--max-concurrent=-1"],
      r"argument --max-concurrent: must be >= 0, got -1", argparse=True, before_ray=True),
    C("ablation-negative-max-failures", "voc_ablation", [*VOC_STUDY, "--max-failures=-2"],
      r"argument --max-failures: must be >= 0, got -2", argparse=True, before_ray=True),
    C("ablation-zero-iters", "voc_ablation", [*VOC_STUDY, "--iters", "0"],
      r"argument --iters: must be >= 1, got 0", argparse=True, before_ray=True),
    # questions, --adaptive and --budget: one line before Ray starts
    C("ablation-zero-budget", "voc_ablation", [*VOC_STUDY, "--budget", "0"],
      r"argument --budget: '0' is not a number > 0", argparse=True, before_ray=True),
    C("ablation-negative-budget", "voc_ablation", [*VOC_STUDY, "--budget=-2"],
      r"argument --budget: '-2' is not a number > 0", argparse=True, before_ray=True),
    C("ablation-zero-delta", "voc_ablation", [*VOC_STUDY, "--delta", "0"],
      r"argument --delta: '0' is not a number > 0", argparse=True, before_ray=True),
    C("ablation-unknown-question-variant", "voc_ablation",
      [*VOC_STUDY, "--variants", "supervised,ctt", "--questions", "ctt/cross"],
      r"--questions 'ctt/cross': question ctt/cross: unknown variant\(s\) cross; known: ctt, "
      r"supervised", before_ray=True),
    C("ablation-question-not-a-pair", "voc_ablation", [*VOC_STUDY, "--questions", "ctt-cross"],
      r"--questions 'ctt-cross': question 'ctt-cross': expected 'a/b' \(estimate a - b\)",
      before_ray=True),
    C("ablation-question-asked-twice", "voc_ablation",
      [*VOC_STUDY, "--questions", "ctt/cross,cross/ctt"],
      r"question cross/ctt asked twice \(a/b and b/a are one question\)", before_ray=True),
    C("ablation-adaptive-one-seed", "voc_ablation", [*VOC_STUDY, "--adaptive", "--seeds", "0"],
      r"--adaptive needs at least 2 initial seeds \(a paired interval needs 2\), got --seeds 0",
      before_ray=True),
    C("ablation-adaptive-without-questions", "voc_ablation",
      [*VOC_STUDY, "--adaptive", "--variants", "supervised,mean_teacher"],
      r"--adaptive adds seeds where a question is open, but this study asks none of the "
      r"variants that run: pass --questions a/b", before_ray=True),
    C("ablation-max-seeds-below-seeds", "voc_ablation",
      [*VOC_STUDY, "--adaptive", "--seeds", "0,1,2", "--max-seeds", "2"],
      r"--max-seeds 2 is below the 3 initial seeds: pass at least as many", before_ray=True),
    C("ablation-gpu-trials-on-a-machine-without-one", "voc_ablation",
      [*VOC_STUDY, "--gpus-per-trial", "1"],
      r"--gpus-per-trial 1: this machine has 0 GPU\(s\) and the study runs on it \(no "
      r"--address\), so no trial could ever start", no_cuda=True, before_ray=True),
    C("sweep-more-cpus-per-trial-than-cores", "voc_sweep", [*VOC_STUDY, "--cpus-per-trial", "512"],
      r"--cpus-per-trial 512: this machine has \d+ cores, so no trial could ever start",
      before_ray=True),
    # storage and cluster addresses checked before the study directory or Ray
    C("ablation-storage-is-a-file", "voc_ablation", [*VOC_STUDY[:-1], "{d}/afile"],
      r"cannot write .*afile/voc_ablation \(--storage\): .*afile is not a writable directory",
      setup=lambda d: (d / "afile").write_text("x\n"), before_ray=True),
    C("ablation-storage-uri-without-bucket", "voc_ablation", ["--storage", "s3://"],
      r"--storage 's3://' names no bucket: pass s3://BUCKET/prefix", before_ray=True),
    C("sweep-storage-uri-with-a-space", "voc_sweep", ["--storage", "s3://my bucket/studies"],
      r"--storage 's3://my bucket/studies' contains white space", before_ray=True),
    C("ablation-address-where-nothing-listens", "voc_ablation",
      [*VOC_STUDY, "--address", "127.0.0.1:1"],
      r"--address 127.0.0.1:1: no Ray head answers there within 10 s \(Connection refused\); "
      r"start the cluster", before_ray=True),
    C("ablation-address-not-host-port", "voc_ablation", [*VOC_STUDY, "--address", "headnode"],
      r"--address 'headnode' is not HOST:PORT \(or auto\)", before_ray=True),
    # credentials never on a command line (ps and ray job list show it); never echoed back
    C("sweep-password-in-optuna-storage", "voc_sweep",
      [*VOC_STUDY, "--optuna-storage", "postgresql://ctt:hunter2@127.0.0.1:5432/optuna"],
      r"^(?!.*hunter2).*--optuna-storage 'postgresql://ctt:\*\*\*@127.0.0.1:5432/optuna' "
      r"carries a password, .*PGPASSWORD or ~/.pgpass", before_ray=True),
    C("ablation-secret-in-storage-uri", "voc_ablation",
      ["--storage", "s3://bucket/studies?access_key=AKIDEXAMPLE&secret_key=hunter2"],
      r"^(?!.*hunter2).*--storage carries a credential \(access_key, secret_key\) in its "
      r"query string, .*AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", before_ray=True),
    C("sweep-several-seeds", "voc_sweep", [*VOC_STUDY, "--seeds", "0,1,2"],
      r"--seeds 0,1,2: a sweep searches at one seed; pass one, and --confirm-seeds S",
      before_ray=True),
    C("contrast-sweep-several-seeds", "voc_contrast_sweep", [*VOC_STUDY, "--seeds", "3,4"],
      r"--seeds 3,4: a sweep searches at one seed", before_ray=True),
    C("cityscapes-sweep-several-seeds", "cityscapes_sweep", ["--seeds", "0,1", "--storage",
                                                             "{d}/s"],
      r"--seeds 0,1: a sweep searches at one seed", before_ray=True),
    C("contrast-sweep-no-samples", "voc_contrast_sweep", [*VOC_STUDY, "--num-samples", "0"],
      r"argument --num-samples: must be >= 1, got 0", argparse=True, before_ray=True),
    C("ablation-negative-progress-every", "voc_ablation", [*VOC_STUDY, "--progress-every=-5"],
      r"argument --progress-every: '-5' is not a number of seconds >= 0", argparse=True,
      before_ray=True),
    C("ablation-dry-run-seed-twice", "voc_ablation", [*VOC_STUDY, "--dry-run", "--seeds", "1,1"],
      r"argument --seeds: seed 1 listed twice", argparse=True, before_ray=True),
    C("sweep-negative-num-samples", "voc_sweep", [*VOC_STUDY, "--num-samples=-4"],
      r"argument --num-samples: must be >= 1, got -4", argparse=True, before_ray=True),
    C("sweep-no-samples", "voc_sweep", [*VOC_STUDY, "--num-samples", "0", "--dry-run"],
      r"argument --num-samples: must be >= 1, got 0", argparse=True, before_ray=True),
    C("sweep-negative-confirm-top", "voc_sweep", [*VOC_STUDY, "--confirm-top=-1"],
      r"argument --confirm-top: must be >= 0, got -1", argparse=True, before_ray=True),
    C("sweep-negative-confirm-seeds", "voc_sweep", [*VOC_STUDY, "--confirm-seeds=-3"],
      r"argument --confirm-seeds: must be >= 0, got -3", argparse=True, before_ray=True),
    C("sweep-negative-grace-period", "voc_sweep", [*VOC_STUDY, "--grace-period=-100"],
      r"argument --grace-period: must be >= 0, got -100", argparse=True, before_ray=True),
    C("ablation-dry-run-missing-data-root", "voc_ablation",
      ["--preset", "voc-r101", "--data-root", "{d}/nowhere", "--split", "1464", "--dry-run"],
      r"data root .*nowhere does not exist", before_ray=True),
    C("sweep-dry-run-missing-data-root", "voc_sweep",
      ["--preset", "voc-r101", "--data-root", "{d}/nowhere", "--dry-run"],
      r"data root .*nowhere does not exist", before_ray=True),
    C("ablation-missing-data-root", "voc_ablation",
      ["--preset", "voc-r101", "--data-root", "{d}/nowhere", "--storage", "{d}/s"],
      r"data root .*nowhere does not exist", before_ray=True),
    C("sweep-unknown-key", "voc_sweep", ["--set", "optim.lambda_h=0.1", "--storage", "{d}/s"],
      r"unknown config key 'optim.lambda_h': did you mean 'method.lambda_h'\?",
      before_ray=True),
    C("sweep-supervised-has-nothing-to-sample", "voc_sweep",
      ["--variant", "supervised", "--storage", "{d}/s"],
      r"variant 'supervised' fixes or ignores every swept parameter", before_ray=True),
    C("contrast-sweep-supervised-has-nothing-to-sample", "voc_contrast_sweep",
      ["--variant", "supervised", "--no-fork", "--storage", "{d}/s"],
      r"variant 'supervised' fixes or ignores every swept parameter", before_ray=True),
    C("cityscapes-sweep-without-root", "cityscapes_sweep", ["--storage", "{d}/s"],
      r"data.dataset='cityscapes' needs its dataset: pass --data-root", before_ray=True),
    # --- ctt.tune.results -----------------------------------------------------------------
    C("results-missing-dir", "results", ["{d}/nope"],
      r"study directory .*nope does not exist: pass the directory of a study"),
    C("results-of-a-single-run", "results", ["{d}/run"],
      r"run is a single ctt.train run, not a study \(no study.json\): its metrics are its "
      r"metrics.jsonl and tb/", setup=lambda d: (d / "run").mkdir() or (
          d / "run" / "config.json").write_text("{}") or (
          d / "run" / "metrics.jsonl").write_text('{"step": 1, "miou": 3.0}\n')),
    C("results-of-a-directory-without-study", "results", ["{d}/voc"],
      r"voc holds no study \(no study.json\): pass the directory of a study"),
    C("results-corrupt-study-json", "results", ["{d}/st"],
      r"st/study.json is not valid JSON \(Expecting value at line 1, column 23\)",
      setup=lambda d: study(d, study_json=b'{"name": "s", "kind": ')),
    C("results-study-json-not-object", "results", ["{d}/st"],
      r"st/study.json holds a JSON list, not an object",
      setup=lambda d: study(d, study_json=b"[1, 2]")),
    C("results-step-not-integer", "results", ["{d}/st"],
      r"t0/metrics.jsonl, line 2: 'step' must be an integer, got 'x'",
      setup=lambda d: study(d, metrics=b'{"step": 2, "miou": 1}\n{"step": "x", "miou": 2}\n')),
    C("results-corrupt-metrics-line", "results", ["{d}/st"],
      r"t0/metrics.jsonl, line 1 is not valid JSON",
      setup=lambda d: study(d, metrics=b'{"step": 2, "mi\n{"step": 4, "miou": 2}\n')),
    C("results-latin1-metrics", "results", ["{d}/st"],
      r"t0/metrics.jsonl is not UTF-8 text",
      setup=lambda d: study(d, metrics='{"step": 2, "note": "é"}\n'.encode("latin-1"))),
    C("results-corrupt-trial-json", "results", ["{d}/st"],
      r"t0/trial.json is not valid JSON",
      setup=lambda d: study(d, trial_json=b'{"trial_id": "t0", ')),
    C("results-trial-config-not-object", "results", ["{d}/st"],
      r"t0/trial.json: 'config' must be a JSON object",
      setup=lambda d: study(d, trial_json=b'{"trial_id": "t0", "config": [1]}')),
    C("results-trial-seed-not-integer", "results", ["{d}/st"],
      r"t0/trial.json: 'seed' must be an integer, got 'zero'",
      setup=lambda d: study(d, trial_json=b'{"trial_id": "t0", "seed": "zero", "config": {}}')),
    # --- ctt.data.synthetic ---------------------------------------------------------------
    C("synthetic-size-too-small", "synthetic", ["--root", "{d}/syn", "--size", "8"],
      r"size must be an int >= 16 pixels, got 8"),
    C("synthetic-root-is-a-file", "synthetic", ["--root", "{d}/notes.txt"],
      r"cannot generate into .*notes.txt: it is a file, not a directory; choose another --root",
      setup=lambda d: (d / "notes.txt").write_text("mine\n")),
    C("synthetic-into-foreign-dir", "synthetic", ["--root", "{d}/mine"],
      r"refusing to generate into .*mine: it is not empty and holds no synthetic dataset",
      setup=foreign_dir),
    C("synthetic-other-params", "synthetic",
      ["--root", "{d}/syn", "--num-train", "4", "--num-val", "2", "--num-test", "2", "--size",
       "16", "--label-counts", "2", "--seed", "3"],
      r"syn", setup=synthetic_root),
    C("synthetic-bad-label-counts", "synthetic", ["--root", "{d}/syn", "--label-counts", "a,b"],
      r"--label-counts must be comma-separated ints", argparse=True),
    # --- benchmarks -----------------------------------------------------------------------
    C("bench-unknown-variant", "bench_step", ["--variant", "cttt"], r"invalid choice: 'cttt'",
      argparse=True),
    C("bench-zero-iters", "bench_step", ["--iters", "0"], r"--iters: must be >= 1, got 0",
      argparse=True),
    C("bench-cuda-without-device", "bench_step", ["--device", "cuda", "--json", "{d}/b.json"],
      r"run.device='cuda' but no CUDA device is available: use --device cpu", no_cuda=True),
    C("bench-unwritable-json", "bench_step", ["--json", "{d}/afile/step.json"],
      r"cannot write .*afile/step.json \(--json\)", setup=data_root_is_file),
    C("tune-bench-unknown-key", "bench_study", ["--set", "method.lr=0.1", "--json", "{d}/t.json"],
      r"unknown config key 'method.lr': did you mean 'optim.lr'\?", before_ray=True),
    C("tune-bench-unknown-scheduler", "bench_study",
      ["--what", "pruning", "--schedulers", "asha,hyperband9", "--json", "{d}/t.json"],
      r"unknown scheduler\(s\) hyperband9 \(--schedulers\)", before_ray=True),
    C("bench-contrast-unknown-device", "bench_contrast", ["--device", "tpu9"],
      r"unknown device 'tpu9' \(--device\)"),
    C("bench-contrast-cuda-without-device", "bench_contrast",
      ["--device", "cuda", "--out", "{d}/c.json"],
      r"--device cuda but no CUDA device is available", no_cuda=True),
    C("gpu-bench-unknown-preset", "gpu_bench", ["--smoke", "--preset", "r9", "--out", "{d}/g"],
      r"unknown preset 'r9'; valid presets"),
    C("gpu-bench-unwritable-out", "gpu_bench", ["--smoke", "--out", "{d}/afile/g"],
      r"cannot write .*afile/g \(--out\)", setup=data_root_is_file),
    C("record-curves-unknown-key", "record_curves",
      ["--set", "method.lamda_h=1", "--out", "{d}/c.json"],
      r"unknown config key 'method.lamda_h': did you mean 'method.lambda_h'"),
    C("kernel-spread-unknown-isa", "kernel_spread", ["--isa", "MMX", "--out", "{d}/k.json"],
      r"unknown --isa 'MMX': oneDNN knows SSE41, AVX"),
    C("replay-pruning-missing-curves", "replay_pruning",
      ["--curves", "{d}/none.json", "--quick", "--out", "{d}/r.json", "--plot", "{d}/p.png"],
      r"--curves .*none.json: no such file; record the curves first"),
    C("live-pruning-unknown-family", "live_pruning",
      ["--point", "optuna-mean:grace_period=200", "--out", "{d}/l.json"],
      r"--point 'optuna-mean:grace_period=200': unknown scheduler family 'optuna-mean'"),
    C("live-pruning-seed-not-recorded", "live_pruning",
      ["--seed", "7", "--replay", "{d}/none.json", "--out", "{d}/l.json"],
      r"--seed 7: .*curves_tiny.json has complete curves for seeds \[0, 1, 2\] only"),
    C("replay-pruning-corrupt-curves", "replay_pruning",
      ["--curves", "{d}/c.json", "--quick", "--out", "{d}/r.json", "--plot", "{d}/p.png"],
      r"--curves .*c.json: not a record_curves.py curves file \(JSONDecodeError",
      setup=lambda d: (d / "c.json").write_text('{"runs": [')),
    C("study-floor-unfinished-study", "study_floor", ["{d}/st", "--json", "{d}/f.json"],
      r".*st holds no finished study \(trials.parquet and study.json\)", setup=study),
    # --- runs and studies owning their directories (locks, --resume) ----------------------
    # (interrupts: tests/scenarios/test_interrupted_runs.py; --resume --iters below the
    # checkpoint and a stale lock: tests/test_train.py, which need a trained run)
    C("train-out-not-empty", "train", TRAIN,
      r"--out .*out is not empty \(notes.txt\): pass --resume to continue the run in it, "
      r"--overwrite to replace it", setup=out_with_notes),
    C("train-overwrite-foreign-files", "train", [*TRAIN, "--overwrite"],
      r"--overwrite replaces a run, but --out .*out holds no run \(no config.json; it holds "
      r"notes.txt\)", setup=out_with_notes),
    C("train-overwrite-not-a-run", "train", [*TRAIN, "--overwrite"],
      r"--overwrite replaces a run, but --out .*out holds no run \(no config.json; it holds "
      r"checkpoints/, tb/\): choose another --out", setup=out_not_a_run),
    C("train-overwrite-user-file-in-a-run-folder", "train", [*TRAIN, "--overwrite"],
      r"--overwrite clears only a run's own files .* also holds checkpoints/best_by_hand.pth: "
      r"choose another --out", setup=run_with_user_checkpoint),
    C("train-resume-truncated-checkpoint", "train", [*TRAIN, "--resume"],
      r"cannot read checkpoint .*step_00000001.pt: .*The file is truncated, corrupt or not a "
      r"ctt checkpoint; delete it to restart from the previous one",
      setup=lambda d: run_with_checkpoint(d, b"PK\x03\x04 cut short"), may_create=LOCK),
    # torch's own message suggests weights_only=False, i.e. running the file's code: never said
    C("train-resume-untrusted-checkpoint", "train", [*TRAIN, "--resume"],
      r"^(?!.*weights_only).*cannot read checkpoint .*step_00000001.pt: it holds Python "
      r"objects beyond tensors and plain data, .* refused unread", setup=run_with_checkpoint,
      may_create=LOCK),
    C("train-resume-without-run", "train", [*TRAIN, "--resume"],
      r"nothing to resume in .*out: it holds no run \(no config.json\)"),
    C("train-resume-and-overwrite", "train", [*TRAIN, "--resume", "--overwrite"],
      r"argument --overwrite: not allowed with argument --resume", argparse=True),
    C("train-out-locked", "train", TRAIN,
      rf"run directory .*out is in use by pid {os.getpid()} on host .*\.run\.lock\): wait "
      r"for it to end", setup=lambda d: hold_lock(d / "out", ".run.lock")),
    C("ablation-resume-without-study", "voc_ablation", [*VOC_STUDY, "--resume"],
      r"nothing to resume at .*s/voc_ablation: it holds no study", before_ray=True),
    C("ablation-resume-with-other-flags", "voc_ablation", [*VOC_STUDY, "--seeds", "0", "--resume"],
      r"--resume of .*s/voc_ablation with flags that differ from the study's: seeds: \[7\] -> "
      r"\[0\]", setup=lambda d: old_study(d / "s" / "voc_ablation", seeds=[7]),
      before_ray=True),
    C("ablation-study-dir-locked", "voc_ablation", VOC_STUDY,
      rf"study directory .*s/voc_ablation is in use by pid {os.getpid()} on host",
      setup=lambda d: hold_lock(d / "s" / "voc_ablation", ".study.lock"), before_ray=True),
]


# --- running a case -----------------------------------------------------------------------------

def entry_main(entry: str) -> Callable:
    if entry == "train":
        from ctt.train import main
    elif entry == "results":
        from ctt.tune.results import main
    elif entry == "synthetic":
        from ctt.data.synthetic import main
    elif entry in ("voc_ablation", "voc_sweep", "voc_contrast_sweep", "cityscapes_sweep"):
        main = load_script(entry).main
    elif entry in ("bench_step", "bench_study", "bench_contrast", "gpu_bench", "study_floor",
                   "record_curves", "kernel_spread", "replay_pruning", "live_pruning"):
        main = load_benchmark(entry).main
    else:
        raise AssertionError(entry)
    return main


def assert_unchanged(before: dict[str, str], after: dict[str, str],
                     may_create: tuple[str, ...]) -> None:
    changed = [p for p in before if after.get(p) != before[p]]
    created = [p for p in after if p not in before
               and not any(p == d or p.startswith(d + "/") for d in may_create)]
    assert not changed and not created, f"changed or deleted {changed}, created {created}"


def check_stderr(case: Case, err: str, out: str) -> str:
    """The error line (the only line, or argparse's last), after the common checks."""
    assert "Traceback" not in err + out, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    if case.argparse:
        assert lines and re.search(r": error: ", lines[-1]), err
        assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), err
    else:
        assert len(lines) == 1, err
        assert lines[0].startswith("error: "), err
    assert re.search(case.pattern, lines[-1]), f"{case.pattern!r} not in {lines[-1]!r}"
    return lines[-1]


def fill(argv: list[str], d: Path) -> list[str]:
    return [a.replace("{d}", str(d)) for a in argv]


@pytest.fixture()
def case_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "case"
    make_case_voc(d / "voc")
    monkeypatch.setenv("CTT_CACHE", str(d / "cache"))  # never touch the user's cache
    monkeypatch.setenv("CTT_STAGING", str(tmp_path / "staging"))
    yield d
    while _HELD:
        _HELD.pop().release()


class Started(BaseException):
    """Raised by the stand-ins below: a case went further than its error should let it (not
    an Exception, so no handler under test can swallow it)."""


def refuse_to_run(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a case that fails to fail stop at once instead of training or running a study:
    cases expected to fail before writing may not generate data or train, and study cases may
    not start Ray."""

    def stop(what: str) -> Callable:
        def fn(*args, **kwargs):
            raise Started(f"{case.id}: {what} started")
        return fn

    if not case.may_create and not case.trains:
        import ctt.data.synthetic
        import ctt.train

        monkeypatch.setattr(ctt.data.synthetic, "generate", stop("generating the synthetic set"))
        monkeypatch.setattr(ctt.train.Trainer, "__init__", stop("training"))
    if case.before_ray:
        import ray

        monkeypatch.setattr(ray, "init", stop("Ray"))


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: Case, case_dir: Path, capsys: pytest.CaptureFixture,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    if case.setup is not None:
        case.setup(case_dir)
    main = entry_main(case.entry)
    if case.no_cuda:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refuse_to_run(case, monkeypatch)
    before = hash_tree(case_dir)
    capsys.readouterr()
    try:
        code = main(fill(case.argv, case_dir))
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code == case.code, err[-3000:]
    check_stderr(case, err, out)
    assert_unchanged(before, hash_tree(case_dir), case.may_create)
    if case.before_ray:
        ray = sys.modules.get("ray")
        assert ray is None or not ray.is_initialized(), "the study started Ray"


def test_table_covers_every_entry_point() -> None:
    entries = {p.values[0].entry for p in CASES}
    assert entries == {"train", "voc_ablation", "voc_sweep", "voc_contrast_sweep",
                       "cityscapes_sweep", "results",
                       "synthetic", "bench_step", "bench_study", "bench_contrast",
                       "gpu_bench", "study_floor", "record_curves", "kernel_spread",
                       "replay_pruning", "live_pruning"}
    assert len(CASES) >= 40


# --- the real commands, as processes --------------------------------------------------------

PROCESS_CASES = [
    (["-m", "ctt.train", *TINY, "--set", "method.lamda_h=0.1"],
     r"^error: unknown config key 'method.lamda_h': did you mean 'method.lambda_h'", None),
    ([str(REPO_ROOT / "studies" / "voc_ablation.py"), "--set", "method.lr=0.1", "--storage",
      "{d}/s"], r"^error: unknown config key 'method.lr': did you mean 'optim.lr'\?", None),
    (["-m", "ctt.train", *TRAIN], rf"^error: cannot read image .*{IDS[1]}.jpg \(listed in "
     r".*labeled.txt, line 3\): truncated file \(", truncated_jpeg),
    (["-m", "ctt.tune.results", "{d}/st"], r"^error: .*st/study.json is not valid JSON",
     lambda d: study(d, study_json=b"{")),
    (["-m", "ctt.data.synthetic", "--root", "{d}/syn", "--size", "8"],
     r"^error: size must be an int >= 16", None),
    ([str(REPO_ROOT / "benchmarks" / "bench_step.py"), "--preset", "tiny", "--variant", "ctt",
      "--set-nothing"],
     r"unrecognized arguments: --set-nothing", None),
    ([str(REPO_ROOT / "benchmarks" / "bench_contrast.py"), "--device", "tpu9"],
     r"^error: unknown device 'tpu9'", None),
]


@pytest.mark.slow
@pytest.mark.parametrize(("argv", "pattern", "setup"), PROCESS_CASES,
                         ids=[" ".join(a[:2]).replace(str(REPO_ROOT) + "/", "")
                              for a, _, _ in PROCESS_CASES])
def test_bad_input_as_a_process(argv, pattern, setup, case_dir: Path) -> None:
    if setup is not None:
        setup(case_dir)
    before = hash_tree(case_dir)
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, *fill(argv, case_dir)], capture_output=True,
                         text=True, cwd=case_dir.parent, timeout=300,
                         env={**os.environ, "CTT_CACHE": str(case_dir / "cache")})
    wall = time.perf_counter() - t0
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr + run.stdout
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert re.search(pattern, lines[-1]), run.stderr
    if "argparse" not in pattern and "unrecognized" not in pattern:
        assert len(lines) == 1, run.stderr
    assert_unchanged(before, hash_tree(case_dir), ("out",))
    if "voc_ablation" in argv[0]:  # refused before Ray: Ray alone takes ~20 s to start
        assert "Ray" not in run.stdout + run.stderr and not (case_dir / "s").exists()
        assert wall < 60, wall


@pytest.mark.slow
def test_debug_shows_the_traceback(case_dir: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "ctt.train", *fill(TINY, case_dir), "--set",
                          "method.lr=0.1", "--debug"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1
    assert "Traceback" in run.stderr and "ConfigError: unknown config key 'method.lr'" in \
        run.stderr


def test_sweep_samples_only_what_its_variant_uses(capsys: pytest.CaptureFixture) -> None:
    """A sweep of a one-pair variant is not refused for the contrast weights in its space: they
    are left out (with a note), so no trial records a weight that never acted."""
    pytest.importorskip("ray")
    from ctt.config import PRESETS
    from ctt.tune.space import variant_space

    sweep = load_script("voc_sweep")
    space = sweep.STUDY.space()
    kept = variant_space(space, PRESETS["tiny"], "mean_teacher")
    assert set(kept) == {"1-method.ema_decay", "method.lambda_u", "method.tau_p"}
    note = capsys.readouterr().out
    assert note.startswith("note: variant mean_teacher fixes or ignores method.tau_h, "
                           "method.tau_l, method.lambda_h, method.lambda_l; not sampled")
    assert variant_space(space, PRESETS["tiny"], "ctt") == space
    assert capsys.readouterr().out == ""


def test_an_inert_setting_is_one_warning_line_and_the_run_goes_on(
        case_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """Ambiguous intent (a temperature of a contrast the variant switches off) is warned about
    in one line; the run still trains."""
    from ctt.train import main

    capsys.readouterr()
    assert main(fill([*TRAIN, "--variant", "cross_lc", "--set", "method.tau_h=0.3"],
                     case_dir)) == 0
    err = capsys.readouterr().err
    assert err == ("warning: method.tau_h=0.3 has no effect (variant cross_lc): method.lambda_h=0 "
                   "switches the high-level contrast off\n")
