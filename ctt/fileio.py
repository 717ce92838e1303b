"""File helpers shared by runs (``ctt.train``) and studies (``ctt.tune``): atomic writes and the
``metrics.jsonl`` record format.

Atomic writes go through a temporary file next to the target (``.<name>.<pid>.<random>.tmp``)
and ``os.replace``, so a reader, or a kill at any moment, sees the old file or the new one, never
half of one. The temporary file is removed when writing fails; only a hard kill can leave one
(:func:`is_atomic_temp` recognises it).

``metrics.jsonl`` holds one JSON object per line. Its one writer is :func:`encode_record` (and
:func:`append_record` on top of it); its one decoder :func:`decode_record`. Lines are strict JSON
(any JSON reader can read them): JSON has no NaN or infinity, so a non-finite float is written as
the string ``"nan"``, ``"inf"`` or ``"-inf"``, and :func:`decode_record` turns those strings back
into floats, except in the text fields :data:`TEXT_KEYS`. A bare ``NaN`` (Python's ``json``
default) decodes too.

Standard library only: ``import ctt`` must work without Ray or Optuna.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

# The suffix of an atomic write's temporary file (.<name>.<pid>.<hex>.tmp, beside its target).
TEMP_SUFFIX = ".tmp"
# The strings that stand for non-finite floats in metrics.jsonl (what str(float) gives).
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Text fields of a metrics.jsonl record (identity, placement, a trial's own error message): never
# decoded as numbers, so an error text "nan" stays text.
TEXT_KEYS = frozenset({"trial_id", "node_id", "node_ip", "hostname", "error"})


# --- atomic writes ------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = False
                ) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; a clean exit of the ``with`` block
    moves it onto ``path`` (``os.replace``), an exception deletes it.

    ``mode`` is ``"w"`` (UTF-8 text) or ``"wb"``. ``fsync=True`` forces the data to disk before
    the rename (checkpoints: the name must never point at data a power loss can take back).
    The file gets the usual permissions (0666 minus the umask), not ``mkstemp``'s 0600, so a
    study directory shared between users stays readable.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:  # name the file the caller writes, not our temporary one
        raise type(e)(e.errno, e.strerror, os.fspath(path)) from None
    try:
        with open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; see :func:`atomic_open`."""
    with atomic_open(path, "w", fsync=fsync) as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically; see :func:`atomic_open`."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def is_atomic_temp(filename: str, target: str) -> bool:
    """Whether ``filename`` is a temporary file that an atomic write of ``target`` (a file name
    in the same directory) left behind."""
    return filename.startswith(f".{target}.") and filename.endswith(TEMP_SUFFIX)


# --- metrics.jsonl records ----------------------------------------------------------------------

def _encode_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    return value


def encode_record(record: Mapping[str, Any]) -> str:
    """One ``metrics.jsonl`` line, newline included: strict JSON, non-finite floats as the
    strings ``"nan"``/``"inf"``/``"-inf"``. Values must be str, int, float, bool or None."""
    return json.dumps({k: _encode_value(v) for k, v in record.items()}, allow_nan=False) + "\n"


def decode_record(line: str) -> Any:
    """The JSON value of one ``metrics.jsonl`` line; in an object, the strings ``"nan"``,
    ``"inf"``, ``"-inf"`` of every key but :data:`TEXT_KEYS` become floats again.

    Raises ``json.JSONDecodeError`` for a malformed (e.g. torn) line.
    """
    value = json.loads(line)
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, str) and v in _NONFINITE and k not in TEXT_KEYS:
                value[k] = _NONFINITE[v]
    return value


def as_int(value: Any) -> int | None:
    """``value`` as an int (a record's ``step``, a seed): None unless it is an int or an
    integral float (``4.0``); a bool is not a number here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def append_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record to a ``metrics.jsonl`` file (created with its directory if needed)."""
    line = encode_record(record)  # encode first: a bad value must not leave half a line
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def truncate_records(path: str | os.PathLike, before_step: int) -> None:
    """Keep only the records of ``path`` with an integer ``step < before_step``, line for line.

    A resumed run or trial replays the steps after its checkpoint; they are dropped here before
    it reports them again. Torn or malformed lines (a writer killed mid-line) go too. A missing
    file stays missing.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    kept = []
    for line in text.splitlines():
        try:
            rec = decode_record(line)
        except json.JSONDecodeError:
            continue
        step = as_int(rec.get("step")) if isinstance(rec, dict) else None
        if step is not None and step < before_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
