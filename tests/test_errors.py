"""ctt.errors.guarded: the wrapper every entry point's main goes through."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ctt.errors import DataError, UserError, guarded, one_line


@guarded
def _fails(argv: list[str] | None = None) -> int:
    raise DataError("label file x.png (listed in s.txt, line 3) has values [99]: fix it")


def test_user_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert _fails([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("error: label file x.png (listed in s.txt, line 3) has "
                                 "values [99]: fix it\n")


def test_debug_reraises_with_the_traceback() -> None:
    with pytest.raises(UserError, match="values \\[99\\]"):
        _fails(["--debug"])


def test_other_exceptions_keep_their_traceback() -> None:
    @guarded
    def bug(argv: list[str] | None = None) -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        bug([])


def test_worker_message_is_recovered() -> None:
    err = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
                    "(most recent call last):\n  File \"x.py\", line 1\nctt.errors.DataError: "
                    "label file y.png has values [30]")
    assert one_line(err) == "label file y.png has values [30]"


def test_closed_stdout_pipe_exits_quietly() -> None:
    """`... | head`: the reader leaves early; no BrokenPipeError traceback, exit 141."""
    code = textwrap.dedent("""
        import sys
        from ctt.errors import guarded

        @guarded
        def main(argv=None):
            for i in range(200000):
                print("row", i)
            return 0

        sys.exit(main([]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # like `head -1` exiting
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_float_at_least_refuses_below_the_bound_and_nan():
    import argparse

    from ctt.errors import float_at_least

    positive, seconds = float_at_least(0, strict=True), float_at_least(0, what="number of seconds")
    assert positive("0.5") == 0.5 and seconds("0") == 0.0
    for parse, text, message in ((positive, "0", "'0' is not a number > 0"),
                                 (positive, "nan", "'nan' is not a number > 0"),
                                 (seconds, "-1", "'-1' is not a number of seconds >= 0"),
                                 (seconds, "soon", "'soon' is not a number of seconds >= 0")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
