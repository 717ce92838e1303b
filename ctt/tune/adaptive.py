"""An ablation that decides: seeds added in rounds where a question is still open, and a
compute budget no trial may push the study past.

:class:`PlannedGridSearcher` extends the grid searcher (:mod:`ctt.tune.grid`) of one Tune
experiment. It starts the initial seeds like a fixed study; when a round has ended it replays
the looks from the results alone (:func:`ctt.tune.sequential.replay`) and, while a question is
open and seeds remain, releases the next seed for the variants the open questions need (its
shared warm-up first, forked as in a fixed study). With ``--budget`` (here or in a fixed
study) a trial starts only if the committed compute (what ended trials measured plus the
estimates of the running ones) stays within the cap; a trial that does not fit waits while
others run (they may cost less than estimated) and is left out when nothing runs. A left-out
trial ends the plan: the study finishes with the results it has, its report naming the
questions that stayed open for the budget.

Estimates are the dry run's cost model (:func:`ctt.tune.dry_run.estimate_cost`: iterations x
seconds per step measured on the driver's device), replaced per variant by the seconds per
step the variant's trials measured once one has ended, so on a cluster whose workers are
faster than the driver the estimate follows the workers.

Everything the plan needs is in the searcher's state, which Tune saves with each experiment
snapshot: a ``--resume`` restores the released seeds, the results and the spend, so no seed is
released twice and the budget counts what was spent before the interruption. The driver-local
``plan.json`` (:data:`ctt.tune.layout.PLAN_RECORD`) is for people and the report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ctt.fileio import atomic_write_text
from ctt.tune.grid import WARMUP_VARIANT, GridItem, GridSearcher
from ctt.tune.sequential import Plan, parse_questions, replay

__all__ = ["COMPUTE_KEY", "ComputeBudget", "PlannedGridSearcher", "budget_unit"]

# What each trial reports as its compute so far (ctt.tune.trainable), in seconds.
COMPUTE_KEY = "time/trial_compute_s"


def budget_unit(gpus_per_trial: float) -> str:
    """``--budget``'s unit: GPU-hours when trials hold GPUs, else core-hours."""
    return "GPU-hours" if gpus_per_trial > 0 else "core-hours"


class PlannedGridSearcher(GridSearcher):
    """The grid searcher with rounds of seeds (``plan``; None: a fixed study) and a budget.

    Args:
        items: the initial seeds' items, in start order (as :class:`GridSearcher`).
        reserve: the later seeds' items, ``[(seed, items)]`` in release order; a round
            releases one seed's warm-up and the variants an open question needs.
        questions, plan: the family and the sequential design (``plan`` None: no rounds).
        budget: the cap in ``unit`` (None: no cap); ``per_trial``: the resource a trial holds
            (CPUs, or GPUs with ``unit`` GPU-hours) to turn its seconds into the unit.
        step_s: the cost model's seconds per step by variant (``"warmup"`` for a warm-up).
        plan_record: the driver-local ``plan.json`` to rewrite as the plan moves.
        seeds: the initial seeds, in order.
    """

    _PATHS = (*GridSearcher._PATHS, "plan_record")

    def __init__(self, items: list[GridItem], *, reserve: list[tuple[Any, list[GridItem]]],
                 questions: tuple[str, ...], plan: Plan | None, seeds: list[Any],
                 budget: float | None = None, unit: str = "core-hours", per_trial: float = 1.0,
                 step_s: dict[str, float] | None = None, plan_record: str | None = None,
                 **kwargs: Any):
        self.reserve = list(reserve)
        self.questions = tuple(questions)
        self.plan = plan
        self.seed_order = list(seeds)
        self.rounds: list[dict[str, Any]] = []
        self.results: dict[str, dict[Any, float]] = {}
        self.stopped = ""
        self.unit, self.per_trial = unit, float(per_trial)
        self.step_s = dict(step_s or {})
        self.measured_step_s: dict[str, float] = {}
        self.estimated = 0.0  # the cost model's estimate of every trial started
        self.plan_record = plan_record
        self._key_items: dict[str, GridItem] = {}
        super().__init__(items, budget=budget, **kwargs)
        for item in items:
            self._key_items[item.key] = item
        self._write_plan()

    # --- the plan ---------------------------------------------------------------------------
    def _round_may_follow(self) -> bool:
        return bool(self.live) and self.plan is not None and not self.stopped

    def _next_round(self) -> bool:
        if self.stopped:
            return False
        if self.over_budget:
            self._stop("budget")
            return False
        if self.plan is None:
            return False
        questions = parse_questions(self.questions)
        data = {v: dict(self.results.get(v, {})) for q in questions for v in q.variants}
        looks = replay(data, questions, self.plan, seed_order=self.seed_order)
        last = looks[-1] if looks else None
        if last is None or last.done:
            self._stop(last.reason if last is not None else "max_seeds")
            return False
        if not self.reserve:
            self._stop("max_seeds")
            return False
        seed, items = self.reserve.pop(0)
        need = set(last.next_variants)
        released = [i for i in items
                    if i.publish or str(i.config.get("variant")) in need]
        # a warm-up nobody forks would be trained for nothing
        forks = {i.after for i in released if i.after}
        released = [i for i in released if not i.publish or i.key in forks]
        for item in released:
            self._key_items[item.key] = item
            if item.publish:
                self.warmups[item.key] = item
        self.pending.extend(released)
        self.seed_order.append(seed)
        self.rounds.append({"seed": seed, "variants": sorted(need),
                            "after_look": last.look,
                            "open": [str(q) for q in last.open]})
        self._write_plan()
        return bool(released)

    def _stop(self, reason: str) -> None:
        self.stopped = reason
        self._write_plan()

    # --- cost ---------------------------------------------------------------------------------
    def _iters(self, item: GridItem) -> int:
        return max(int(item.iters), 0)

    def _variant(self, item: GridItem) -> str:
        return WARMUP_VARIANT if item.publish else str(item.config.get("variant"))

    def _hours(self, item: GridItem, step_s: float | None) -> float:
        """``item``'s compute at ``step_s`` seconds per step, in the budget's unit (0 unknown)."""
        return 0.0 if step_s is None else self._iters(item) * step_s * self.per_trial / 3600.0

    def _cost(self, item: GridItem) -> float:
        variant = self._variant(item)
        return self._hours(item, self.measured_step_s.get(variant, self.step_s.get(variant)))

    def _model_cost(self, item: GridItem) -> float:
        return self._hours(item, self.step_s.get(self._variant(item)))

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            item = self._key_items.get(self.live.get(trial_id, ""))
            if item is not None:
                self.estimated += self._model_cost(item)
                self._write_plan()
        return config

    def _trial_ended(self, key: str, result: dict | None, error: bool, estimate: float) -> None:
        item = self._key_items.get(key)
        compute = _finite((result or {}).get(COMPUTE_KEY))
        if compute is not None:
            self.spent += compute * self.per_trial / 3600.0
            if item is not None and not error and self._iters(item):
                self.measured_step_s[self._variant(item)] = compute / self._iters(item)
        else:  # no measurement (a crash before the first report): count the estimate
            self.spent += estimate
        if item is not None and not item.publish and not error and result \
                and result.get("error") is None:
            miou = _finite(result.get("miou"))
            if miou is not None:
                self.results.setdefault(str(item.config.get("variant")), {})[item.seed] = miou
        if not self.pending and not self.live:
            # the round is over: decide now (Tune may not ask again once its trial count,
            # every seed's trials, is reached)
            self._next_round()
        self._write_plan()

    # --- the record ---------------------------------------------------------------------------
    def _write_plan(self) -> None:
        if not getattr(self, "plan_record", None):
            return
        record = {
            "questions": list(self.questions),
            "adaptive": self.plan is not None,
            "seed_order": self.seed_order,
            "rounds": self.rounds,
            "stopped": self.stopped,
            "over_budget": self.over_budget,
            "budget": None if self.budget is None else {
                "cap": self.budget, "unit": self.unit, "estimated": self.estimated,
                "spent": self.spent},
        }
        try:
            atomic_write_text(Path(self.plan_record),
                              json.dumps(record, indent=2, default=str) + "\n")
        except OSError:  # for people and the report; the searcher's state is what counts
            pass


class ComputeBudget:
    """``--budget`` for a sweep, whose trials all train one variant up to ``iters``: a new
    trial is admitted only while the committed compute (measured spend of the ended trials +
    estimates of the running ones) plus its own estimate stays within ``cap``. The estimate is
    ``iters`` x seconds per step: the cost model's ``step_s`` until a trial has ended, then
    what the ended trials measured per step (``offset``: the step a forked trial starts at).
    A pruned trial ends early and spends less than its estimate; the room it leaves is used.
    Picklable (Tune saves it with the searcher); ``record`` (``plan.json``) is for the report.
    """

    def __init__(self, cap: float, *, unit: str, per_trial: float, iters: int,
                 step_s: float | None, offset: int = 0, record: str | None = None):
        self.cap, self.unit, self.per_trial = float(cap), unit, float(per_trial)
        self.iters, self.offset = int(iters), int(offset)
        self.step_s, self.measured_step_s = step_s, None
        self.record = record
        self.spent = self.estimated = 0.0
        self.live: dict[str, float] = {}
        self.stopped = ""
        self._write()

    def estimate(self) -> float:
        """One more trial's compute in the budget's unit, as if it ran to ``iters``."""
        step_s = self.measured_step_s if self.measured_step_s is not None else self.step_s
        if step_s is None:
            return 0.0
        return (self.iters - self.offset) * step_s * self.per_trial / 3600.0

    def admit(self, trial_id: str) -> bool | None:
        """True: start the trial (its estimate is committed); None: wait for running trials
        to end; False: nothing more fits, the search is over."""
        est = self.estimate()
        if self.spent + sum(self.live.values()) + est <= self.cap:
            self.live[trial_id] = est
            if self.step_s is not None:
                self.estimated += (self.iters - self.offset) * self.step_s * self.per_trial / 3600
            self._write()
            return True
        if self.live:
            return None
        self.stopped = "budget"
        self._write()
        return False

    def ended(self, trial_id: str, result: dict | None) -> None:
        """Count an ended trial's measured compute (its estimate when it measured none)."""
        if trial_id not in self.live:
            return
        est = self.live.pop(trial_id)
        compute = _finite((result or {}).get(COMPUTE_KEY))
        step = _finite((result or {}).get("step"))
        if compute is None:
            self.spent += est
        else:
            self.spent += compute * self.per_trial / 3600.0
            if step is not None and step > self.offset:
                self.measured_step_s = compute / (step - self.offset)
        self._write()

    def __getstate__(self) -> dict[str, Any]:
        from ctt.tune.storage import portable_path

        state = dict(self.__dict__)
        if state.get("record"):
            state["record"] = portable_path(state["record"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from ctt.tune.storage import local_path

        self.__dict__.update(state)
        if self.record:
            self.record = local_path(self.record)

    def _write(self) -> None:
        if not self.record:
            return
        record = {"stopped": self.stopped, "budget": {
            "cap": self.cap, "unit": self.unit, "estimated": self.estimated,
            "spent": self.spent}}
        try:
            atomic_write_text(Path(self.record), json.dumps(record, indent=2) + "\n")
        except OSError:
            pass


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
