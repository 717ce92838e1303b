"""An ablation grid as one Tune experiment: longest trials first, warm-ups pipelined.

:class:`GridSearcher` hands Tune a fixed list of trial configs (the variants x seeds grid of
:func:`ctt.tune.ablation.run_ablation`) in priority order, so no core waits while work is left:

- **Warm-ups first, then longest-first.** The shared supervised warm-up of each seed is a trial
  of its own (``variant="warmup"``) at the head of the list; the variant trials follow, ordered
  by their estimated cost (:func:`relative_cost`, most expensive first, seeds interleaved), so
  the long trials start early and the short ones fill the slots at the end (list scheduling,
  longest processing time first).
- **A variant starts as soon as its seed's warm-up is done.** A variant trial that forks a
  warm-up (``_fork_from``) waits in the list until that warm-up trial has completed; the other
  slots meanwhile run whatever is ready (another seed's warm-up or variants). There is no
  barrier between warm-ups and variants: both run in the same Tuner.
- **Warm-up checkpoints at known places.** A warm-up trial writes its final state to the
  directory its config names (``_publish``, e.g. ``<study>/warmup/seed-0``, a local path or a
  storage URI) before its last report; the forks read it from there (``_fork_from``).
  ``warmup.json`` (driver-local) maps each seed whose warm-up is done to that directory.

Restorable: Tune saves the searcher with every experiment snapshot (the list still to start,
the trials running, the warm-ups done) and ``Tuner.restore`` loads it, so ``--resume`` starts
each trial once and releases the variants of a warm-up that finished before the interruption.
A warm-up whose checkpoint is already published (finished, but its completion not in the
snapshot) counts as done. A warm-up that fails for good (NaN loss, or crashes beyond
``max_failures``) drops its seed's variants; :attr:`GridSearcher.failed` names it.

Ray 2.60 creates at most one pending trial at a time for a custom searcher: a freed slot is
filled on the controller's next step, not at once.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from ctt.config import VARIANTS
from ctt.fileio import atomic_write_text
from ctt.tune.layout import WARMUP
from ctt.tune.storage import is_uri, join_uri, local_path, portable_path
from ctt.tune.trainable import CHECKPOINT_FILE

__all__ = ["WARMUP_VARIANT", "GridItem", "GridSearcher", "longest_first", "published",
           "relative_cost", "warmup_dir"]

WARMUP_VARIANT = "warmup"


def relative_cost(config: dict[str, Any]) -> float:
    """Estimated cost of one iteration of a flat trial config, in image forwards.

    Counts what :func:`ctt.step.train_step` runs: each student's forward + backward (about 3
    forwards) on the labeled batch and, with unsupervised terms, the unlabeled batch; each
    teacher's labelling forward on the unlabeled batch and, with banks, its bank forward on
    the labeled batch; each contrast term about one forward of the labeled batch per pair.
    Fitted to ``estimate_seconds_per_step`` of the tiny preset on a 2-core machine
    (supervised 25 ms, mean_teacher 55, dual_self/cross 105-110, cross_hc/cross_lc 142-157,
    ctt 175), where one unit is about 1 ms. Only the order matters here."""
    pairs = int(config.get("method.pairs", 1))
    b, b_u = int(config.get("data.batch_size", 1)), int(config.get("data.batch_size_u", 1))
    unsup = config.get("method.unsup", "none") != "none"
    lam_h, lam_l = float(config.get("method.lambda_h", 0)), float(config.get("method.lambda_l", 0))
    banks = unsup and (lam_h > 0 or lam_l > 0)
    per_pair = 3 * (b + (b_u if unsup else 0))
    if unsup:
        per_pair += b_u + (b if banks else 0)
        per_pair += b * ((lam_h > 0) + (lam_l > 0 and pairs == 2))
    return float(pairs * per_pair)


def _variant_rank(variant: str) -> int:
    """Position in the paper's table (later rows add parts): the tie-break between equal
    costs, later first (``cross`` before ``dual_self``, ``cross_lc`` before ``cross_hc``)."""
    names = list(VARIANTS)
    return names.index(variant) if variant in names else -1


def longest_first(configs: list[dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """``configs`` (flat trial configs with ``variant`` and ``seed``) by decreasing
    :func:`relative_cost` x iterations left (``optim.iters``, less the warm-up when the trial
    forks one); ties by the variant's table position (later first), then by seed in
    ``seeds`` order. Stable and deterministic."""
    order = {s: i for i, s in enumerate(seeds)}

    def key(c: dict[str, Any]) -> tuple[float, int, int]:
        iters = int(c.get("optim.iters", 1))
        if c.get("_fork_from"):
            iters -= int(c.get("method.warmup_iters", 0))
        return (-relative_cost(c) * max(iters, 1), -_variant_rank(str(c.get("variant"))),
                order.get(c.get("seed"), len(order)))

    return sorted(configs, key=key)


def warmup_dir(storage_path: str, seed: int) -> str:
    """Where the shared warm-up of ``seed`` publishes its checkpoint (``state.pt``)."""
    return join_uri(storage_path, WARMUP, f"seed-{seed}")


def published(path: str) -> bool:
    """Whether a warm-up checkpoint directory (local path or storage URI) holds its state."""
    try:
        if is_uri(path):
            import pyarrow.fs

            fs, where = pyarrow.fs.FileSystem.from_uri(path)
            info = fs.get_file_info(f"{where.rstrip('/')}/{CHECKPOINT_FILE}")
            return info.type == pyarrow.fs.FileType.File
        return (Path(path) / CHECKPOINT_FILE).is_file()
    except Exception:  # noqa: BLE001 - an unreachable store means "not there yet"
        return False


@dataclass
class GridItem:
    """One trial of the grid. ``after``: the key of the warm-up it forks (it waits for it);
    ``publish``: for a warm-up, the directory it writes its checkpoint to; ``until``: the
    step a warm-up must reach."""

    key: str
    config: dict[str, Any]
    after: str | None = None
    publish: str | None = None
    until: int = 0
    seed: Any = None
    # iterations the trial trains (a fork: after its warm-up): its cost is iters x s/step
    iters: int = 0


class GridSearcher(Searcher):
    """Yields the grid's configs in order, each variant fork once its warm-up is done (see
    module docstring). ``max_concurrent`` (0 = no limit) caps the trials running at once.

    ``record``: a driver-local JSON file mapping seed -> published warm-up directory, rewritten
    whenever a warm-up is done; ``failures``: a driver-local JSON file mapping warm-up key ->
    reason, rewritten when a warm-up fails for good."""

    def __init__(self, items: list[GridItem], *, max_concurrent: int = 0,
                 record: str | None = None, failures: str | None = None,
                 budget: float | None = None):
        super().__init__()
        self.pending = list(items)
        self.warmups = {i.key: i for i in items if i.publish}
        self.max_concurrent = int(max_concurrent)
        self.record, self.failures = record, failures
        self.live: dict[str, str] = {}  # trial id -> item key
        self.ready: dict[str, str] = {}  # warm-up key -> published directory
        self.failed: dict[str, str] = {}  # warm-up key -> reason
        self.dropped: list[str] = []  # keys never started: their warm-up failed
        # --budget: the cap, the estimates of the running trials, the spend of the ended ones
        # (measured where they reported it) and the keys never started because they did not fit
        self.budget = budget
        self.live_cost: dict[str, float] = {}
        self.spent = 0.0
        self.over_budget: list[str] = []
        self._adopt_published()

    # --- Searcher API ---------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None,
                              config: dict, **spec: Any) -> bool:
        return True  # the grid is fixed; Tune's metric/mode do not change it

    def suggest(self, trial_id: str) -> dict | None:
        if self.max_concurrent and len(self.live) >= self.max_concurrent:
            return None
        while True:
            # a fork of a failed warm-up, or of one never started for the budget, never runs
            gone = set(self.failed) | set(self.over_budget)
            self.dropped += [i.key for i in self.pending if i.after in gone]
            self.pending = [i for i in self.pending if i.after not in gone]
            if not self.pending and not self.live and self._next_round():
                continue
            index = next((n for n, item in enumerate(self.pending)
                          if item.after is None or item.after in self.ready), None)
            if index is None:
                return Searcher.FINISHED if not self.pending and not self._round_may_follow() \
                    else None
            item = self.pending[index]
            if not self._fits(item):
                if self.live:
                    return None  # what the running trials really cost may leave room
                del self.pending[index]
                self.over_budget.append(item.key)
                continue
            del self.pending[index]
            self.live[trial_id] = item.key
            self.live_cost[trial_id] = self._cost(item)
            return dict(item.config)

    # --- hooks for a planned study (ctt.tune.adaptive) -------------------------------------
    def _next_round(self) -> bool:
        """Called when nothing is pending or running: add the next round's items to
        ``pending`` and return True, or return False when the study is complete."""
        return False

    def _round_may_follow(self) -> bool:
        """Whether a next round may still come once the running trials end (their results
        decide it): then Tune is told to wait, not that the search is finished."""
        return False

    def _cost(self, item: GridItem) -> float:
        """``item``'s estimated compute in the budget's unit (0 here: no cost model)."""
        return 0.0

    def _fits(self, item: GridItem) -> bool:
        """Whether starting ``item`` keeps the committed compute (spent + running estimates)
        within the budget."""
        if self.budget is None:
            return True
        return self.spent + sum(self.live_cost.values()) + self._cost(item) <= self.budget

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if result is None and not error:
            return  # removed while pending (an experiment stopping): it is resumed later
        key = self.live.pop(trial_id, None)
        estimate = self.live_cost.pop(trial_id, 0.0)
        if key is not None:
            self._trial_ended(key, result, error, estimate)
        item = self.warmups.get(key) if key is not None else None
        if item is None:
            return
        step = (result or {}).get("step")
        if not error and result and result.get("error") is None and step is not None \
                and int(step) >= item.until and published(str(item.publish)):
            self.ready[item.key] = str(item.publish)
            self._write_record()
        else:
            reason = (result or {}).get("error") or ("the trial failed" if error else
                                                     f"it stopped at step {step}")
            self.failed[item.key] = f"warm-up of seed {item.seed} failed: {reason}"
            self._write(self.failures, self.failed)

    def _trial_ended(self, key: str, result: dict | None, error: bool, estimate: float) -> None:
        """Count an ended trial's spend: its estimate (a planned study measures instead)."""
        self.spent += estimate

    # --- state ----------------------------------------------------------------------------
    # The driver-local files travel relative to a URI study's staging root, so a resume on a
    # head with another $CTT_STAGING writes them to its own copy (ctt.tune.storage).
    _PATHS = ("record", "failures")

    def get_state(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update({k: portable_path(state[k]) for k in self._PATHS if state.get(k)})
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.update({k: local_path(state[k]) for k in self._PATHS if state.get(k)})
        self.__dict__.update(state)
        self._adopt_published()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    # --- helpers ----------------------------------------------------------------------------
    def _adopt_published(self) -> None:
        """A warm-up whose checkpoint is published is done, whatever the snapshot says (it
        finished after the last snapshot, or in an earlier run of the study)."""
        changed = False
        for key, item in self.warmups.items():
            if key not in self.ready and key not in self.failed and published(str(item.publish)):
                self.ready[key] = str(item.publish)
                self.live = {t: k for t, k in self.live.items() if k != key}
                changed = True
        # nothing left to do for a published warm-up that has not started (an earlier run of
        # this study got that far before its first experiment snapshot)
        self.pending = [i for i in self.pending if i.key not in self.ready]
        if changed:
            self._write_record()

    def _write_record(self) -> None:
        self._write(self.record, {str(self.warmups[k].seed): p for k, p in self.ready.items()})

    @staticmethod
    def _write(path: str | None, data: dict[str, str]) -> None:
        if not path:
            return
        try:
            atomic_write_text(Path(path), json.dumps(dict(sorted(data.items())), indent=2)
                              + "\n")
        except OSError:  # these files are for people; the searcher's own state is what counts
            pass
