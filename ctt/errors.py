"""Errors caused by what the user gave us (a config key, a path, a file), as opposed to bugs.

Entry points print a :class:`UserError` as one line, ``error: <message>``, on stderr and exit
with status 2, without a traceback (``--debug`` shows it). Anything else keeps its traceback:
an unexpected exception is a bug and its stack is what a bug report needs.

Messages follow ``<what went wrong> (<file, line or key>): <what to do>`` and are one line.
The subclasses also derive from the built-in exception that callers caught before they existed
(``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so ``except ValueError`` keeps
working.

A :class:`UserError` raised inside a DataLoader worker comes back re-raised by torch with the
worker's whole traceback as its message; :func:`one_line` recovers the original message.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["DataError", "DataRootError", "DeviceError", "MissingDataError", "ResultsError",
           "UserError", "check_writable", "float_at_least", "guarded", "int_at_least",
           "one_line", "warn", "warn_all"]

T = TypeVar("T")


class UserError(Exception):
    """An expected error whose message names the culprit (key, file, line) and what to do.
    ``exit_code``: the entry point's exit status (2; 1 where the input was fine but the work
    failed, such as a study whose every trial failed)."""

    exit_code = 2


class DataRootError(UserError, ValueError):
    """A dataset root is missing, or holds another layout than the configured dataset reads."""


class DataError(UserError, ValueError):
    """A dataset file is unreadable or wrong: a split file's format or encoding, a label's
    values, mode or size, a truncated or undecodable image. Names the file (and split line)."""


class MissingDataError(UserError, FileNotFoundError):
    """A split file, or a file a split file lists, does not exist (names the file and line)."""


class ResultsError(UserError, ValueError):
    """A study's result file (``study.json``, ``trial.json``, ``metrics.jsonl``) is corrupt."""


class DeviceError(UserError, RuntimeError):
    """The requested device (e.g. ``run.device=cuda``) is not available on this machine."""


# torch's ExceptionWrapper re-raises a worker's exception as ``Type("Caught Type in DataLoader
# worker process 0.\nOriginal Traceback (most recent call last):\n ... \nmod.Type: message")``.
_WORKER_LAST = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<type>[A-Za-z_]\w*): (?P<msg>.*)$")


def one_line(err: BaseException) -> str:
    """The message of ``err`` as one line: a DataLoader worker's re-raised exception gives the
    original message (the last line of the embedded traceback), newlines become ``"; "``."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        m = _WORKER_LAST.match(last)
        if m and m.group("type") == type(err).__name__:
            text = m.group("msg")
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def warn(message: str) -> None:
    """Print one ``warning: <message>`` line on stderr (a setting whose intent is ambiguous)."""
    print(f"warning: {one_line(Exception(message))}", file=sys.stderr, flush=True)


def warn_all(messages: Iterable[str]) -> None:
    """:func:`warn` each distinct message once, in order."""
    for message in dict.fromkeys(messages):
        warn(message)


def guarded(main: Callable[..., T]) -> Callable[..., T | int]:
    """Wrap a CLI ``main(argv)``: a :class:`UserError` becomes one line on stderr and its
    ``exit_code``; ``--debug`` among the arguments re-raises it with its traceback. A closed
    stdout pipe (``| head``) exits 141 quietly. Other exceptions pass through untouched (their
    traceback is the bug report)."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None, *args: Any, **kwargs: Any) -> T | int:
        given = sys.argv[1:] if argv is None else argv
        try:
            return main(argv, *args, **kwargs)
        except UserError as err:
            if "--debug" in given:
                raise
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
            return err.exit_code
        except BrokenPipeError:
            # the reader of our stdout left (`... | head`): not an error of ours. Point stdout
            # at devnull so the interpreter's final flush does not raise again; exit as a
            # shell does for SIGPIPE.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141

    return wrapper


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type=``: an integer ``>= lo`` (argparse prints a one-line usage error)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    parse.__name__ = f"int>={lo}"
    return parse


def float_at_least(lo: float, *, strict: bool = False,
                   what: str = "number") -> Callable[[str], float]:
    """An argparse ``type=``: a float ``>= lo`` (``> lo`` with ``strict``); NaN is refused.
    ``what`` names the quantity in the message (e.g. "number of seconds")."""
    import argparse
    import math

    op = ">" if strict else ">="

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (value > lo if strict else value >= lo):  # NaN fails both
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what} {op} {lo:g}")
        return value

    parse.__name__ = f"float{op}{lo:g}"
    return parse


def check_writable(path: str | os.PathLike[str], what: str) -> None:
    """Refuse an output ``path`` (file or directory to be created) that cannot be written,
    before minutes of work are lost; ``what`` names the option (e.g. ``--json``)."""
    from pathlib import Path

    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    blocked = existing != path and not existing.is_dir()  # an ancestor is a file
    if blocked or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write {path} ({what}): {existing} is not a writable "
                        "directory; choose another path")
