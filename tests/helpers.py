"""Plain helpers shared by test files (fixtures live in tests/conftest.py).

tests/ is not a package: pytest puts tests/ on ``sys.path`` (for tests/conftest.py), so a test
file here or in tests/scenarios/ imports this module by name, ``from helpers import ...``, as it
does tests/real_layouts.py and tests/tb_events.py. Imports of ``ctt`` happen inside the
functions, so importing this module costs nothing and needs no optional extra.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# keys of a metrics record that differ between two runs of the same config and seed: the
# trial's id and the host it ran on (wall-clock values are the ``time/*`` keys)
RUN_SPECIFIC_KEYS = ("trial_id", "hostname", "node_ip")


def load_script(name: str) -> ModuleType:
    """Import ``studies/<name>.py`` (a script, not a package) as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"_study_{name}",
                                                  REPO_ROOT / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deterministic(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record without its wall-clock (``time/*``) and run-specific keys: what two
    runs of the same config and seed must agree on bit for bit."""
    return {k: v for k, v in record.items()
            if not k.startswith("time/") and k not in RUN_SPECIFIC_KEYS}


def read_trial_metrics(study: Path, trial_id: str) -> list[dict[str, Any]]:
    """The records of ``<study>/trials/<trial_id>/metrics.jsonl`` as written (no dedupe); an
    empty list while the file does not exist yet."""
    path = study / "trials" / trial_id / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_trials_parquet(study: Path) -> list[dict[str, Any]]:
    """The rows of ``<study>/trials.parquet`` (one per trial)."""
    import pyarrow.parquet as pq

    return pq.read_table(study / "trials.parquet").to_pylist()


def tiny_config(base: dict[str, Any], variant: str = "ctt", **flat: Any) -> Any:
    """The ``tiny`` preset with the flat keys ``base``, then ``variant``, then ``flat`` (keyword
    names with ``__`` for ``.``: ``optim__iters=6``)."""
    from ctt.config import PRESETS, apply_variant

    cfg = apply_variant(PRESETS["tiny"].override(base), variant)
    return cfg.override({k.replace("__", "."): v for k, v in flat.items()})


def optuna_trials_by_tune_id(study: Any) -> dict[str | None, list[Any]]:
    """The Optuna study's trials grouped by the Tune trial id they record (``None``: a trial
    that records none); a Tune trial told twice shows as a list of two."""
    import collections

    from ctt.tune.optuna_search import TUNE_TRIAL_ID_ATTR

    by_tune_id: dict[str | None, list[Any]] = collections.defaultdict(list)
    for trial in study.get_trials(deepcopy=False):
        by_tune_id[trial.user_attrs.get(TUNE_TRIAL_ID_ATTR)].append(trial)
    return by_tune_id


def tune_snapshot(searcher: Any, scheduler: Any, path: Path) -> Callable[..., tuple[Any, Any]]:
    """What Tune keeps of a study: the tuner pickle (searcher + scheduler, before fit) and the
    searcher's periodic save at ``path``. Returns ``restore(storage=None)``, which restores both
    as ``Tuner.restore`` does: a new (searcher, scheduler) pair, the searcher reloaded from its
    save, onto ``storage`` (an Optuna storage) when one is given."""
    import pickle

    pickled = pickle.dumps((searcher, scheduler))
    searcher.save(str(path))

    def restore(storage: Any = None) -> tuple[Any, Any]:
        restored_searcher, restored_scheduler = pickle.loads(pickled)
        if storage is None:
            restored_searcher.restore(str(path))
        else:
            from ctt.tune.optuna_search import PruningAwareOptunaSearch

            with PruningAwareOptunaSearch.restoring_into(storage):
                restored_searcher.restore(str(path))
        return restored_searcher, restored_scheduler

    return restore


def alive_with_descendants(found: dict[int, Any], skip: frozenset[int] | set[int] = frozenset()
                           ) -> list[Any]:
    """The ``psutil`` processes ``found`` (by pid) and all their descendants, except the pids
    in ``skip``, without those already gone or zombies: what a test must stop by PID."""
    import contextlib

    import psutil

    found = dict(found)
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in p.children(recursive=True):
                if child.pid not in skip:
                    found.setdefault(child.pid, child)
    alive = []
    for p in found.values():
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive

