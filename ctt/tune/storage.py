"""Study storage: URI helpers and the sync of a study's driver-side files to URI storage.

With ``--storage`` a URI (``s3://bucket/prefix``, ``gs://...``; any URI that
``pyarrow.fs.FileSystem.from_uri`` reads, query string included, e.g.
``s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http``), Tune writes its
experiments (``ray/``, ``ray-warmup/``, ``ray-confirm/``) and the trials write the shared
warm-ups (``warmup/``) straight to ``<storage>/<name>/``, while the driver's own files
(``study.json``, ``trials/``, ``tb/``, the tables, ``report.md``, plots, a sweep's Optuna files,
``confirm/``) are written in a local staging directory (``$CTT_STAGING/<name>``) and copied
by :class:`StudySync`:

- :meth:`StudySync.push` uploads every file of the staging directory that changed (size or
  mtime) since the last push, and deletes from storage the files it uploaded that are gone
  locally (a TensorBoard HParams file is replaced by one of another name). Each object is
  written whole: an S3 put (or a multipart upload's completion) is atomic, so a reader sees
  the old object or the new one, never half of one. Skipped: the study lock, any ``*.lock``
  (e.g. Optuna's journal lock), atomic-write temporaries (``.<name>.<pid>.<hex>.tmp``),
  symlinks, and the top-level directories of :data:`STORAGE_ONLY`.
- :meth:`StudySync.pull` downloads the driver-side files from storage into the staging
  directory (``--resume`` on a new head, ``python -m ctt.tune.results <uri>``), never the
  directories of :data:`STORAGE_ONLY` (Tune reads its experiment from the URI). It reads
  each object with :func:`read_object`: pyarrow's S3 reader takes an object's size from a
  HEAD request and then reads that many bytes, so a read that races an overwrite can return
  the new object cut at the old one's length; the size is checked again after the read.

The study pushes on every trial end and at least every ``--sync-every`` seconds
(:class:`ctt.tune.callbacks.StudySyncCallback`, on Tune's driver loop, after the logger
callback wrote) and once more at its end. A callback is pickled with Tune's experiment and
restored with it, so it names its study only; it finds the study's :class:`StudySync` in this
process's registry (:func:`register`, :func:`active`), which the running study fills. The
driver-local paths that Tune's pickled state does hold (the logger callback's study directory,
the grid searcher's warm-up records) travel relative to the staging root
(:func:`portable_path`), so a resume on a head with another ``$CTT_STAGING`` writes to its own.
A resume whose staging directory still holds the study (the same head) keeps it and pulls
nothing: it is as new as what it pushed, or newer.

No Ray import here: ``ctt.tune.results`` uses this module on machines without Ray.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ctt.errors import UserError
from ctt.fileio import TEMP_SUFFIX, atomic_write_bytes
from ctt.rundir import STUDY_LOCK
from ctt.tune.layout import STORAGE_ONLY

__all__ = ["RAY_JOB_ENV", "STORAGE_ONLY", "StorageError", "StudySync", "active", "alive_nodes",
           "check_job_storage", "check_storage", "is_uri", "join_uri", "local_path",
           "portable_path", "push_study_files", "read_object", "register", "staging_root",
           "syncable", "unregister"]

_CHUNK = 8 * 1024**2
_STAGED = "$CTT_STAGING"


def staging_root() -> Path:
    """Where URI studies stage their driver-side files: ``$CTT_STAGING``, by default
    ``~/.cache/ctt/studies`` (resolved)."""
    default = Path.home() / ".cache" / "ctt" / "studies"
    return Path(os.environ.get("CTT_STAGING", default)).resolve()


def portable_path(path: str) -> str:
    """``path`` with the staging root written as ``$CTT_STAGING`` when it lies below it: the
    form a driver-side path takes in Tune's pickled experiment (callbacks, searcher), so that
    a resume on a head with another staging root writes to its own (:func:`local_path`)."""
    root = staging_root()
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return path
    return f"{_STAGED}/{rel.as_posix()}" if rel.parts else _STAGED


def local_path(path: str) -> str:
    """The inverse of :func:`portable_path`, on this process's staging root."""
    if path == _STAGED or path.startswith(f"{_STAGED}/"):
        return str(staging_root().joinpath(*path[len(_STAGED):].split("/")))
    return path


def is_uri(storage: str) -> bool:
    """Whether ``storage`` is a URI (``scheme://...``) rather than a local or NFS path."""
    return "://" in storage


def join_uri(base: str, *parts: str) -> str:
    """``base`` / ``parts``, keeping a URI's query string at the end:
    ``join_uri("s3://b/p?endpoint_override=h:1&scheme=http", "name")`` is
    ``"s3://b/p/name?endpoint_override=h:1&scheme=http"``. A local path is joined with ``/``.
    Empty parts and slashes at the seams are dropped."""
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not is_uri(base):
        return f"{base.rstrip('/')}/{tail}" if tail else base
    u = urllib.parse.urlsplit(base)
    path = f"{u.path.rstrip('/')}/{tail}" if tail else u.path
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment))


def syncable(rel: str) -> bool:
    """Whether the study file at ``rel`` (relative, ``/``-separated) is synced: not in a
    :data:`STORAGE_ONLY` directory, not a lock (the study's, Optuna's), not an atomic-write
    temporary."""
    parts = rel.split("/")
    name = parts[-1]
    if parts[0] in STORAGE_ONLY and len(parts) > 1:
        return False
    if name == STUDY_LOCK or name.endswith(".lock"):
        return False
    return not (name.startswith(".") and name.endswith(TEMP_SUFFIX))


def read_object(fs: Any, path: str, tries: int = 5) -> bytes:
    """The whole object at ``path`` on the ``pyarrow.fs`` filesystem ``fs``, read again
    while its size after the read differs from what was read (an overwrite raced the read;
    see the module docstring). Raises ``OSError`` if it never settles."""
    for _ in range(tries):
        with fs.open_input_stream(path) as f:
            data = f.readall()
        if fs.get_file_info(path).size == len(data):
            return data
        time.sleep(0.05)
    raise OSError(f"{path} kept changing while it was read ({tries} tries)")


class StudySync:
    """Copies a study's driver-side files between ``local_dir`` (the staging directory) and
    ``remote`` (``<storage>/<name>``, a URI), see the module docstring.

    Args:
        local_dir: the staging study directory.
        remote: the study's URI in storage.
        every: seconds between the timed pushes (:meth:`due`); 0 pushes at every check.
    """

    def __init__(self, local_dir: str | os.PathLike, remote: str, every: float = 60.0) -> None:
        self.local_dir = Path(local_dir)
        self.remote = remote
        self.every = float(every)
        self.last_push = time.monotonic()
        self.uploads = 0  # objects written so far (tests, logs)
        self._fs: Any = None
        self._root = ""
        # relative path -> (size, mtime_ns) of the local file as last pushed or pulled
        self._state: dict[str, tuple[int, int]] = {}

    def _filesystem(self) -> tuple[Any, str]:
        if self._fs is None:
            import pyarrow.fs

            self._fs, root = pyarrow.fs.FileSystem.from_uri(self.remote)
            self._root = root.rstrip("/")
        return self._fs, self._root

    def _local_files(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        if not self.local_dir.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(self.local_dir):
            rel_dir = os.path.relpath(dirpath, self.local_dir)
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d not in STORAGE_ONLY]
            for name in filenames:
                rel = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                path = os.path.join(dirpath, name)
                if not syncable(rel) or os.path.islink(path):
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:  # removed while we walked
                    continue
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def changed(self) -> list[str]:
        """The files that :meth:`push` would upload now (new or changed since the last
        push or pull)."""
        return sorted(rel for rel, st in self._local_files().items()
                      if self._state.get(rel) != st)

    def due(self) -> bool:
        """Whether ``every`` seconds have passed since the last push."""
        return time.monotonic() - self.last_push >= self.every

    def push(self) -> int:
        """Upload the changed files, delete the vanished ones; returns the objects written
        or deleted. Raises ``OSError`` when storage refuses (the state of a file that was
        not written stays unsynced, so the next push retries it)."""
        import pyarrow.fs

        self.last_push = time.monotonic()
        fs, root = self._filesystem()
        local = self._local_files()
        done = 0
        for rel, st in sorted(local.items()):
            if self._state.get(rel) == st:
                continue
            try:
                self._upload(fs, self.local_dir / rel, f"{root}/{rel}")
            except FileNotFoundError:  # removed since the walk: the next push deletes it
                continue
            # the stat from before the read: a file that changed while it was read differs
            # from it and goes up again next time
            self._state[rel] = st
            done += 1
        for rel in sorted(set(self._state) - set(local)):
            try:
                fs.delete_file(f"{root}/{rel}")
            except OSError:  # already gone is fine (pyarrow's error type varies by store)
                if fs.get_file_info(f"{root}/{rel}").type != pyarrow.fs.FileType.NotFound:
                    raise
            del self._state[rel]
            done += 1
        self.uploads += done
        return done

    @staticmethod
    def _upload(fs: Any, src: Path, dest: str) -> None:
        import pyarrow.fs

        with open(src, "rb") as f:
            if isinstance(fs, pyarrow.fs.LocalFileSystem):  # file:// storage: rename into place
                fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
                tmp = f"{dest}.{os.getpid()}{TEMP_SUFFIX}"
                with fs.open_output_stream(tmp) as out:
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)
                fs.move(tmp, dest)
                return
            # An object store makes the object visible when the stream closes (one put, or a
            # multipart upload's completion): whole or not at all.
            with fs.open_output_stream(dest) as out:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)

    def pull(self, skip: Iterable[str] = STORAGE_ONLY) -> int:
        """Download every syncable file under ``remote`` (not under the top-level ``skip``
        directories) into ``local_dir``, replacing local copies; returns the files written.
        Each file is written atomically (:func:`ctt.fileio.atomic_write_bytes`)."""
        import pyarrow.fs

        fs, root = self._filesystem()
        skip = set(skip)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True,
                                                         allow_not_found=True))
        n = 0
        for info in infos:
            if info.type != pyarrow.fs.FileType.File:
                continue
            rel = info.path[len(root):].lstrip("/")
            if not rel or rel.split("/")[0] in skip or not syncable(rel):
                continue
            dest = self.local_dir / rel
            atomic_write_bytes(dest, read_object(fs, info.path))
            st = dest.stat()
            self._state[rel] = (st.st_size, st.st_mtime_ns)
            n += 1
        return n

    def exists(self, rel: str) -> bool:
        """Whether storage holds the study file ``rel``."""
        import pyarrow.fs

        fs, root = self._filesystem()
        return fs.get_file_info(f"{root}/{rel}").type == pyarrow.fs.FileType.File


# The StudySync of each study running in this process, by study name (see module doc).
_ACTIVE: dict[str, StudySync] = {}


def register(name: str, sync: StudySync) -> None:
    """Make ``sync`` the one the callbacks of study ``name`` push with."""
    _ACTIVE[name] = sync


def unregister(name: str) -> None:
    _ACTIVE.pop(name, None)


def active(name: str) -> StudySync | None:
    """The registered :class:`StudySync` of study ``name`` (None: not a URI study, or not
    running in this process)."""
    return _ACTIVE.get(name)


# --- checks of a study's storage ---

class StorageError(UserError, RuntimeError):
    """Study storage is unusable for this cluster (e.g. node-local storage, several nodes)."""


def alive_nodes() -> int:
    """Nodes of the Ray cluster this process joined that are alive."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_storage(storage: str, shared: bool, autoscaler: str | None = None) -> None:
    """Refuse a plain local path on a multi-node cluster unless declared shared: trials that
    move between nodes must find their checkpoints (this cannot be probed on one machine).
    ``autoscaler``: the config of an autoscaler that may add nodes to a cluster that is one
    node now."""
    if is_uri(storage) or shared:
        return
    n = alive_nodes()
    if n > 1 or autoscaler:
        cluster = (f"the cluster has {n} alive nodes" if n > 1 else
                   f"the cluster's autoscaler ({autoscaler}) adds worker nodes")
        raise StorageError(
            f"--storage {storage!r} is a node-local path but {cluster}; trials on other nodes "
            "would write their checkpoints and results where neither a restarted trial nor "
            "the study finds them. Pass shared storage (--storage s3://bucket/prefix, gs://..., "
            "or an NFS path with --storage-shared).")


# Set by Ray's job supervisor for the entrypoint of `ray job submit` (only there).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_job_storage(storage: str) -> None:
    """Refuse a relative local ``--storage`` in a ``ray job submit`` driver: its working
    directory is Ray's temporary copy of ``--working-dir`` under the head's session directory
    (a new one per submission), so the study would be written where neither a ``--resume``
    nor a reader finds it, and lost with the head."""
    if (is_uri(storage) or Path(storage).expanduser().is_absolute()
            or RAY_JOB_ENV not in os.environ):
        return
    raise StorageError(
        f"--storage {storage!r} is a relative path and this study runs as a Ray job: its "
        f"working directory {os.getcwd()} is Ray's (a temporary copy of --working-dir). "
        "Pass shared storage by an absolute path (an NFS mount, with --storage-shared) or a "
        "URI (s3://bucket/prefix).")


def push_study_files(name: str) -> None:
    """Push the changed driver-side files of the running URI study ``name`` to storage
    (nothing for a local study, whose directory is the storage)."""
    sync = active(name)
    if sync is None:
        return
    try:
        sync.push()
    except OSError as e:
        raise StorageError(f"pushing the study's files to {sync.remote} failed ({e}); they "
                           f"are in {sync.local_dir}") from e
