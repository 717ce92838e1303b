"""ctt.train: the Trainer's bit-exact resume and fork, seeds, and the CLI (files, resume,
refusal to overwrite, NaN exit)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_config

import ctt.step
from ctt.data import synthetic
from ctt.data.loader import build_datasets
from ctt.state import TrainState
from ctt.train import Trainer, latest_checkpoint, main

SMALL = {
    "data.crop_size": 32, "data.batch_size": 2, "data.batch_size_u": 2, "data.labeled_split": "8",
    "model.width": 8, "model.feat_dim": 32, "method.bank_size": 8, "method.bank_min_fill": 1,
    "method.warmup_iters": 2, "method.tau_bank": 0.0, "method.tau_p": 0.0,
    "method.max_anchors": 16, "optim.iters": 10, "run.device": "cpu", "run.log_every": 1,
}
METRICS = {"step", "miou", "miou/student0", "loss/total", "loss/sup", "loss/unsup", "loss/hc",
           "loss/lc", "pl/weight", "n/anchors_hc", "n/anchors_lc", "bank/fill", "contrast_on"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), num_train=24, num_val=6,
                              num_test=6, size=32, label_counts=(8,))


@pytest.fixture(scope="module")
def datasets(root):
    return build_datasets(make_cfg(root))


def make_cfg(root, variant: str = "ctt", **flat):
    """The tiny preset with SMALL on the data at ``root``, ``variant`` and ``flat``."""
    return tiny_config({**SMALL, "data.root": str(root)}, variant, **flat)


def run(trainer: Trainer, until: int) -> list[dict[str, float]]:
    """Train to ``until``; the per-step metrics without wall-clock values."""
    out: list[dict[str, float]] = []
    trainer.fit(until=until, on_log=lambda m: out.append(
        {k: v for k, v in m.items() if not k.startswith("time/")}))
    return out


def tensors(state: TrainState) -> dict[str, torch.Tensor]:
    out = {}
    for role, nets in (("s", state.students), ("t", state.teachers), ("b", state.banks)):
        for k, net in enumerate(nets):
            out.update({f"{role}{k}.{n}": v for n, v in net.state_dict().items()})
    for k, opt in enumerate(state.optimizers):
        for pid, st in opt.state_dict()["state"].items():
            out.update({f"o{k}.{pid}.{n}": v for n, v in st.items() if torch.is_tensor(v)})
    out["rng/aug"] = state.generator.get_state()
    return out


def assert_same_state(a: TrainState, b: TrainState) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert (a.step, a.contrast_on, a.streams) == (b.step, b.contrast_on, b.streams)


def test_resume_is_bit_exact(root, datasets, tmp_path):
    cfg = make_cfg(root, optim__iters=6)
    straight = Trainer(cfg, datasets=datasets)
    straight.state.contrast_on = True  # force the contrastive terms and bank from step 2 on
    want = run(straight, 6)

    first = Trainer(cfg, datasets=datasets)
    first.state.contrast_on = True
    got = run(first, 3)  # stops inside the semi-supervised phase, after the warm-up
    first.state.save(tmp_path / "ckpt.pt")
    torch.manual_seed(999)  # whatever happens in between must not matter
    resumed = Trainer(cfg, TrainState.load(tmp_path / "ckpt.pt", cfg), datasets=datasets)
    got += run(resumed, 6)

    assert got == want
    assert all(m["loss/hc"] > 0 and m["loss/lc"] > 0 and m["loss/unsup"] > 0 for m in got[2:])
    assert_same_state(resumed.state, straight.state)
    assert resumed.state.streams == {"labeled": {"consumed": 12}, "unlabeled": {"consumed": 8}}


def test_fork_of_warmup_equals_training_from_scratch(root, datasets, tmp_path):
    warm = Trainer(make_cfg(root), datasets=datasets)
    run(warm, 2)
    path = warm.state.save(tmp_path / "warm.pt")
    for variant in ("supervised", "mean_teacher", "ctt"):
        cfg = make_cfg(root, variant)
        scratch = Trainer(cfg, datasets=datasets)
        want = run(scratch, 4)
        forked = Trainer(cfg, TrainState.fork(path, cfg), datasets=datasets)
        got = want[:2] + run(forked, 4)
        assert got == want, variant
        assert_same_state(forked.state, scratch.state)


def test_same_seed_same_metrics_other_seed_differs(root, datasets):
    a, b, c = (run(Trainer(make_cfg(root, run__seed=s), datasets=datasets), 3)
               for s in (0, 0, 1))
    assert a == b
    assert [m["loss/total"] for m in a] != [m["loss/total"] for m in c]


def test_evaluate_reports_every_network(root, datasets):
    trainer = Trainer(make_cfg(root), datasets=datasets)
    rng = torch.get_rng_state()
    res = trainer.evaluate()
    assert torch.equal(rng, torch.get_rng_state())  # evaluating leaves training's RNG alone
    assert set(res) == {"miou", "miou/student0", "miou/student1", "miou/teacher0",
                        "miou/teacher1"}
    assert res["miou"] == pytest.approx((res["miou/student0"] + res["miou/student1"]) / 2)
    assert all(0.0 <= v <= 100.0 for v in res.values())
    assert not any(m.training for t in trainer.state.teachers for m in t.modules())
    assert all(m.training for s in trainer.state.students for m in s.modules())
    # one pass over the images gives each network exactly what a pass of its own gives
    from ctt.data.loader import eval_loader
    from ctt.evaluate import evaluate

    loader = eval_loader(datasets["val"])
    for role, nets in (("student", trainer.state.students), ("teacher", trainer.state.teachers)):
        for k, net in enumerate(nets):
            assert res[f"miou/{role}{k}"] == evaluate(net, loader, 7)["miou"]
    students = trainer.evaluate(teachers=False)
    assert students == {k: v for k, v in res.items() if "teacher" not in k}


def test_fit_evaluates_teachers_only_at_the_end(root, datasets):
    """Periodic evaluations measure the students (``miou``); the teachers are evaluated once,
    at the run's last iteration, not at an intermediate ``until`` (a shared warm-up)."""
    cfg = make_cfg(root, optim__iters=6, run__eval_every=2)
    trainer = Trainer(cfg, datasets=datasets)
    evals: list[dict[str, float]] = []
    trainer.fit(until=4, on_eval=evals.append)
    trainer.fit(on_eval=evals.append)
    assert [int(m["step"]) for m in evals] == [2, 4, 6]
    for m in evals[:2]:
        assert {"miou", "miou/student0", "miou/student1"} <= m.keys()
        assert not any(k.startswith("miou/teacher") for k in m)
    assert {"miou/teacher0", "miou/teacher1"} <= evals[2].keys()
    final = trainer.evaluate()
    assert {k: evals[2][k] for k in final} == final


# --- CLI ---------------------------------------------------------------------------------------

def cli_args(root, out, iters: int) -> list[str]:
    args = ["--preset", "tiny", "--variant", "ctt", "--data-root", str(root), "--iters",
            str(iters), "--eval-every", "2", "--out", str(out)]
    for key, value in SMALL.items():
        if key not in ("optim.iters", "run.device"):
            args += ["--set", f"{key}={value}"]
    return args + ["--set", "run.checkpoint_every=2", "--set", "run.log_every=1"]


def read_records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_writes_its_files_and_resumes(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(root, out, 3)) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["config"]["optim.iters"] == 3 and conf["variant"] == "ctt"
    assert {"torch", "numpy"} <= set(conf["env"]["versions"])
    assert conf["env"]["git_commit"]
    records = read_records(out)
    assert [r["step"] for r in records] == [1, 2, 3]  # one record per step, evals merged in
    for r in records:
        assert {k for k in r if not k.startswith("time/")} >= METRICS - {"miou", "miou/student0"}
    assert METRICS <= set(records[1]) and METRICS <= set(records[2])  # eval at 2 and at the end
    clock = {k for r in records for k in r if "time" in k or k.endswith("_s")}
    assert clock and all(k.startswith("time/") for k in clock)
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000002.pt", "step_00000003.pt"]

    capsys.readouterr()
    assert main(cli_args(root, out, 5)) == 2  # existing checkpoints: refuse without --resume
    assert "--resume" in capsys.readouterr().err
    assert main(cli_args(root, out, 5) + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_records(out)] == [1, 2, 3, 4, 5]
    assert latest_checkpoint(out / "checkpoints").name == "step_00000005.pt"
    assert TrainState.load(latest_checkpoint(out / "checkpoints")).step == 5
    # a finished run resumed with the same total has nothing left to do
    assert main(cli_args(root, out, 5) + ["--resume"]) == 0
    # a resume whose config disagrees with the checkpoint is a clear error, not a traceback
    capsys.readouterr()
    assert main(cli_args(root, out, 6) + ["--resume", "--set", "method.lambda_h=0.5"]) == 2
    err = capsys.readouterr().err
    assert "method.lambda_h" in err and "original --variant and --set" in err


def test_cli_nan_exits_1_and_keeps_the_last_good_checkpoint(root, tmp_path, monkeypatch,
                                                             capsys):
    real = ctt.step.supervised_ce
    calls = []

    def nan_at_step_3(logits, labels):
        calls.append(1)
        loss = real(logits, labels)
        return loss * math.nan if len(calls) > 4 else loss  # 2 students x 2 good steps

    monkeypatch.setattr(ctt.step, "supervised_ce", nan_at_step_3)
    out = tmp_path / "nan"
    assert main(cli_args(root, out, 4)) == 1
    err = capsys.readouterr().err
    assert "non-finite loss/sup (student 0) = nan at step 2" in err
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000002.pt"]  # no temp files, nothing past the last good step
    assert TrainState.load(out / "checkpoints" / ckpts[0]).step == 2


# --- a run owns its directory --------------------------------------------------------------

def digest(directory) -> dict[str, str]:
    """relative path -> sha256 of every file under ``directory`` (the lock file included)."""
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def tb_scalars(logdir) -> list[tuple[str, int, float]]:
    """(tag, step, value) as TensorBoard shows them: event files in name order, and a
    ``SessionLog.START`` at step T (tensorboardX ``purge_step``) hides every earlier event
    with a step >= T (TensorBoard's purge of orphaned data after a restart)."""
    from tb_events import read_events
    from tensorboardX.proto.event_pb2 import SessionLog

    out: list[tuple[str, int, float]] = []
    for _, ev in read_events(logdir):
        if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
            out = [s for s in out if s[1] < ev.step]
        for v in ev.summary.value:
            if v.HasField("simple_value"):
                out.append((v.tag, ev.step, v.simple_value))
    return out


def assert_one_history(out, steps: list[int]) -> None:
    """metrics.jsonl and TensorBoard each hold every step once, and agree on the values."""
    records = read_records(out)
    assert [r["step"] for r in records] == steps
    shown = tb_scalars(out / "tb")
    keys = [(tag, step) for tag, step, _ in shown]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)[:5]
    assert sorted({step for _, step, _ in shown}) == steps
    by_step = {r["step"]: r for r in records}
    for tag, step, value in shown:
        assert value == pytest.approx(by_step[step][tag], rel=1e-6), (tag, step)


def test_cli_refuses_a_non_empty_out_and_overwrite_clears_only_run_files(root, tmp_path,
                                                                        capsys):
    out = tmp_path / "run"
    assert main(cli_args(root, out, 3)) == 0
    before = digest(out)
    capsys.readouterr()
    assert main(cli_args(root, out, 4)) == 2  # not --resume: the two runs would mix
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out} is not empty (")
    assert "--resume" in err and "--overwrite" in err and "\n" not in err
    assert digest(out) == before

    assert main(cli_args(root, out, 4) + ["--overwrite"]) == 0
    assert_one_history(out, [1, 2, 3, 4])
    assert len(list((out / "tb").iterdir())) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000002.pt", "step_00000004.pt"]
    assert json.loads((out / "config.json").read_text())["config"]["optim.iters"] == 4

    (out / "notes.txt").write_text("mine")
    before = digest(out)
    assert main(cli_args(root, out, 4) + ["--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite clears only a run's own files" in err and "notes.txt" in err
    assert digest(out) == before

    other = tmp_path / "other"  # somebody's directory: refused, and left exactly as it was
    other.mkdir()
    (other / "data.csv").write_text("1,2\n")
    assert main(cli_args(root, other, 3)) == 2
    assert sorted(p.name for p in other.iterdir()) == ["data.csv"]
    assert main(cli_args(root, tmp_path / "run" / "notes.txt", 3)) == 2
    assert "is a file" in capsys.readouterr().err


def test_cli_resume_needs_a_run_and_cannot_shorten_it(root, tmp_path, capsys):
    typo = tmp_path / "rnu"
    assert main(cli_args(root, typo, 3) + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: nothing to resume in {typo}: it holds no run (no config.json); "
                   "check --out, or start the run without --resume")
    assert not typo.exists()

    out = tmp_path / "run"
    assert main(cli_args(root, out, 3)) == 0
    before = digest(out)
    capsys.readouterr()
    # (warm-up 1: --iters 2 must stay above the warm-up, or the config itself is refused)
    assert main(cli_args(root, out, 2) + ["--resume", "--set", "method.warmup_iters=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--iters 2 is below the step of the checkpoint to resume (3" in err
    assert "pass --iters 3 or more" in err and "\n" not in err
    assert digest(out) == before  # config.json still says iters=3
    with pytest.raises(SystemExit) as e:  # argparse refuses the contradiction
        main(cli_args(root, out, 3) + ["--resume", "--overwrite"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_cli_resume_of_a_run_without_checkpoint_starts_it_over(root, tmp_path, capsys):
    """A run killed before its first checkpoint: --resume starts again at step 1, and neither
    metrics.jsonl nor TensorBoard keeps the killed run's records."""
    out = tmp_path / "run"
    assert main(cli_args(root, out, 3)) == 0
    for ckpt in (out / "checkpoints").iterdir():
        ckpt.unlink()
    assert main(cli_args(root, out, 4) + ["--resume"]) == 0
    assert "holds no checkpoint yet" in capsys.readouterr().out
    assert_one_history(out, [1, 2, 3, 4])


def test_cli_resume_after_a_kill_purges_the_killed_steps(root, tmp_path):
    """Records written after the last checkpoint by a killed run are dropped from
    metrics.jsonl, and TensorBoard hides them (purge_step), so each step shows once."""
    out = tmp_path / "run"
    assert main(cli_args(root, out, 6) + ["--set", "run.checkpoint_every=4",
                                          "--eval-every", "4"]) == 0
    (out / "checkpoints" / "step_00000006.pt").unlink()  # the kill came before it
    raw_before = [(t, s) for t, s, _ in tb_scalars(out / "tb")]
    assert main(cli_args(root, out, 8) + ["--set", "run.checkpoint_every=4", "--eval-every",
                                          "4", "--resume"]) == 0
    assert_one_history(out, list(range(1, 9)))
    from tb_events import read_events

    # the old event file still holds steps 5 and 6: without the purge they would show twice
    raw = [(v.tag, ev.step) for _, ev in read_events(out / "tb") for v in ev.summary.value]
    assert raw.count(("loss/total", 5)) == 2 and ("loss/total", 5) in raw_before


def test_cli_refuses_a_locked_out_and_takes_over_a_stale_lock(root, tmp_path, capsys):
    import os
    import socket

    from ctt.rundir import RUN_LOCK, DirLock

    out = tmp_path / "run"
    with DirLock(out, RUN_LOCK, "run"):  # another run is training in it
        assert main(cli_args(root, out, 3)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: run directory {out} is in use by pid {os.getpid()} on "
                              f"host {socket.gethostname()} since ")
        assert "\n" not in err
        assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK]
        (out / "config.json").write_text("{}")  # its files: still the holder is named
        assert main(cli_args(root, out, 3)) == 2
        assert "is in use by pid" in capsys.readouterr().err
        (out / "config.json").unlink()
    assert not out.exists()  # the lock made it and nothing else was written: no trace left

    # a holder that died without releasing (SIGKILL): the kernel dropped its flock
    out.mkdir()
    (out / RUN_LOCK).write_text(json.dumps({"pid": 999999, "host": socket.gethostname(),
                                            "started": 0}))
    assert main(cli_args(root, out, 3)) == 0  # 3 > the warm-up of 2: a valid run
    assert "taking over the stale lock of pid 999999" in capsys.readouterr().err
    assert (out / RUN_LOCK).read_text() == ""

    # ... on another host: it cannot be checked from here; the message says how to clear it
    (out / RUN_LOCK).write_text(json.dumps({"pid": 4242, "host": "elsewhere", "started": 0}))
    assert main(cli_args(root, out, 4) + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "locked by pid 4242 on host elsewhere" in err and "cannot check" in err
    assert f"rm {out / RUN_LOCK}" in err
    assert json.loads((out / RUN_LOCK).read_text())["pid"] == 4242  # left for the user


def test_dir_lock_is_exclusive_across_processes_and_freed_by_death(tmp_path):
    """flock semantics the lock relies on, with a real second process: held while it lives,
    free (and stale) once it is SIGKILLed."""
    import signal
    import subprocess
    import sys

    from ctt.rundir import DirLock, DirLockedError

    code = ("import sys, time; from ctt.rundir import DirLock; "
            f"DirLock({str(tmp_path)!r}, '.study.lock', 'study').acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(DirLockedError, match=f"in use by pid {proc.pid} on host"):
            DirLock(tmp_path, ".study.lock", "study").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    lock = DirLock(tmp_path, ".study.lock", "study")
    lock.acquire()  # the holder is dead: taken over
    assert json.loads((tmp_path / ".study.lock").read_text())["pid"] != proc.pid
    lock.release()


def test_a_split_whose_labels_are_all_ignore_is_warned_about_once(root, tmp_path, capsys):
    """Labels that are all 255 (ignore) evaluate to mIoU 0.00 with nothing counted: that is a
    warning, once per split, not a silent result. The slow reference: a copy of the data whose
    val labels are rewritten to 255 pixel by pixel."""
    import shutil
    from pathlib import Path

    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(root, data)
    val_ids = [line.split()[0] for line in (data / "ImageSets" / "Segmentation" / "val.txt")
               .read_text().split("\n") if line.strip() and not line.startswith("#")]
    for item in val_ids:
        path = data / "SegmentationClass" / f"{Path(item).stem}.png"
        label = Image.open(path)
        blank = np.full(np.asarray(label).shape, 255, dtype=np.uint8)
        out = Image.fromarray(blank, mode="P")
        if label.mode == "P":
            out.putpalette(label.getpalette())
        out.save(path)
    trainer = Trainer(make_cfg(data))
    capsys.readouterr()
    first = trainer.evaluate("val")
    assert first["miou"] == 0.0
    err = capsys.readouterr().err
    assert err.count("warning: the val split has no labelled pixel (every label value is 255")\
        == 1, err
    trainer.evaluate("val")
    assert "no labelled pixel" not in capsys.readouterr().err  # once per split
