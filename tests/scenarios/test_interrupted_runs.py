"""SIGINT/SIGTERM of a run (ctt.train) or a study in every phase: exit 130/143, one line on
stderr (where it stopped + the command that continues it), nothing finished lost, and that
command runs it to the end (ctt/interrupts.py, ctt/train.py, ctt/tune/runtime.py). The signal
guard and the continue command on their own: tests/test_interrupts.py.

ctt.train is interrupted in-process by a signal sent from inside the phase (a wrapped function
of that phase calls ``os.kill`` on its own process), so the point is exact; one subprocess test
checks the real thing end to end. Studies run in-process on one loopback Ray (a helper thread
sends the signal once a file shows the phase has begun), except Ray start-up, which needs a
process of its own.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, deterministic, load_script
from test_train import assert_one_history, cli_args, read_records, tensors

import ctt.train as train_mod
from ctt.data import synthetic
from ctt.state import TrainState
from ctt.train import latest_checkpoint, main

LINE = re.compile(r"^interrupted \((SIGINT|SIGTERM)\) (.+?); (continue with|nothing was written; "
                  r"run again with): (.+)$")


def the_line(err: str) -> re.Match:
    """The interrupt line: stderr's last line, the only one about the interrupt, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    m = LINE.match(lines[-1])
    assert m, lines[-1]
    others = "\n".join(lines[:-1])
    assert "Traceback" not in err and "interrupt" not in others.lower(), others[-2000:]
    assert "Stop signal received" not in err and "Tuner.restore" not in err
    return m


# --- before main runs ------------------------------------------------------------------------

@pytest.mark.parametrize(("entry", "signum"), [
    (["-m", "ctt.train"], signal.SIGINT), (["studies/voc_ablation.py"], signal.SIGTERM)])
def test_signal_while_importing_is_one_line(entry, signum, tmp_path):
    """Before main runs (torch, Ray imports: seconds), a signal still ends in one line. The
    signal goes out once ``-X importtime`` reports the first import after ctt.interrupts (whose
    handler is installed in between)."""
    cmd = [sys.executable, "-X", "importtime", *entry, "--out", str(tmp_path / "x")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT)
    err = []
    seen = False
    for line in proc.stderr:
        err.append(line)
        if seen and line.startswith("import time:"):
            # the statement after that import installs the handler, and the next import
            # (torch's, Ray's: seconds) reports here only once it has begun after it: a fixed
            # pause after ctt.interrupts was too short on a busy machine
            proc.send_signal(signum)
            break
        seen = seen or line.rstrip().endswith("| ctt.interrupts")
    out, rest = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, rest[-2000:]
    m = the_line("\n".join(ln for ln in rest.splitlines() if not ln.startswith("import time:")))
    assert m.group(2, 3) == ("while loading", "nothing was written; run again with")
    assert shlex.split(m.group(4)) == cmd
    assert not (tmp_path / "x").exists() and out == ""


# --- ctt.train -----------------------------------------------------------------------------

ITERS = 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), num_train=24, num_val=6,
                              num_test=6, size=32, label_counts=(8,))


def args(root, out) -> list[str]:
    """8 iterations, evaluation and checkpoint every 3 (and at the end)."""
    return cli_args(root, out, ITERS) + ["--eval-every", "3", "--set", "run.checkpoint_every=3"]


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """The uninterrupted run: (records, final state tensors)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args(root, out)) == 0
    return read_records(out), tensors(TrainState.load(latest_checkpoint(out / "checkpoints")))


def signal_on_call(monkeypatch, name: str, signum: int, call: int = 1) -> None:
    """Make call number ``call`` of ``ctt.train.<name>`` send ``signum`` to this process."""
    real, calls = getattr(train_mod, name), []

    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, name, wrapper)


def interrupt(root, out, capsys) -> tuple[int, re.Match]:
    """Run (the monkeypatched signal fires); the exit code and the interrupt line, whose
    command is this run's with --resume."""
    code = main(args(root, out))
    m = the_line(capsys.readouterr().err)
    words = shlex.split(m.group(4))
    assert m.group(3) == "continue with"
    assert words[:3] == ["python", "-m", "ctt.train"] and words[3:] == args(root, out) + [
        "--resume"]
    return code, m


def check_resumed(root, out, reference, monkeypatch, capsys, skip_step: int | None = None,
                  says: str = "resumed from") -> None:
    """The printed command finishes the run: the same records and the same final state
    (bit for bit) as the uninterrupted run, each step once in metrics.jsonl and TensorBoard."""
    monkeypatch.undo()
    assert main(args(root, out) + ["--resume"]) == 0
    assert says in capsys.readouterr().out
    records, state = reference
    got = read_records(out)
    assert [r["step"] for r in got] == list(range(1, ITERS + 1))
    for a, b in zip(got, records, strict=True):
        if a["step"] == skip_step:  # its evaluation was cut short: training metrics only
            assert "miou" not in a
            assert deterministic(a).items() <= deterministic(b).items()
        else:
            assert deterministic(a) == deterministic(b), a["step"]
    final = tensors(TrainState.load(latest_checkpoint(out / "checkpoints")))
    assert final.keys() == state.keys()
    assert all(torch.equal(final[k], state[k]) for k in state)  # bit-exact
    assert_one_history(out, list(range(1, ITERS + 1)))


def test_train_sigint_before_training(root, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_on_call(monkeypatch, "build_datasets", signal.SIGINT)
    code, m = interrupt(root, out, capsys)
    assert code == 130
    assert m.group(1, 2) == ("SIGINT", "before training started; no checkpoint yet")
    assert (out / "config.json").is_file() and not (out / "checkpoints").exists()
    check_resumed(root, out, reference, monkeypatch, capsys, says="holds no checkpoint yet")


def test_train_sigterm_mid_training(root, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_on_call(monkeypatch, "train_step", signal.SIGTERM, call=5)  # inside step 5
    code, m = interrupt(root, out, capsys)
    assert code == 143
    # the step in flight completes, its records are written, and it is checkpointed
    assert m.group(1, 2) == ("SIGTERM", f"at step 5 of {ITERS}; last checkpoint step 5")
    assert [r["step"] for r in read_records(out)] == [1, 2, 3, 4, 5]
    assert latest_checkpoint(out / "checkpoints").name == "step_00000005.pt"
    check_resumed(root, out, reference, monkeypatch, capsys)


def test_train_sigint_during_evaluation(root, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_on_call(monkeypatch, "evaluate_many", signal.SIGINT, call=1)  # step 3's evaluation
    code, m = interrupt(root, out, capsys)
    assert code == 130
    assert m.group(2) == f"at step 3 of {ITERS} during evaluation; last checkpoint step 3"
    assert [r["step"] for r in read_records(out)] == [1, 2, 3]
    check_resumed(root, out, reference, monkeypatch, capsys, skip_step=3)


@pytest.mark.slow
def test_train_subprocess_sigint_then_resume(root, tmp_path):
    """The real thing: Ctrl-C to ``python -m ctt.train`` mid-training, exactly one line on
    stderr, then the printed command (run as a process too) finishes the run."""
    out = tmp_path / "run"
    argv = cli_args(root, out, 400) + ["--eval-every", "50", "--set", "run.checkpoint_every=50"]
    cmd = [sys.executable, "-m", "ctt.train", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env=env)
    for line in proc.stdout:
        if line.startswith("it 3/400"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1, err
    m = the_line(err)
    step = int(re.match(r"at step (\d+) of 400; last checkpoint step (\d+)$", m.group(2))[1])
    assert 3 <= step < 400 and latest_checkpoint(out / "checkpoints").stem == f"step_{step:08d}"
    words = shlex.split(m.group(4))
    assert words == [*cmd, "--resume"]  # the command as typed, + --resume
    words[words.index("--iters") + 1] = str(step + 2)  # finish early: two more steps
    done = subprocess.run(words, capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in read_records(out)] == list(range(1, step + 3))


# --- studies -------------------------------------------------------------------------------

ray = pytest.importorskip("ray")

from study_outputs import check_study_outputs, read_json  # noqa: E402

STUDY_ITERS = 40
LONG = ["--set", "run.eval_every=20", "--set", "run.checkpoint_every=20"]


@pytest.fixture(scope="module")
def ray_local(ray_local):
    """tests/conftest.py's Ray, with Tune's experiment snapshot every second instead of every
    5 s (Tune reads it when a study starts): the signals wait for a snapshot that records a
    finished trial."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
        yield


@contextlib.contextmanager
def signal_when(ready: Callable[[], bool], signum: int) -> Iterator[threading.Event]:
    """Send ``signum`` to this process once ``ready()``; a signal arriving after the block
    (or outside the study's own handlers) is swallowed rather than ending the test session."""
    sent, stop = threading.Event(), threading.Event()
    old = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                if ready():
                    os.kill(os.getpid(), signum)
                    sent.set()
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield sent
    finally:
        stop.set()
        thread.join(timeout=10)
        for s, handler in old.items():
            signal.signal(s, handler)


def run_script(script: str, argv: list[str], capfd) -> tuple[int, str]:
    with contextlib.redirect_stdout(io.StringIO()):
        code = load_script(script).main(argv)
    return code, capfd.readouterr().err


def statuses(study_dir: Path) -> dict[str, str]:
    out = {}
    for path in glob.glob(str(study_dir / "trials" / "*" / "trial.json")):
        with contextlib.suppress(ValueError, OSError):
            out[Path(path).parent.name] = read_json(path)["status"]
    return out


def finished_snapshot(study_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of the files of every finished trial (must survive --resume as is)."""
    out = {}
    for tid, status in statuses(study_dir).items():
        if status in ("TERMINATED", "ERROR"):
            for name in ("trial.json", "metrics.jsonl"):
                path = study_dir / "trials" / tid / name
                out[str(path)] = (path.read_bytes(), os.stat(path).st_mtime_ns)
    return out


def one_done_and_snapshotted(study_dir: Path) -> Callable[[], bool]:
    """A trial has finished and the experiment snapshot records it (the kill harness's rule
    in tests/scenarios/test_study_runs.py), while others still run."""
    def ready() -> bool:
        done = [t for t, s in statuses(study_dir).items() if s == "TERMINATED"]
        snaps = glob.glob(str(study_dir / "ray" / "experiment_state-*.json"))
        if not done or not snaps:
            return False
        marks = [os.path.getmtime(study_dir / "trials" / t / "trial.json") for t in done]
        return max(map(os.path.getmtime, snaps)) > max(marks) + 0.1
    return ready


def assert_continues(m: re.Match, script: str, argv: list[str]) -> list[str]:
    """The printed command is this script with these arguments and --resume; returns them."""
    words = shlex.split(m.group(4))
    assert m.group(3) == "continue with"
    assert words[0] == "python"
    assert Path(words[1]).resolve() == REPO_ROOT / "studies" / f"{script}.py"
    assert words[2:] == [*argv, "--resume"]
    return words[2:]


def check_kept(before: dict[str, tuple[bytes, int]]) -> None:
    assert before, "no trial had finished before the interrupt"
    for path, (data, mtime_ns) in before.items():
        assert Path(path).read_bytes() == data, path
        assert os.stat(path).st_mtime_ns == mtime_ns, path


@pytest.mark.slow
def test_ablation_sigint_in_trials_then_sigterm_in_ray_start_then_resume(ray_local, tmp_path,
                                                                       capfd):
    """Ctrl-C while trials run: exit 130, finished trials kept; the resume, SIGTERMed while
    its Ray starts (its own process): exit 143; the next resume finishes every trial without
    re-running the kept ones."""
    storage = tmp_path / "s"
    study = storage / "abl"
    argv = ["--smoke-test", "--variants", "supervised,mean_teacher,dual_self", "--no-fork",
            "--max-concurrent", "1", "--storage", str(storage), "--out", "abl", "--iters",
            str(STUDY_ITERS), *LONG]
    with signal_when(one_done_and_snapshotted(study), signal.SIGINT) as sent:
        code, err = run_script("voc_ablation", argv, capfd)
    assert sent.is_set() and code == 130, err[-3000:]
    m = the_line(err)
    assert re.fullmatch(r"during the trials \([12] of 3 finished, kept\)", m.group(2))
    resume = assert_continues(m, "voc_ablation", argv)
    kept = finished_snapshot(study)
    assert not (study / "report.md").exists()  # no report of an unfinished grid
    assert (study / ".study.lock").read_text() == ""  # released

    # the resume, in a process of its own, SIGTERMed while it starts Ray (lock just taken)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO_ROOT / "studies" / "voc_ablation.py"), *resume]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while '"pid"' not in (study / ".study.lock").read_text() and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    m = the_line(err)
    assert m.group(1, 2, 3) == ("SIGTERM", "while starting Ray", "continue with")
    assert shlex.split(m.group(4)) == cmd  # as typed: it had --resume already
    check_kept(kept)

    code, err = run_script("voc_ablation", resume, capfd)
    assert code == 0, err[-3000:]
    trials = check_study_outputs(study, n_trials=3, kind="ablation")
    assert all(t["status"] == "TERMINATED" and t["step"] == STUDY_ITERS for t in trials)
    check_kept(kept)
    # study.json records a resume once Ray is up: the one stopped while it started is absent
    assert len(read_json(study / "study.json")["resumed"]) == 1


def warmup_results(study: Path) -> list[str]:
    """The ``result.json`` of every warm-up trial in the study's Tune experiment."""
    out = []
    for params in glob.glob(str(study / "ray" / "*" / "params.json")):
        with contextlib.suppress(ValueError, OSError):
            if read_json(params).get("variant") == "warmup":
                out.append(str(Path(params).with_name("result.json")))
    return out


@pytest.mark.slow
def test_ablation_sigterm_in_shared_warmup_then_resume(ray_local, tmp_path, capfd):
    """SIGTERM during the shared warm-up: exit 143, no variant started (they wait for their
    seed's warm-up); the resume continues that warm-up from its checkpoint (one warm-up
    trial, its early steps not replayed) and runs the grid."""
    storage = tmp_path / "s"
    study = storage / "warm"
    argv = ["--smoke-test", "--variants", "supervised,ctt", "--storage", str(storage),
            "--out", "warm", "--iters", "80", "--set", "method.warmup_iters=60",
            "--set", "run.eval_every=10", "--set", "run.checkpoint_every=10"]

    def warmup_reported() -> bool:
        return any('"step": 10' in Path(p).read_text() for p in warmup_results(study))

    with signal_when(warmup_reported, signal.SIGTERM) as sent:
        code, err = run_script("voc_ablation", argv, capfd)
    assert sent.is_set() and code == 143, err[-3000:]
    m = the_line(err)
    assert m.group(2) == ("during the shared warm-up (0 of 1 seeds done) and the trials "
                          "(0 of 2 finished), kept")
    resume = assert_continues(m, "voc_ablation", argv)
    assert not (study / "warmup.json").exists() and not (study / "trials").exists()

    code, err = run_script("voc_ablation", resume, capfd)
    assert code == 0, err[-3000:]
    results = warmup_results(study)
    assert len(results) == 1  # continued, not started again
    steps = [json.loads(line)["step"] for line in Path(results[0]).read_text().splitlines()]
    assert steps.count(10) == 1 and steps[-1] == 60, steps
    published = study / "warmup" / "seed-0"
    assert read_json(study / "warmup.json") == {"0": str(published)}
    assert (published / "state.pt").is_file()
    trials = check_study_outputs(study, n_trials=2, kind="ablation")
    assert all(t["status"] == "TERMINATED" and t["step"] == 80 for t in trials)
    for t in trials:  # each variant forked the published warm-up
        config = read_json(study / "trials" / t["trial_id"] / "trial.json")["config"]
        assert config["_fork_from"] == str(published)


@pytest.mark.slow
def test_ablation_sigint_while_building_results_then_resume(ray_local, tmp_path, capfd):
    storage = tmp_path / "s"
    study = storage / "res"
    argv = ["--smoke-test", "--variants", "supervised,ctt", "--no-fork", "--storage",
            str(storage), "--out", "res"]
    with signal_when(lambda: (study / "trials.parquet").exists(), signal.SIGINT) as sent:
        code, err = run_script("voc_ablation", argv, capfd)
    assert sent.is_set() and code == 130, err[-3000:]
    m = the_line(err)
    assert m.group(2) == "while building the results (2 trials finished)"
    resume = assert_continues(m, "voc_ablation", argv)
    kept = finished_snapshot(study)
    assert len(kept) == 4

    code, err = run_script("voc_ablation", resume, capfd)
    assert code == 0, err[-3000:]
    check_study_outputs(study, n_trials=2, kind="ablation")
    check_kept(kept)  # the trials were not run again: only the results were built


@pytest.mark.slow
def test_sweep_sigterm_in_trials_then_resume(ray_local, tmp_path, capfd):
    storage = tmp_path / "s"
    study = storage / "sw"
    argv = ["--smoke-test", "--num-samples", "3", "--scheduler", "none", "--max-concurrent",
            "1", "--storage", str(storage), "--out", "sw", "--iters", str(STUDY_ITERS), *LONG]
    with signal_when(one_done_and_snapshotted(study), signal.SIGTERM) as sent:
        code, err = run_script("voc_sweep", argv, capfd)
    assert sent.is_set() and code == 143, err[-3000:]
    m = the_line(err)
    assert re.fullmatch(r"during the trials \([12] of 3 finished, kept\)", m.group(2))
    resume = assert_continues(m, "voc_sweep", argv)
    kept = finished_snapshot(study)
    assert "best" not in read_json(study / "study.json")  # no best of an unfinished sweep

    code, err = run_script("voc_sweep", resume, capfd)
    assert code == 0, err[-3000:]
    trials = check_study_outputs(study, n_trials=3, kind="sweep")
    assert all(t["status"] == "TERMINATED" and t["step"] == STUDY_ITERS for t in trials)
    check_kept(kept)
    assert read_json(study / "study.json")["best"]["trial_id"] in {t["trial_id"] for t in trials}


@pytest.mark.slow
def test_fresh_study_sigint_while_ray_starts_leaves_nothing(tmp_path):
    """Ctrl-C while a fresh study starts Ray: exit 130, nothing was written (the directory the
    lock created is gone), and the line says to run the same command again."""
    storage = tmp_path / "s"
    cmd = [sys.executable, str(REPO_ROOT / "studies" / "voc_ablation.py"), "--smoke-test",
           "--variants", "supervised,ctt", "--storage", str(storage), "--out", "fresh"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, start_new_session=True)
    lock = storage / "fresh" / ".study.lock"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                if '"pid"' in lock.read_text():
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    m = the_line(err)
    assert m.group(2, 3) == ("while starting Ray", "nothing was written; run again with")
    assert shlex.split(m.group(4)) == cmd
    assert not storage.exists()


def _group_study_cmd(storage: Path, iters: int = 300) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "studies" / "voc_ablation.py"), "--smoke-test",
            "--variants", "supervised,ctt", "--no-fork", "--max-concurrent", "1", "--storage",
            str(storage), "--out", "grp", "--iters", str(iters), *LONG]


def _start_and_wait_for_a_result(cmd: list[str], study: Path) -> subprocess.Popen:
    """The study as its own process group (as timeout, systemd or a CI runner start one),
    once a trial has reported."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if any(f.stat().st_size > 0 for f in study.glob("trials/*/metrics.jsonl")):
            return proc
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("no trial reported within 300 s")


@pytest.mark.slow
def test_resume_after_kill_9_stops_what_the_killed_driver_left(tmp_path):
    """``kill -9`` of the driver leaves Ray's dashboard and runtime-env agents running (they
    outlive their raylet). The lock recorded the driver's Ray processes; the resume that takes
    the stale lock over stops those still running (same pid and start time), says so in one
    note, and finishes the study."""
    import psutil

    study = tmp_path / "s" / "grp"
    cmd = _group_study_cmd(tmp_path / "s")
    proc = _start_and_wait_for_a_result(cmd, study)
    recorded = json.loads((study / ".study.lock").read_text())["ray_processes"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(3)  # the raylet and GCS die with the driver; the agents stay

    def running(pairs):
        out = []
        for pid, started in pairs:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if abs(p.create_time() - started) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
        return out

    left = running(recorded)
    try:
        done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        # what the resume repairs (checkpoints Tune's retention deleted after its last
        # snapshot) it repairs quietly: no Ray ERROR with a traceback
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        if left:
            assert f"note: stopped {len(left)} Ray process(es) that the killed driver" \
                in done.stderr, done.stderr[-3000:]
        assert running(recorded) == []
        trials = check_study_outputs(study, n_trials=2, kind="ablation")
        assert all(t["status"] == "TERMINATED" for t in trials)
    finally:
        for pid in running(recorded):  # never leave them behind, whatever failed above
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
