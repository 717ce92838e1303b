"""Errors caused by what the user gave us (a config key, a path, a file), as opposed to bugs.

Entry points print a :class:`UserError` as one line, ``error: <message>``, on stderr and exit
with status 2, without a traceback (``--debug`` shows it). Anything else keeps its traceback:
an unexpected exception is a bug and its stack is what a bug report needs.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["DataRootError", "UserError", "guarded"]


class UserError(Exception):
    """An expected error whose message names the culprit (key, file, line) and what to do."""


class DataRootError(UserError, ValueError):
    """A dataset root is missing, or holds another layout than the configured dataset reads."""


def guarded(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI ``main(argv, **kw) -> exit code``: a :class:`UserError` becomes one line on
    stderr and exit code 2; ``--debug`` among the arguments re-raises it with its traceback."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None, **kwargs: Any) -> int:
        args = sys.argv[1:] if argv is None else argv
        try:
            return main(argv, **kwargs)
        except UserError as err:
            if "--debug" in args:
                raise
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapper
