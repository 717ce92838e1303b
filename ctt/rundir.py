"""A run (``ctt.train --out``) or a study owns its directory: one writer at a time.

:class:`DirLock` takes an exclusive ``fcntl.flock`` on a lock file inside the directory
(``.run.lock`` or ``.study.lock``) for as long as the run or study lasts; the file holds the
holder's pid, host, start time and command as JSON, so a second run or study on the same
directory fails at once with one line naming the holder.

Choices (the issue is silent on them):

- The lock file stays, emptied, on release (an empty file is a released lock); acquire()
  re-checks after its flock that the path still names the file it locked, so a lock file
  deleted or replaced meanwhile cannot let two processes "own" the directory. A directory the
  lock itself created and that holds nothing else on release is removed (a refused or
  interrupted start leaves no trace).
- Stale locks: the kernel drops a flock when its holder dies, so a lock we can take whose file
  still names a holder was left by a process that died without releasing it (SIGKILL, power
  loss). If that holder ran on this host it is dead by definition, and the lock is taken over
  with a note. If it ran on another host (a shared filesystem), this host cannot check it, and
  some network filesystems do not carry locks between hosts, so the lock is refused with the
  command that clears it.
- A filesystem without lock support (some FUSE mounts) cannot be locked: a note says so and the
  run goes on unprotected rather than refusing storage that works otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ctt.errors import UserError

__all__ = ["RUN_LOCK", "STUDY_LOCK", "DirLock", "DirLockedError"]

RUN_LOCK = ".run.lock"
STUDY_LOCK = ".study.lock"


class DirLockedError(UserError):
    """Another process (alive, or dead on another host) owns the directory."""


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, (int, float)) else "an unknown time")
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}"


class DirLock:
    """Exclusive lock of ``directory`` (created if missing) through ``directory/name``.

    Args:
        directory: the run or study directory.
        name: the lock file's name (:data:`RUN_LOCK`, :data:`STUDY_LOCK`).
        what: "run" or "study", for messages.

    Use as a context manager, or :meth:`acquire` / :meth:`release`. Raises
    :class:`DirLockedError` when another process holds it.
    """

    def __init__(self, directory: str | os.PathLike[str], name: str, what: str = "run"):
        self.directory = Path(directory)
        self.path = self.directory / name
        self.what = what
        self._fd: int | None = None
        self._created: list[Path] = []  # directories acquire() made, innermost first
        # what the lock file said when acquire() took it over from a process that is gone
        self.previous: dict[str, Any] = {}
        self._info: dict[str, Any] = {}

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def holder(self) -> dict[str, Any]:
        """The JSON the lock file holds ({} when empty or unreadable)."""
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> None:
        if self._fd is not None:
            return
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"{self.directory} is a file, not a directory: choose another --out")
        missing = self.directory.resolve()
        self._created = []
        while not missing.exists():
            self._created.append(missing)
            missing = missing.parent
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self.holder()
                who = _describe(holder) if holder else "another process (starting up)"
                raise DirLockedError(
                    f"{self.what} directory {self.directory} is in use by {who} "
                    f"({self.path}): wait for it to end or stop it, or choose another --out"
                ) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                print(f"note: cannot lock {self.path} ({e.strerror}); make sure no other run "
                      f"or study writes to {self.directory}", file=sys.stderr, flush=True)
                return
            # The file may have been replaced between open and flock: lock the current one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        previous = self.holder()
        self.previous = previous
        if previous.get("pid") is not None:
            if previous.get("host") != socket.gethostname():
                self.release(clear=False)
                raise DirLockedError(
                    f"{self.what} directory {self.directory} was locked by "
                    f"{_describe(previous)}, which this host cannot check: if it no longer "
                    f"runs, clear the lock with `rm {shlex.quote(str(self.path))}` and retry")
            print(f"note: taking over the stale lock of {_describe(previous)} on "
                  f"{self.directory} (that process is gone)", file=sys.stderr, flush=True)
        self._info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                      "command": shlex.join(sys.argv)}
        self._write(self._info)

    def annotate(self, **fields: Any) -> None:
        """Add ``fields`` to what the held lock file says (read back from :attr:`previous`
        by whoever takes the lock over after this process is gone)."""
        if self._fd is not None:
            self._info.update(fields)
            self._write(self._info)

    def _write(self, info: dict[str, Any]) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self, clear: bool = True) -> None:
        """Empty the lock file (a released lock) and unlock it. A directory that acquire()
        created and that holds nothing but the lock file (the run or study was refused or
        stopped before writing anything) is removed again, lock file and all."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if clear:
                os.ftruncate(fd, 0)
            if self._created:
                self._remove_created()
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def _remove_created(self) -> None:
        with contextlib.suppress(OSError):
            if [p.name for p in self.directory.iterdir()] != [self.path.name]:
                return
            # Safe while holding the lock: a process that opened the file meanwhile finds it
            # unlinked after its flock (the inode check in acquire) and starts over.
            self.path.unlink()
            for made in self._created:
                made.rmdir()  # OSError once a directory holds something else: stop there
