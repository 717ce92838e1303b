"""What a ``--resume`` may change: a resumed study runs as it was started (``Tuner.restore``
reuses the pickled searcher, scheduler and run config), so a flag that differs from the
study's record would be silently ignored. :func:`check_resume` refuses such a resume before
Ray starts, listing the differences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ctt.errors import UserError
from ctt.tune.layout import STUDY_JSON

__all__ = ["RESUME_FREE_OPTIONS", "StudyFlagsError", "check_resume", "resume_differences"]

# Options a --resume may change: where Ray and the files are and how much is printed.
RESUME_FREE_OPTIONS = frozenset({"resume", "address", "verbose", "replace_existing", "storage",
                                 "storage_shared", "num_cpus", "sync_every",
                                 "progress_every"})
_RESUME_IGNORED = frozenset({"command", "created", "env", "resumed", "wall_s_runs", "best",
                             "name"})
_RESUME_OPEN_DICTS = ("options.overrides.", "space.")


class StudyFlagsError(UserError):
    """``--resume`` with study flags other than those the study was started with."""


def _flat_record(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}``."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat_record(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def resume_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every study flag a resume would change (:data:`RESUME_FREE_OPTIONS`,
    bookkeeping and the results the study recorded are ignored)."""
    new = json.loads(json.dumps(new, default=str))  # compare as study.json stores values

    def flat(record: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in record.items():
            if key in _RESUME_IGNORED:
                continue
            if key == "options":
                value = {k: v for k, v in value.items() if k not in RESUME_FREE_OPTIONS}
            out.update(_flat_record({key: value}))
        return out

    before, after = flat(old), flat(new)
    # Compared: what this command sets (``new``), and inside the dict-valued flags also what
    # the study set and this command drops (an override or swept parameter removed). A key
    # only the record holds is a result the study wrote (``confirm``, ``best``), not a flag;
    # a key only this command holds inside a dict-valued flag is one it added. A key new
    # outside them is a field newer than the study's record.
    keys = sorted({k for k in after if k in before or k.startswith(_RESUME_OPEN_DICTS)}
                  | {k for k in before if k.startswith(_RESUME_OPEN_DICTS)})
    return [f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}"
            for k in keys if before.get(k, "(unset)") != after.get(k, "(unset)")]


def check_resume(opts: Any, study_dir: Path, payload: dict[str, Any]) -> None:
    """Refuse a ``--resume`` (``opts``: the :class:`~ctt.tune.runtime.StudyOptions`) whose
    flags differ from the study's record in ``study_dir`` (listing them), before Ray starts."""
    path = study_dir / STUDY_JSON
    if not opts.resume or not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return  # a corrupt record is reported where the results are read
    diffs = resume_differences(old, payload)
    if diffs:
        raise StudyFlagsError(
            f"--resume of {study_dir} with flags that differ from the study's: "
            f"{'; '.join(diffs)}. A resumed study runs as it was started: repeat its original "
            "flags, or start a new study with --out NAME")

