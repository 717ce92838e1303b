"""ctt/interrupts.py on its own: the signal guard (a signal inside a step is held until the step
is applied whole; handlers are restored) and the command that continues an interrupted run.
Runs and studies interrupted in every phase: tests/scenarios/test_interrupted_runs.py.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from ctt.interrupts import Interrupted, SignalGuard, continue_command


def test_guard_defers_inside_steps_and_restores_handlers():
    before = signal.getsignal(signal.SIGINT)
    with SignalGuard() as guard:
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGTERM)  # held: a step is applied whole
            held = guard.signum
        assert held == signal.SIGTERM
        with pytest.raises(Interrupted) as e:
            guard.check()
        assert (e.value.name, e.value.exit_code) == ("SIGTERM", 143)
        guard.check()  # raised once
    assert signal.getsignal(signal.SIGINT) is before
    with SignalGuard(), pytest.raises(Interrupted) as e:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # not reached: raised at once outside deferred blocks
    assert e.value.exit_code == 130


def test_continue_command():
    assert continue_command(["--out", "a b"], ["python", "-m", "ctt.train"]) == \
        "python -m ctt.train --out 'a b' --resume"
    assert continue_command(["--resume", "--out", "x"], ["python", "s.py"]) == \
        "python s.py --resume --out x"
    assert continue_command(["--overwrite", "--out", "x"], ["p"], drop=("--overwrite",)) == \
        "p --out x --resume"
    assert continue_command(["--out", "x"], ["p"], resume=False) == "p --out x"
