"""A study as text: the Markdown report (``report.md``) and the compact terminal table printed
at the end of a study.

Report sections: a header (name, kind, trial counts by outcome, the machine: CPU model and
instruction set, torch threads, commit); for an ablation that asks questions (``study.json``
``options.questions``) their answers (:func:`render_questions`: estimate, interval at the
design's level and verdict of each, by :mod:`ctt.tune.sequential`, with ``plan.json``'s spend
and stop reason); for an ablation the ablation table (mIoU mean ± std
over the seeds of finished trials, Δ against the baseline with its 95 % interval, the paired-t
p and the Holm-corrected p, excluded trials counted) and the paired comparisons (every variant
against the baseline and the between-variant ones of :func:`ctt.tune.tables.comparison_rows`)
with the minimum detectable effect and the seeds 1 mIoU would need, then one sentence per
comparison; for a sweep instead the search's outcome (finished, pruned, failed trials and the
share of an unpruned search's iterations); the excluded trials with their errors; for sweeps
the top trials by ``rank_by`` with the swept parameters, Optuna's parameter importances (named
evaluator, only from 2 finished trials up) and the confirmation; the plots.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ctt.fileio import as_int
from ctt.tune.layout import PLAN_RECORD, finite, read_json
from ctt.tune.sequential import (
    OPEN,
    RESOLVED_NEG,
    RESOLVED_POS,
    WITHIN_DELTA,
    Plan,
    Question,
    QuestionResult,
    fixed_need,
    parse_questions,
    replay,
)
from ctt.tune.stats import ALPHA, POWER, optuna_importances
from ctt.tune.tables import (
    DEFAULT_BASELINE,
    DEFAULT_RANK_BY,
    ablation_rows,
    comparison_rows,
    is_ok,
    load_study_json,
    load_trials,
    trial_outcome,
    varying_params,
)

log = logging.getLogger(__name__)


def _fmt_ms(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f} ± " + ("n/a" if math.isnan(std) else f"{std:.2f}")


def _fmt_excluded(excluded: dict[str, int]) -> str:
    return ", ".join(f"{n} {k.lower()}" for k, n in sorted(excluded.items())) or "-"


def _fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3g}"


def _fmt_ci(c: dict) -> str:
    if math.isnan(c["ci_low"]):
        return "n/a"
    return f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]"


def _fmt_delta(row: dict, baseline: str) -> tuple[str, str]:
    if row["variant"] == baseline:
        return "(baseline)", ""
    if math.isnan(row["delta"]):
        return "n/a", "n/a"
    return f"{row['delta']:+.2f} (n={row['n_pairs']})", _fmt_p(row["p"])


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(cell, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _seeds_text(n: int | None) -> str:
    return f"more than {100_000:,}" if n is None else str(n)


def comparison_sentence(c: dict) -> str:
    """One line saying whether comparison ``c`` (a row of ``comparison_rows``) is resolved
    (its Holm-corrected p is below alpha, so its 95 % interval excludes 0 after the correction)
    and what effect its seeds could have detected."""
    name = f"`{c['a']}` − `{c['b']}`"
    if c["n"] < 2:
        got = "no seed" if c["n"] == 0 else "1 seed"
        return (f"- {name}: not testable: {got} where both ran to the end (a paired test "
                "needs 2).")
    head = (f"- {name}: {c['delta']:+.2f} mIoU, 95 % CI {_fmt_ci(c)} over {c['n']} seeds; ")
    if c["resolved"]:
        verdict = f"**resolved** (Holm p = {_fmt_p(c['p_holm'])} < {ALPHA:g})."
    elif c["ci_low"] > 0 or c["ci_high"] < 0:
        verdict = (f"not resolved: the interval excludes 0 (p = {_fmt_p(c['p'])}) but not "
                   f"after Holm's correction (p = {_fmt_p(c['p_holm'])}).")
    else:
        verdict = f"not resolved: the interval includes 0 (Holm p = {_fmt_p(c['p_holm'])})."
    if c["sd"] == 0.0:
        power = " Every seed gave the same difference (SD 0), so any effect is detectable."
    else:
        power = (f" With the paired SD {c['sd']:.2f}, {c['n']} seeds detect "
                 f"{c['mde']:.2f} mIoU at {POWER * 100:.0f} % power; 1 mIoU would need "
                 f"{_seeds_text(c['seeds_for_effect'])} seeds.")
    return head + verdict + power


def render_comparisons(comparisons: Sequence[dict]) -> list[str]:
    """The paired-comparisons section: table, then one sentence per comparison."""
    if not comparisons:
        return []
    out = ["## Paired comparisons", "",
           "Each row is `a − b` of `miou_final`, paired by seed over the seeds where both "
           "ran to the end: mean Δ with its t-based 95 % interval, the two-sided paired "
           f"t-test p and Holm's step-down correction over all {len(comparisons)} comparisons "
           f"of this table (one family); MDE: the smallest true Δ the test detects with "
           f"{POWER * 100:.0f} % power at α = {ALPHA:g} (two-sided) for the observed SD of the "
           "paired differences and this seed count (noncentral t); seeds for 1 mIoU: the "
           "seeds that detecting a 1 mIoU difference would take with that SD; resolved: "
           f"p (Holm) < {ALPHA:g}. Besides each variant against the baseline, the family "
           "holds the comparisons of CTT's parts whose variants both ran "
           "(`study.json` key `comparisons` replaces them).", ""]
    rows = [[f"{c['a']} − {c['b']}", c["n"],
             "n/a" if math.isnan(c["delta"]) else f"{c['delta']:+.2f}", _fmt_ci(c),
             "n/a" if math.isnan(c["sd"]) else f"{c['sd']:.2f}", _fmt_p(c["p"]),
             _fmt_p(c["p_holm"]), "n/a" if math.isnan(c["mde"]) else f"{c['mde']:.2f}",
             "n/a" if c["n"] < 2 else _seeds_text(c["seeds_for_effect"]),
             "yes" if c["resolved"] else "no"]
            for c in comparisons]
    out += [_md_table(["comparison", "seeds", "Δ", "95 % CI", "SD of Δ", "p", "p (Holm)",
                       f"MDE ({POWER * 100:.0f} %)", "seeds for 1 mIoU", "resolved"], rows), ""]
    out += [comparison_sentence(c) for c in comparisons] + [""]
    return out


def _env_lines(study: dict) -> list[str]:
    """Header lines on the machine that ran the study (``study.json["env"]``,
    :func:`ctt.envinfo.environment`): results move with the CPU's kernels
    (docs/results.md#reproducibility-across-machines)."""
    env = study.get("env")
    if not isinstance(env, dict):
        return []
    cpu = env.get("cpu") if isinstance(env.get("cpu"), dict) else None
    versions = env.get("versions") if isinstance(env.get("versions"), dict) else {}
    out = []
    if cpu is not None:
        flags = " ".join(map(str, cpu.get("flags") or [])) or "none listed"
        limits = cpu.get("isa_env") if isinstance(cpu.get("isa_env"), dict) else {}
        out.append(f"- CPU: {cpu.get('model', 'unknown')}, {env.get('cpu_count', '?')} cores; "
                   f"torch CPU kernels {cpu.get('torch_capability', 'unknown')}; "
                   f"ISA flags {flags}"
                   + "".join(f"; {k}={v}" for k, v in sorted(limits.items())))
    base = study.get("base_config") if isinstance(study.get("base_config"), dict) else {}
    threads = base.get("run.num_threads")
    out.append(f"- environment: torch {versions.get('torch', '?')}"
               + (f", {threads} torch thread(s) per trial" if threads is not None else "")
               + f", GPU {env.get('cuda', 'none')}, commit `{env.get('git_commit', '?')}`")
    return out


def render_confirm(confirm: dict) -> list[str]:
    """The sweep's confirmation section (``study.json`` ``confirm``, written by
    :func:`ctt.tune.confirm.confirm_winners`): the winner by its confirmed mean, and every
    candidate's search-time value beside its confirmed mean ± std."""
    metric, cands, win = confirm.get("metric", "miou"), confirm.get("candidates", []), \
        confirm.get("winner")
    out = [f"## Confirmed winner: top {confirm.get('top')} configs on "
           f"{len(confirm.get('seeds', []))} fresh seeds", ""]
    if win:
        out += [f"Winner: `{win['label']}` (search trial `{win['trial_id']}`), confirmed "
                f"{metric} {_fmt_ms(_num(win['confirm_mean']), _num(win['confirm_std']))} over "
                f"{win['confirm_n']} seed(s); its search-time value was "
                f"{_search_text(win)} on one seed."
                + (f" Test split: {metric} {_fmt_ms(_num(win['test_mean']), _num(win['test_std']))}"
                   f" over {win['test_n']} seed(s)." if win.get("test_n") else ""), ""]
    else:
        out += ["No confirmation run finished: no winner.", ""]
    out += [_md_table(["rank", "label", "trial_id", f"search {metric} (seed)",
                       f"confirmed {metric}", "n", "failed", "seeds"],
                      [[c["rank"], c["label"], c["trial_id"],
                        f"{_search_text(c)} ({c['search_seed']})",
                        _fmt_ms(_num(c.get("confirm_mean")), _num(c.get("confirm_std"))),
                        c.get("confirm_n", 0), c.get("confirm_failed", 0),
                        ",".join(str(x) for x in c.get("confirm_seeds", []))]
                       for c in cands]), ""]
    out += [f"Search rank is by the final val {metric} of one seed; where fewer trials than "
            "that ran to the end, the pruned ones follow by their last value (its step in "
            "brackets): each candidate is trained in full on the fresh seeds. The winner is the "
            "highest confirmed mean (mean ± std, ddof=1, of the final value over the fresh "
            "seeds).", ""]
    return out


def _search_text(c: dict) -> str:
    """A candidate's search-time value; a pruned one's with the step it was last measured."""
    text = _fmt_value(c["search_value"])
    if c.get("search_state") == "PRUNED":
        text += f" [pruned, step {c.get('search_step')}]"
    return text


def render_report(study_dir: str, trials: Sequence[dict], study: dict,
                  plots: Sequence[str] = ()) -> str:
    """The Markdown report (see module docstring); ``plots`` are file names in ``study_dir``."""
    name = study.get("name") or os.path.basename(os.path.normpath(study_dir))
    kind = study.get("kind", "ablation")
    baseline = study.get("baseline", DEFAULT_BASELINE)
    counts = _outcome_counts(trials)
    out = [f"# Study report: {name}", "",
           f"- study: `{name}` ({kind})",
           f"- directory: `{study_dir}`",
           f"- trials: {len(trials)} ("
           + (", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none") + ")",
           *_env_lines(study), ""]

    if kind == "sweep":
        out += render_search(trials, study)
        out += sweep_budget_lines(load_plan_record(study_dir))
    else:
        out += render_questions(assess_questions(trials, study, load_plan_record(study_dir)))
        out += _render_ablation(trials, study, baseline)

    # a sweep's pruned trials are its search working, not exclusions: the top table has them
    failed = [t for t in trials if not is_ok(t)
              and not (kind == "sweep" and trial_outcome(t) == "PRUNED")]
    if failed:
        out += ["## Excluded trials", ""]
        out += [_md_table(["trial_id", "variant", "seed", "status", "step", "error"],
                          [[t["trial_id"], t["variant"], t["seed"], trial_outcome(t),
                            _fmt_value(t.get("step")), (t.get("error") or "")[:200]]
                           for t in failed]), ""]

    if kind == "sweep":
        out += _render_sweep_tables(study_dir, trials, study)

    if plots:
        out += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    return "\n".join(out)


def search_compute(trials: Sequence[dict], iters: int | None) -> float | None:
    """The share of an unpruned search's training iterations the trials ran: ``Σ step /
    (trials × iters)`` (pruned trials count to the step they stopped at; None without
    ``iters`` or trials)."""
    steps = [int(t.get("step") or 0) for t in trials]
    if not iters or not steps:
        return None
    return sum(min(s, iters) for s in steps) / (len(steps) * iters)


def render_search(trials: Sequence[dict], study: dict) -> list[str]:
    """A sweep's outcome in a paragraph: how many trials ran to the end, were pruned or
    failed, and the share of an unpruned search's iterations that cost (the one-variant
    ablation table a sweep would otherwise get compares nothing)."""
    counts = _outcome_counts(trials)
    iters = (study.get("base_config") or {}).get("optim.iters")
    share = search_compute(trials, iters)
    pruner = study.get("pruner") or {}
    seeds = sorted({str(t.get("seed")) for t in trials})
    text = (f"{len(trials)} search trials on seed{'s' if len(seeds) > 1 else ''} "
            f"{','.join(seeds) or '-'}: "
            f"{counts.get('TERMINATED', 0)} ran to the end, {counts.get('PRUNED', 0)} pruned, "
            f"{sum(v for k, v in counts.items() if k not in ('TERMINATED', 'PRUNED'))} "
            f"errored or unfinished (scheduler `{study.get('scheduler', '?')}`"
            + (f", {pruner['class']}" if pruner.get("class") else "") + ").")
    if share is not None:
        text += (f" They ran {100 * share:.1f} % of the training iterations of an unpruned "
                 f"search ({len(trials)} × {iters}).")
    return ["## Search", "", text, ""]


def _render_ablation(trials: Sequence[dict], study: dict, baseline: str) -> list[str]:
    """The ablation table (variant rows, paired differences vs the baseline) and the
    comparisons under it."""
    out: list[str] = []
    rows = ablation_rows(trials, study)
    comparisons = comparison_rows(trials, study)
    vs_base = {c["a"]: c for c in comparisons if c["kind"] == "baseline"}
    out += ["## Ablation", "",
            "mIoU in %, mean ± std (ddof=1) over seeds of trials that ran to the end.", ""]
    table = []
    for r in rows:
        delta, p = _fmt_delta(r, baseline)
        c = vs_base.get(r["variant"])
        ci, p_holm = (_fmt_ci(c), _fmt_p(c["p_holm"])) if c else ("", "")
        if r["variant"] != baseline and not c:
            ci = p_holm = "n/a"
        table.append([r["variant"], r["seeds"], _fmt_excluded(r["excluded"]),
                      _fmt_ms(r["final_mean"], r["final_std"]),
                      _fmt_ms(r["best_mean"], r["best_std"]), delta, ci, p, p_holm])
    out += [_md_table(["variant", "seeds", "excluded", "miou_final", "miou_best",
                       f"Δ final vs {baseline}", "95 % CI", "p (paired t)", "p (Holm)"],
                      table), ""]
    out += [f"Δ: mean over seeds of (variant − {baseline}) `miou_final`, paired by seed on the "
            "seeds where both trials ran to the end, with its t-based 95 % confidence "
            "interval; p: two-sided paired t-test (n/a below 2 pairs); p (Holm): corrected "
            "over every comparison of the next section. Errored, pruned and unfinished trials "
            "are counted under *excluded* and left out of every mean.", ""]
    out += render_comparisons(comparisons)
    return out


def _render_sweep_tables(study_dir: str, trials: Sequence[dict], study: dict) -> list[str]:
    """A sweep's top trials, Optuna's parameter importances and the confirmation."""
    out: list[str] = []
    rank_by = study.get("rank_by", DEFAULT_RANK_BY)
    params = varying_params(trials)
    ranked = sorted((t for t in trials if finite(t.get(rank_by)) is not None),
                    key=lambda t: -t[rank_by])[:10]
    out += [f"## Sweep: top {len(ranked)} trials by `{rank_by}`", ""]
    extra = [] if rank_by == "miou_final" else ["miou_final"]  # no column twice
    # step: where the value was measured (a pruned trial's is its last evaluation)
    out += [_md_table(["rank", "trial_id", "variant", "seed", "status", "step", rank_by,
                       *extra, *params],
                      [[i + 1, t["trial_id"], t["variant"], t["seed"], trial_outcome(t),
                        _fmt_value(t.get("step")), _fmt_value(t[rank_by]),
                        *[_fmt_value(t.get(k)) for k in extra],
                        *[_fmt_value(t["config"].get(p)) for p in params]]
                       for i, t in enumerate(ranked)]), ""]
    imp = optuna_importances(study_dir, study)
    if imp:
        out += [f"## Parameter importances (Optuna, {imp['evaluator']})", ""]
        if imp["importances"] is None:
            out += [f"Not computed: {imp['n']} trial(s) ran to the end; Optuna needs at "
                    "least 2 (below that it returns equal shares).", ""]
        else:
            out += [_md_table(["parameter", "importance"],
                              [[k, f"{v:.3f}"] for k, v in imp["importances"].items()]),
                    "", f"From the {imp['n']} trials that ran to the end (pruned ones are "
                    "not used); with few trials the shares are indicative only.", ""]
    if study.get("confirm"):
        out += render_confirm(study["confirm"])
    return out


def summary_table(study_dir: str | os.PathLike) -> str:
    """Compact terminal table for the end-of-study print: variant, seeds, final mean ± std,
    Δ vs the baseline with its 95 % interval, and the paired-t p before and after Holm."""
    study_dir = os.fspath(study_dir)
    study = load_study_json(study_dir)
    trials = load_trials(study_dir)
    if study.get("kind") == "sweep":  # no variants to compare: the outcome and the winner
        return "\n".join([render_search(trials, study)[2], *_winner_lines(study)])
    baseline = study.get("baseline", DEFAULT_BASELINE)
    vs_base = {c["a"]: c for c in comparison_rows(trials, study) if c["kind"] == "baseline"}
    header = ("variant", "seeds", "miou_final", f"Δ vs {baseline}", "95% CI", "p", "p Holm")
    lines = [header]
    for r in ablation_rows(trials, study):
        delta, p = _fmt_delta(r, baseline)
        c = vs_base.get(r["variant"])
        seeds = str(r["seeds"]) + (f" (+{sum(r['excluded'].values())} excl.)"
                                   if r["excluded"] else "")
        lines.append((r["variant"], seeds, _fmt_ms(r["final_mean"], r["final_std"]), delta,
                      _fmt_ci(c) if c else "", p, _fmt_p(c["p_holm"]) if c else ""))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _winner_lines(study: dict) -> list[str]:
    """The sweep's confirmed winner (or, without confirmation, its best trial) in a line."""
    win = (study.get("confirm") or {}).get("winner")
    if win:
        return [f"winner: {win['label']} (search trial {win['trial_id']}), confirmed "
                f"{_fmt_ms(float(win['confirm_mean']), _num(win.get('confirm_std')))} over "
                f"{win['confirm_n']} fresh seed(s); search value {_search_text(win)}"]
    best = study.get("best") or {}
    if best.get("trial_id"):
        return [f"best: trial {best['trial_id']}, val {_fmt_value(best.get('val_miou'))} "
                "(final, one seed)"]
    return ["no trial ran to the end"]


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _outcome_counts(trials: Sequence[dict]) -> dict[str, int]:
    """Trials per outcome (:func:`ctt.tune.tables.trial_outcome`)."""
    counts: dict[str, int] = {}
    for t in trials:
        counts[trial_outcome(t)] = counts.get(trial_outcome(t), 0) + 1
    return counts


# --- the study's questions (ctt.tune.sequential) ------------------------------------------------

@dataclass(frozen=True)
class QuestionRow:
    """One question as the report shows it: its result at the look that closed it (the last
    look while it is open; None where no look was possible), the verdict in words and, for an
    open question, the seeds per variant a fixed design would need to detect delta
    (:func:`ctt.tune.sequential.fixed_need`; None: not computable). ``missing``: its variants
    without a finished trial."""

    question: Question
    result: QuestionResult | None
    verdict: str
    fixed_seeds: int | None = None
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuestionsReport:
    """A study's questions assessed from its trials (:func:`assess_questions`).

    ``design``: "fixed" (one look at all seeds, each interval at ``alpha / m``) or "adaptive"
    (the looks of ``plan``, replayed in the seed order of ``plan.json``). ``note``, when set,
    says why there are no rows (no look possible); ``stopped`` and ``budget`` are
    ``plan.json``'s (None without one); ``remarks`` are caveats printed under the table.
    """

    design: str
    questions: tuple[Question, ...]
    alpha: float
    delta: float
    plan: Plan | None = None
    rows: tuple[QuestionRow, ...] = ()
    looks: int = 0
    note: str = ""
    stopped: str | None = None
    budget: dict | None = None
    remarks: tuple[str, ...] = field(default=())


def load_plan_record(study_dir: str | os.PathLike) -> dict | None:
    """The driver's ``plan.json`` (:data:`ctt.tune.layout.PLAN_RECORD`) or None: absent (a
    fixed study, an interrupted one) or unreadable (a warning; the report still builds)."""
    path = os.path.join(os.fspath(study_dir), PLAN_RECORD)
    try:
        return read_json(path, strict=True)
    except Exception as e:  # noqa: BLE001 - a record the report can do without
        log.warning("ignoring %s: %s", path, e)
        return None


def question_data(trials: Sequence[dict]) -> dict[str, dict[int, float]]:
    """``{variant: {seed: miou_final}}`` of the trials that ran to the end without an error and
    with a finite ``miou_final`` (a later trial of the same variant and seed wins)."""
    data: dict[str, dict[int, float]] = {}
    for t in trials:
        seed, value = as_int(t.get("seed")), finite(t.get("miou_final"))
        if is_ok(t) and not t.get("error") and seed is not None and value is not None:
            data.setdefault(str(t.get("variant")), {})[seed] = value
    return data


def _seed_order(plan_record: dict | None) -> list[int] | None:
    order = (plan_record or {}).get("seed_order")
    if not isinstance(order, list) or not order:
        return None
    seeds = [as_int(s) for s in order]
    if any(s is None for s in seeds) or len(set(seeds)) != len(seeds):
        return None
    return seeds  # type: ignore[return-value]


def assess_questions(trials: Sequence[dict], study: dict,
                     plan_record: dict | None = None) -> QuestionsReport | None:
    """The study's questions (``study.json`` ``options.questions``) answered from its trials;
    None when it asks none (a sweep, an old study without the key).

    A fixed study is one look at all ``n`` seeds with results: ``Plan(initial=n,
    max_seeds=n)``, each interval at ``alpha / m``. An adaptive one (``options.adaptive``)
    replays its looks (:func:`ctt.tune.sequential.replay`) with ``Plan(initial=len(seeds),
    max_seeds=options.max_seeds, delta=options.delta)`` in the seed order of ``plan_record``
    (``plan.json``; sorted seeds without it); each question shows the last assessment's result,
    a closed one that of the look that closed it. A question whose variant has no finished
    trial keeps its place in the family (m counts it) with no pairs, and its row says so.
    """
    opts = study.get("options") if isinstance(study.get("options"), dict) else {}
    raw = opts.get("questions")
    if not raw or study.get("kind") == "sweep":
        return None
    design = "adaptive" if opts.get("adaptive") else "fixed"
    plan_record = plan_record if isinstance(plan_record, dict) else None
    stopped = None
    budget = None
    if plan_record is not None:
        stopped = plan_record.get("stopped") if isinstance(plan_record.get("stopped"),
                                                           str) else ""
        budget = plan_record.get("budget") if isinstance(plan_record.get("budget"),
                                                         dict) else None
    try:
        if not isinstance(raw, list):
            raise ValueError(f"'questions' must be a list of 'a/b' texts, got {raw!r:.60}")
        questions = parse_questions(str(q) for q in raw)
        delta = float(opts.get("delta", 1.0))
        if not (delta > 0 and math.isfinite(delta)):
            raise ValueError(f"'delta' must be a positive number, got {opts.get('delta')!r}")
    except (TypeError, ValueError) as e:
        return QuestionsReport(design, (), ALPHA, math.nan, stopped=stopped, budget=budget,
                               note=f"The questions in study.json could not be read: {e}.")
    base = QuestionsReport(design, questions, ALPHA, delta, stopped=stopped, budget=budget)

    data = question_data(trials)
    missing = {q: tuple(v for v in q.variants if not data.get(v)) for q in questions}
    for q in questions:
        for v in q.variants:
            data.setdefault(v, {})
    with_results = sorted({s for per in data.values() for s in per})
    remarks: list[str] = []
    try:
        if design == "fixed":
            n = len(with_results)
            if n < 2:
                return _replace(base, note=f"The questions need at least 2 seeds with results "
                                           f"(a paired interval needs 2); {n} so far.")
            plan = Plan(initial=n, max_seeds=n, delta=delta)
            order = with_results
        else:
            seeds = study.get("seeds", opts.get("seeds"))
            if not isinstance(seeds, list):
                raise ValueError(f"study.json 'seeds' must be a list, got {seeds!r:.40}")
            plan = Plan(initial=len(seeds), max_seeds=int(opts.get("max_seeds", 10)),
                        delta=delta)
            order = _seed_order(plan_record)
            if order is None:
                order = with_results
                remarks.append(f"No seed order recorded ({PLAN_RECORD} absent or without "
                               "`seed_order`): the looks are replayed in sorted seed order.")
        assessments = replay(data, questions, plan, seed_order=order)
    except (TypeError, ValueError) as e:
        return _replace(base, note=f"The questions could not be assessed: {e}.")
    base = _replace(base, plan=plan, remarks=tuple(remarks))
    if not assessments:
        return _replace(base, note=f"No look yet: the first look needs {plan.initial} seeds, "
                                   f"{len(order)} have started.")
    last = assessments[-1]
    reason = (stopped or last.reason) if design == "adaptive" else ""
    open_words = {"budget": "open: budget", "max_seeds": "open: max seeds"}.get(reason, "open")
    rows = []
    for r in last.results:
        q = r.question
        if r.verdict == RESOLVED_POS:
            words = f"resolved: {q.a} > {q.b}"
        elif r.verdict == RESOLVED_NEG:
            words = f"resolved: {q.a} < {q.b}"
        elif r.verdict == WITHIN_DELTA:
            words = f"smaller than δ = {_fmt_delta_value(delta)}"
        else:
            words = open_words
        if missing[q]:
            words += f"; no finished trial of {', '.join(missing[q])}"
        need = (fixed_need(r, plan, len(questions)).seeds_for_delta
                if r.verdict == OPEN else None)
        rows.append(QuestionRow(q, r, words, need, missing[q]))
    return _replace(base, rows=tuple(rows), looks=len(assessments))


def _replace(report: QuestionsReport, **changes: Any) -> QuestionsReport:
    return replace(report, **changes)


def _fmt_delta_value(delta: float) -> str:
    return repr(float(delta)) if float(delta).is_integer() else f"{delta:g}"


def _fmt_confidence(error: float) -> str:
    """The confidence ``1 - error`` in %, with the decimals that keep it short of 100 % (an
    early look's level can be 99.99999 %)."""
    pct = 100.0 * error
    if not pct > 0:
        return "100 %"
    decimals = max(1, -math.floor(math.log10(pct)))
    return f"{100.0 - pct:.{decimals}f} %"


def _question_cells(rep: QuestionsReport) -> list[list[str]]:
    """The rows of the questions table as text cells (the report's and the terminal's)."""
    cells = []
    for row in rep.rows:
        r = row.result
        est = "n/a" if r is None or math.isnan(r.estimate) else f"{r.estimate:+.2f}"
        if r is None or math.isnan(r.ci_low):
            interval = "n/a"
        else:
            interval = (f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}] "
                        f"({_fmt_confidence(r.level)})")
        if r is not None and r.verdict == OPEN:
            need = "n/a" if row.fixed_seeds is None else f"{row.fixed_seeds} seeds"
        else:
            need = "-"
        cells.append([f"{row.question.a} − {row.question.b}", est, interval,
                      str(0 if r is None else r.n), row.verdict, need])
    return cells


QUESTION_HEADER = ("question", "estimate (mIoU)", "interval", "seeds", "verdict",
                   "a fixed design needs")


def _fmt_hours(x: Any) -> str:
    v = finite(x)
    if v is None:
        return "n/a"
    return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.2g}"


def _spend_line(b: dict) -> str:
    line = (f"Spend: {_fmt_hours(b.get('spent'))} of {_fmt_hours(b.get('cap'))} "
            f"{b.get('unit') or 'core-hours'}")
    if finite(b.get("estimated")) is not None:
        line += f" (estimated {_fmt_hours(b.get('estimated'))} before the trials ran)"
    return line + "."


def sweep_budget_lines(record: dict | None) -> list[str]:
    """A sweep's ``--budget``: the measured spend next to the estimate, and whether the budget
    ended the search before ``--num-samples``."""
    if not record or not isinstance(record.get("budget"), dict):
        return []
    out = [_spend_line(record["budget"])]
    if record.get("stopped") == "budget":
        out.append("The search stopped for the budget: no further trial fitted in it.")
    return ["## Budget", "", *[line + "\n" for line in out]]


def _question_footer(rep: QuestionsReport) -> list[str]:
    """The lines under the table: caveats, the spend against the budget and why the study
    stopped adding seeds (both from ``plan.json``)."""
    out = list(rep.remarks)
    if rep.budget is not None:
        out.append(_spend_line(rep.budget))
    # a fixed study's plan.json (written for its budget) has no rounds to stop, only a cap
    if rep.stopped is not None and (rep.design == "adaptive" or rep.stopped):
        max_seeds = rep.plan.max_seeds if rep.plan is not None else "max_seeds"
        words = {
            "answered": "Stopped: every question has a verdict.",
            "max_seeds": f"Stopped: the variants of the open questions reached "
                         f"{max_seeds} seeds, the most the plan allows.",
            "budget": "Stopped: the next round would have gone past the budget.",
            "": "Not stopped: the study is still running, or was interrupted.",
        }
        out.append(words.get(rep.stopped, f"Stopped: {rep.stopped}."))
    return out


def _design_text(rep: QuestionsReport) -> str:
    m, alpha = len(rep.questions), rep.alpha
    head = (f"Each question is the paired difference `a − b` of `miou_final` over the seeds "
            f"where both variants ran to the end; δ = {_fmt_delta_value(rep.delta)} mIoU is "
            "the smallest difference of interest. ")
    plan = rep.plan
    if rep.design == "fixed":
        n = f"all {plan.max_seeds} seeds" if plan is not None else "all seeds"
        design = (f"Fixed design: one look at {n}, each interval at the Bonferroni level "
                  f"α/m = {alpha:g}/{m}, so the family-wise error rate over the {m} "
                  f"question{'s' if m > 1 else ''} is α = {alpha:g}.")
    else:
        rounds = (f"{plan.initial} seeds per variant, then rounds of {plan.step} seed"
                  f"{'s' if plan.step > 1 else ''} for the variants an open question still "
                  f"needs, up to {plan.max_seeds}; look k's intervals are at α·w_k/m, w_k "
                  f"from power spending (ρ = {plan.rho:g}); " if plan is not None else
                  "seeds added in rounds to the variants an open question still needs; ")
        design = (f"Adaptive design (repeated confidence intervals): {rounds}the shares sum "
                  f"to α = {alpha:g} over the {m} question{'s' if m > 1 else ''} and all "
                  "looks (Bonferroni), the family-wise error rate; a question keeps the look "
                  "that closed it.")
    verdicts = (" Resolved: the interval excludes 0; smaller than δ: it lies inside (−δ, +δ); "
                "for an open question, the seeds per variant a fixed design at α/m would need "
                f"to detect δ with {POWER * 100:.0f} % power at the observed SD.")
    return head + design + verdicts


def render_questions(rep: QuestionsReport | None) -> list[str]:
    """The report's ``## Questions`` section (none when the study asks no question): the
    design in a paragraph, one table row per question in the study's order, then the spend and
    the stop reason of ``plan.json``."""
    if rep is None:
        return []
    out = ["## Questions", ""]
    if rep.note:
        out += [rep.note, ""]
    else:
        out += [_design_text(rep), "", _md_table(QUESTION_HEADER, _question_cells(rep)), ""]
    return out + [line for f in _question_footer(rep) for line in (f, "")]


def questions_summary(study_dir: str | os.PathLike) -> list[str]:
    """The questions' rows as plain text lines for the end-of-study print (the table of the
    report's ``## Questions`` section, aligned as :func:`summary_table`'s, then the spend and
    stop lines); [] when the study asks no question."""
    study_dir = os.fspath(study_dir)
    rep = assess_questions(load_trials(study_dir), load_study_json(study_dir),
                           load_plan_record(study_dir))
    if rep is None:
        return []
    title = (f"questions ({rep.design} design, family-wise α = {rep.alpha:g}, "
             f"δ = {_fmt_delta_value(rep.delta)} mIoU):")
    if rep.note:
        return [title, rep.note, *_question_footer(rep)]
    lines = [tuple(QUESTION_HEADER), *map(tuple, _question_cells(rep))]
    widths = [max(len(row[i]) for row in lines) for i in range(len(QUESTION_HEADER))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return [title, *text, *_question_footer(rep)]
