"""The error Ray recorded for a failed trial, as one line and in full."""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["NO_ERROR_TEXT", "ray_trial_error"]

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours "ray::Func()" in tracebacks
# What a failed trial says when Ray wrote down nothing about it.
NO_ERROR_TEXT = "the trial raised (Ray recorded no error text)"
# The full text kept: the end of the traceback, where the cause is.
MAX_DETAIL_CHARS = 20000


def ray_trial_error(trial: Any) -> tuple[str, str]:
    """(one-line message, full text) of the error Ray recorded for ``trial``.

    Ray 2.60 calls ``trial.handle_error(exc)`` before ``on_trial_error``: it appends
    "Failure # n (occurred at ...)" + ``str(exc)`` (traceback included) to ``trial.error_file``
    and, for RayTaskError/RayActorError, pickles the exception to ``trial.pickled_error_file``
    (both in the driver's staging dir, ``trial.local_path``). ``exc.cause`` of a RayTaskError
    is the user's exception, which gives the clean one-line message.
    """
    detail = ""
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            detail = _ANSI_ESCAPE.sub("", f.read())
    message = ""
    pickled = getattr(trial, "pickled_error_file", None)
    if pickled and os.path.exists(pickled):
        try:
            import ray.cloudpickle as cloudpickle

            with open(pickled, "rb") as f:
                exc = cloudpickle.load(f)
            cause = getattr(exc, "cause", None) or exc
            message = f"{type(cause).__name__}: {cause}".strip()
        except Exception:  # an unpicklable error still has its text file
            message = ""
    if not message and detail:
        lines = [ln.strip() for ln in detail.splitlines() if ln.strip()]
        message = lines[-1] if lines else ""
    return message or NO_ERROR_TEXT, detail[-MAX_DETAIL_CHARS:]
