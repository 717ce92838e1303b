"""What a running study prints: ``python studies/voc_ablation.py`` as a user runs it (shrunk
to two variants, one seed and a short budget), its terminal output captured: the start line,
progress lines with a time-left figure, no path inside Ray's temporary directory, the summary
at the end; and the same reporter across an interrupt and a ``--resume``."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT

pytestmark = pytest.mark.slow

PROGRESS = re.compile(r"^\[\s*(?:\d+:)?\d+:\d\d\] trials (\d+) done(?: \(\d+ failed\))?, "
                      r"(\d+) running, (\d+) pending \| compute (\d+)% \| about .+ left")
# What Ray's own status table shows as a result location (its temporary session directory).
RAY_INTERNAL = ("/tmp/ray/", "session_20", "driver_artifacts", "Result logdir", "ray_results")


def study_cmd(storage: Path, *extra: str, iters: int = 240) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "studies" / "voc_ablation.py"),
            "--variants", "supervised,ctt", "--seeds", "0", "--iters", str(iters),
            "--set", "method.warmup_iters=40", "--set", "run.eval_every=40",
            "--set", "run.checkpoint_every=40", "--progress-every", "1",
            "--storage", str(storage), "--out", "out", *extra]


def start_line_re(study_dir: Path) -> re.Pattern:
    return re.compile(rf"^study out: 2 trials \+ 1 shared warm-up in {re.escape(str(study_dir))}; "
                      r"estimated compute .+, about .+ wall on \d+ slots?$", re.M)


def check_no_ray_paths(text: str) -> None:
    for marker in RAY_INTERNAL:
        assert marker not in text, f"{marker!r} in the study's output:\n{text[-3000:]}"


def test_default_study_prints_start_progress_and_summary(tmp_path):
    storage = tmp_path / "s"
    done = subprocess.run(study_cmd(storage), capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=900)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    study_dir = (storage / "out").resolve()
    assert start_line_re(study_dir).search(out), out[:3000]
    lines = [m for m in (PROGRESS.match(ln) for ln in out.splitlines()) if m]
    assert lines, out[-3000:]
    last = lines[-1]
    assert last.group(1, 2, 3) == ("2", "0", "0") and last.group(4) == "100", out[-2000:]
    assert re.search(r"best miou \d+\.\d\d \((supervised|ctt), seed 0\)", out)
    assert f"results in {study_dir}" in out
    check_no_ray_paths(out + done.stderr)
    # the start line comes first among the study's own lines, the summary last
    own = [ln for ln in out.splitlines() if ln.startswith(("study out:", "[", "study wall"))]
    assert own[0].startswith("study out:") and own[-1].startswith("study wall time")


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def test_interrupted_study_resumes_with_the_same_reporter(tmp_path):
    """SIGINT once a trial has finished (a progress line says so): exit 130, one line; the
    ``--resume`` prints its start line and progress lines again, counts the kept trial as done
    from its first line, and finishes."""
    storage = tmp_path / "s"
    study_dir = (storage / "out").resolve()
    cmd = study_cmd(storage, iters=600)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
                m = PROGRESS.match(seen[-1])
                if m and int(m.group(1)) >= 1 and int(m.group(2)) >= 1:
                    break  # the supervised trial finished and the ctt one still runs
            assert proc.poll() is None, "".join(seen)[-3000:]
        else:
            pytest.fail("no progress line with a finished trial:\n" + "".join(seen)[-3000:])
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert start_line_re(study_dir).search("".join(seen))
    stops = [ln for ln in err.splitlines() if ln.startswith("interrupted (SIGINT)")]
    assert len(stops) == 1 and "--resume" in stops[0], err[-3000:]

    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, cwd=REPO_ROOT,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert start_line_re(study_dir).search(again.stdout), again.stdout[:3000]
    progress = [m for m in (PROGRESS.match(ln) for ln in again.stdout.splitlines()) if m]
    assert progress and int(progress[0].group(1)) >= 1, again.stdout[-3000:]
    assert progress[-1].group(1, 2, 3) == ("2", "0", "0"), again.stdout[-3000:]
    check_no_ray_paths(again.stdout + again.stderr)
