"""Where a sweep keeps its Optuna study: a journal file in the study directory, or a database.

Default: Optuna's journal storage, ``<study_dir>/optuna.journal``. It is an append-only log
of JSON lines (one per storage operation), so it survives the loss of the head wherever the
study directory does:

- local or ``--storage-shared`` storage: the study directory is the storage, the journal is
  written there directly. Appends take ``JournalFileOpenLock`` (``O_CREAT | O_EXCL`` lock
  file, NFSv3+); only the study's driver writes (the study directory is locked), the lock
  guards against a reader such as ``optuna-dashboard`` that writes notes.
- URI storage (``s3://...``): the study directory is a local staging copy that is uploaded
  while the study runs and restored on ``--resume``. A copy taken at any moment is a prefix
  of the log; at worst its last line is torn, and :func:`repair_journal` cuts it before the
  journal is opened again (otherwise the next append would glue a record onto it and every
  later read would fail).

``--optuna-storage URL`` uses a database instead (``sqlite:///``, ``postgresql://``,
``mysql://``: Optuna's ``RDBStorage``). It is opened before Ray starts; one that cannot be
opened is one :class:`OptunaStorageError` line. ``study.json`` records it with the password
masked (:func:`mask_url`).

Either way the sweep writes a sqlite snapshot ``<study_dir>/optuna.db`` when it ends
(:func:`export_sqlite`), which the results (parameter importances) and
``optuna-dashboard sqlite:///<study>/optuna.db`` read. ``optuna-dashboard
<study>/optuna.journal`` serves the live journal while the sweep runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import optuna

from ctt.errors import UserError, one_line

__all__ = ["OptunaStorageError", "export_sqlite", "mask_url", "open_journal",
           "open_url", "repair_journal"]

URL_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")

log = logging.getLogger(__name__)
# scheme://user:password@ — group 1 up to the user, group 2 the password
_PASSWORD = re.compile(r"^([\w+.-]+://[^/@:]*):([^@/]*)@")


class OptunaStorageError(UserError, ValueError):
    """``--optuna-storage`` is not a database URL Optuna can open."""


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for study.json and messages)."""
    return _PASSWORD.sub(r"\1:***@", url)


def repair_journal(path: str | os.PathLike) -> int:
    """Cut the journal at ``path`` after its last whole, valid JSON line; returns the bytes cut.

    A copy taken while a line was being appended ends in a torn line. Optuna skips a torn
    *last* line when reading, but the next append lands after it, and the merged line then
    breaks every later read. Everything after the first bad line is cut (the log is
    append-only: later lines may depend on the lost one)."""
    path = Path(path)
    if not path.exists():
        return 0
    good = 0
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                json.loads(line)
            except ValueError:
                break
            good += len(line)
    size = path.stat().st_size
    if good < size:
        with path.open("r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
        log.warning("cut %d bytes of a torn record off the end of %s", size - good, path)
    return size - good


def open_journal(path: str | os.PathLike):
    """Optuna ``JournalStorage`` on the file ``path`` (created if missing), repaired first
    (:func:`repair_journal`). Call with the study directory locked: the lock file a driver
    killed mid-append leaves is removed (only the study's driver appends; a reader such as
    optuna-dashboard takes the lock for milliseconds, to write a note)."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_journal(path)
    Path(str(path) + ".lock").unlink(missing_ok=True)
    return optuna.storages.JournalStorage(
        JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def open_url(url: str):
    """Optuna ``RDBStorage`` for a database URL; :class:`OptunaStorageError` (one line, the
    password masked) when it is not one or cannot be opened."""
    shown = mask_url(url)
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    if scheme not in URL_SCHEMES:
        raise OptunaStorageError(
            f"--optuna-storage {shown!r} is not a database URL: give sqlite:///PATH, "
            "postgresql://USER@HOST/DB or mysql://USER@HOST/DB, the password in PGPASSWORD or "
            "~/.pgpass (without the flag the sweep keeps a journal file in the study "
            "directory)")
    match = _PASSWORD.match(url)
    password = match.group(2) if match else ""
    cls = _MaskedRDBStorage if password else optuna.storages.RDBStorage
    try:
        return cls(url)
    except Exception as e:  # noqa: BLE001 - driver missing, bad URL, server down: one line
        text = one_line(e)
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ImportError):  # Optuna's "Failed to import DB access module"
            driver = "psycopg[binary]" if scheme == "postgresql" else "the database's driver"
            text += f" ({one_line(cause)}; pip install '{driver}' on the head)"
        if password:
            text = text.replace(password, "***")
        raise OptunaStorageError(
            f"--optuna-storage {shown!r} cannot be opened ({type(e).__name__}: "
            f"{text[:300]}): check the URL, the database server and its Python driver"
        ) from None


class _MaskedRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose pickled form masks the URL's password and never reconnects.

    Tune pickles the searcher, and with it its storage, into the experiment state that lives
    in the study's storage: the password must not go there. Unpickled, the storage is
    detached (no engine); ``run_sweep`` hands a restored searcher the storage it opened
    (``PruningAwareOptunaSearch.restoring_into``)."""

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["url"] = mask_url(state["url"])
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def export_sqlite(storage, study_name: str, dest: str | os.PathLike) -> Path:
    """Copy the study ``study_name`` of ``storage`` into a new sqlite file ``dest`` (replaced
    whole: written next to it, then renamed, so a reader never sees half a database)."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    optuna.copy_study(from_study_name=study_name, from_storage=storage,
                      to_storage=f"sqlite:///{tmp}", to_study_name=study_name)
    os.replace(tmp, dest)
    return dest
