"""The command line of every study: ``studies/*.py`` hold an :class:`Ablation` or a
:class:`Sweep` (what the study is) and get their ``main(argv)`` from :func:`study_main`, which
owns the flags, smoke tests, ``--dry-run``, the checks and the exit codes.

    # studies/my_ablation.py
    main = study_main(Ablation(name="my_ablation", script=__file__, doc=__doc__,
                               variants=("supervised", "ctt")))
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctt.config import PRESETS, VARIANTS, apply_variant, get_preset, parse_set_args
from ctt.errors import UserError, float_at_least, guarded, int_at_least
from ctt.tune.ablation import ablation_trials, run_ablation
from ctt.tune.confirm import confirm_seed_list
from ctt.tune.dry_run import print_dry_run, slots
from ctt.tune.runtime import StudyOptions, check_inputs
from ctt.tune.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from ctt.tune.sequential import parse_question, parse_questions
from ctt.tune.space import variant_space
from ctt.tune.storage import RAY_JOB_ENV, is_uri
from ctt.tune.sweep import run_sweep, sweep_warmup_plan

__all__ = ["SMOKE_OVERRIDES", "SMOKE_SYNTHETIC_OVERRIDES", "Ablation", "Sweep",
           "add_common_args", "options_from_args", "run_study", "study_main"]

# A non-negative number of seconds (argparse type).
_SECONDS = float_at_least(0, what="number of seconds")
# StudyOptions' own defaults: the flags show them, so they are set in one place.
_DEFAULTS = StudyOptions(name="")


@dataclass(frozen=True)
class Ablation:
    """A grid study: every variant x every seed (paired: a seed fixes initialisation and data
    order across variants), supervised warm-ups shared per seed (``--no-fork`` turns that off).

    Attributes:
        name: default study name, the directory under ``--storage`` (``--out`` overrides).
        script: the study file (``__file__``): the command an interrupted study prints.
        doc: the study file's docstring; its first line is the ``--help`` description.
        variants: ``ctt.config.VARIANTS`` names, in table order (``--variants`` default).
        preset, seeds: defaults of ``--preset`` and ``--seeds``.
        defaults: config overrides of this study (below ``--smoke-test`` and ``--set``).
        questions: the comparisons the study exists to answer, ``"a/b"`` for the paired
            difference a - b (``ctt.tune.sequential``), in report order (``--questions``
            default: those whose two variants run).
    """

    name: str
    script: str
    doc: str
    variants: tuple[str, ...]
    preset: str = "tiny"
    seeds: str = "0,1,2"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    questions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"{self.name}: unknown variants {unknown}; valid: {sorted(VARIANTS)}")
        if self.questions:
            parse_questions(self.questions, variants=self.variants)


@dataclass(frozen=True)
class Sweep:
    """An Optuna TPE search (seeded) over ``space`` for one variant, weak trials pruned on their
    intermediate val mIoU; the best trial is re-evaluated on the held-out test split.

    Attributes:
        name, script, doc, preset, seeds, defaults: as in :class:`Ablation`.
        space: returns ``{flat config key: Tune domain}``, fresh objects per run (keys the
            chosen variant fixes or ignores are left out, :func:`ctt.tune.space.variant_space`).
        confirm_top, confirm_seeds: defaults of ``--confirm-top``/``--confirm-seeds``: after
            the search the best K configs rerun on S fresh seeds (0 turns it off).
        variant, num_samples, scheduler: defaults of ``--variant``, ``--num-samples``,
            ``--scheduler``.
    """

    name: str
    script: str
    doc: str
    space: Callable[[], dict[str, Any]]
    preset: str = "tiny"
    seeds: str = "0"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    variant: str = "ctt"
    num_samples: int = 16
    scheduler: str = DEFAULT_SCHEDULER
    confirm_top: int = 3
    confirm_seeds: int = 3


def study_main(study: Ablation | Sweep) -> Callable[[list[str] | None], int]:
    """The ``main(argv)`` of a study file (``argv`` None: the command line).

    Parses the common flags (:func:`add_common_args`) and the study's own, then prints the
    ``--dry-run`` estimate or runs the study; the config and data root are checked before Ray
    starts. Exit codes: 0 done, 2 an input error (one line, ``ctt.errors.guarded``), 1 every
    trial failed, 130/143 interrupted (:func:`run_study`).
    """
    run = _run_ablation_cli if isinstance(study, Ablation) else _run_sweep_cli

    @guarded
    def main(argv: list[str] | None = None) -> int:
        return run(study, argv)

    return main


def _parser(study: Ablation | Sweep) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=study.doc.strip().splitlines()[0])
    add_common_args(p, default_preset=study.preset, default_seeds=study.seeds)
    return p


def _options(study: Ablation | Sweep, a: argparse.Namespace) -> StudyOptions:
    return options_from_args(a, study.name + ("_smoke" if a.smoke_test else ""),
                             dict(study.defaults))


def _prog(study: Ablation | Sweep) -> list[str]:
    """The command before the arguments in the line that continues an interrupted study."""
    return ["python", os.path.relpath(study.script)]


def _run_ablation_cli(study: Ablation, argv: list[str] | None) -> int:
    p = _parser(study)
    order = list(study.variants)
    p.add_argument("--variants", default=",".join(order),
                   help="comma-separated subset of " + ", ".join(order))
    p.add_argument("--no-fork", action="store_true",
                   help="run each trial's warm-up itself instead of forking a shared one")
    g = p.add_argument_group("questions, seeds and budget")
    g.add_argument("--questions", metavar="A/B,...",
                   help="the comparisons the study answers, a/b for a - b paired by seed, in "
                   "report order (default: the study's own whose variants run: "
                   f"{', '.join(study.questions) or 'none'})")
    g.add_argument("--delta", type=float_at_least(0, strict=True), default=_DEFAULTS.delta,
                   metavar="MIOU", help="smallest difference of interest: a question whose "
                   "interval lies inside ±delta is settled as smaller (default %(default)s)")
    g.add_argument("--adaptive", action="store_true",
                   help="after the --seeds, add seeds in rounds, only to the variants an open "
                   "question needs, until each is answered, --max-seeds or --budget")
    g.add_argument("--max-seeds", type=int_at_least(2), default=_DEFAULTS.max_seeds,
                   metavar="N", help="with --adaptive: seeds per variant at most (default "
                   "%(default)s)")
    _add_budget(g)
    a = p.parse_args(argv)
    variants = _name_list(a.variants, "variants")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(order)}")
    opts = _options(study, a)
    check_no_secrets(opts.storage, None, [])
    check_storage_place(opts.storage, opts.name)
    check_address(opts.address)
    opts.fork_warmup = not a.no_fork
    opts.questions = _questions(study, a.questions, variants)
    opts.delta, opts.budget = a.delta, a.budget
    opts.adaptive, opts.max_seeds = a.adaptive, a.max_seeds
    if a.adaptive:
        _check_adaptive(opts)
    if a.dry_run:
        trials = ablation_trials(opts, variants)
        check_inputs(opts)  # the data root, as the study checks it
        est = print_dry_run(trials, opts.base, opts.preset,
                            slots=slots(opts.num_cpus, opts.cpus_per_trial),
                            warmup_fork=opts.fork_warmup)
        print_plan_cost(opts, variants, est)
        return 0
    return run_study(run_ablation, opts, variants, argv=argv, prog=_prog(study))


def _add_budget(g: Any) -> None:
    g.add_argument("--budget", type=float_at_least(0, strict=True), metavar="HOURS",
                   help="compute the study may commit, in core-hours (GPU-hours with "
                   "--gpus-per-trial), by the measured cost model: a trial that would pass it "
                   "is not started")


def _questions(study: Ablation, text: str | None, variants: list[str]) -> tuple[str, ...]:
    """``--questions`` checked against the variants that run, or the study's own questions
    whose two variants both run."""
    if text is None:
        return tuple(q for q in study.questions
                     if set(parse_question(q).variants) <= set(variants))
    try:
        found = parse_questions(_name_list(text, "questions"), variants=variants)
    except ValueError as e:
        raise UserError(f"--questions {text!r}: {e}") from None
    return tuple(str(q) for q in found)


def _check_adaptive(opts: StudyOptions) -> None:
    if not opts.questions:
        raise UserError("--adaptive adds seeds where a question is open, but this study asks "
                        "none of the variants that run: pass --questions a/b,...")
    if len(opts.seeds) < 2:
        raise UserError(f"--adaptive needs at least 2 initial seeds (a paired interval needs "
                        f"2), got --seeds {','.join(map(str, opts.seeds))}")
    if opts.max_seeds < len(opts.seeds):
        raise UserError(f"--max-seeds {opts.max_seeds} is below the {len(opts.seeds)} initial "
                        "seeds: pass at least as many")


def print_plan_cost(opts: StudyOptions, variants: list[str], est: Any) -> None:
    """``--dry-run`` of a planned study: the worst case (every seed up to ``--max-seeds`` for
    every variant) against ``--budget``."""
    from ctt.tune.adaptive import budget_unit

    per_trial = opts.gpus_per_trial or opts.cpus_per_trial
    unit = budget_unit(opts.gpus_per_trial)
    fixed = est.total_s * per_trial / 3600.0
    seeds = len(opts.seeds)
    worst = fixed * (opts.max_seeds / seeds) if opts.adaptive else fixed
    if opts.adaptive:
        print(f"adaptive: {seeds} seeds, then rounds of 1 seed for the variants open "
              f"questions need, at most {opts.max_seeds} seeds: worst case {worst:.3g} {unit} "
              f"({fixed:.3g} for the first {seeds})")
    if opts.budget is not None:
        verdict = "within" if worst <= opts.budget else "over"
        print(f"budget {opts.budget:g} {unit}: the worst case is {verdict} it; trials that "
              "would pass it are not started")


def _run_sweep_cli(study: Sweep, argv: list[str] | None) -> int:
    p = _parser(study)
    p.add_argument("--variant", default=study.variant, choices=sorted(VARIANTS))
    p.add_argument("--num-samples", type=int_at_least(1), default=study.num_samples)
    p.add_argument("--scheduler", default=study.scheduler, choices=SCHEDULERS,
                   help="what prunes weak trials (default %(default)s: chosen on the replay of "
                   "recorded curves, docs/benchmarks.md#pruning-replayed)")
    p.add_argument("--metric", default="miou", help="reported metric to maximise (ranked by "
                   "its final value)")
    p.add_argument("--grace-period", type=int_at_least(0), default=None, metavar="ITERS",
                   help="iterations after the supervised warm-up before the first pruning "
                   "decision (default run.eval_every); rungs count from the warm-up's end")
    p.add_argument("--confirm-top", type=int_at_least(0), default=study.confirm_top,
                   metavar="K",
                   help="after the search, rerun the K best configs on fresh seeds and name "
                   "the winner by their mean (0: off; --smoke-test: at most 1)")
    p.add_argument("--confirm-seeds", type=int_at_least(0), default=study.confirm_seeds,
                   metavar="S",
                   help="fresh seeds per confirmed config (--smoke-test: at most 1)")
    p.add_argument("--no-fork", action="store_true",
                   help="give each trial its own warm-up even where the space would let the "
                   "trials share one")
    p.add_argument("--optuna-storage", metavar="URL", default=os.environ.get(OPTUNA_STORAGE_ENV),
                   help="database for Optuna's study (sqlite:///PATH, postgresql://..., "
                   "mysql://...; default: $CTT_OPTUNA_STORAGE, else optuna.journal in the study "
                   "directory, which survives the head wherever --storage does). No password "
                   "in the URL on the command line: PGPASSWORD, ~/.pgpass or $CTT_OPTUNA_STORAGE")
    _add_budget(p)
    a = p.parse_args(argv)
    opts = _options(study, a)
    opts.budget = a.budget
    check_no_secrets(opts.storage, a.optuna_storage, sys.argv[1:] if argv is None else argv)
    check_storage_place(opts.storage, opts.name)
    check_address(opts.address)
    if len(opts.seeds) > 1:
        raise UserError(f"--seeds {','.join(map(str, opts.seeds))}: a sweep searches at one "
                        "seed; pass one, and --confirm-seeds S to rerun its best configs on S "
                        "fresh seeds after the search")
    opts.fork_warmup = not a.no_fork
    num_samples = min(a.num_samples, 3) if a.smoke_test else a.num_samples
    confirm = {"confirm_top": a.confirm_top, "confirm_seeds": a.confirm_seeds}
    if a.smoke_test:
        confirm = {k: min(v, 1) for k, v in confirm.items()}
    space = variant_space(study.space(), opts.base, a.variant)
    if a.dry_run:
        check_inputs(opts)  # the data root, as the study checks it
        flat = {**opts.base.to_flat(), "variant": a.variant}
        print(f"search space: {', '.join(space)}")
        base = apply_variant(opts.base, a.variant)
        shared, why = sweep_warmup_plan(base, space, opts.fork_warmup)
        print(f"warm-up: {why}")
        n_confirm = confirm["confirm_top"] * confirm["confirm_seeds"]
        if n_confirm:
            print(f"{num_samples} search trials, then {n_confirm} confirmation trials (top "
                  f"{confirm['confirm_top']} x {confirm['confirm_seeds']} fresh seeds)")
        # confirmation runs start from scratch on their fresh seeds; only the search forks
        search = [{**flat, "seed": opts.seeds[0]}] * num_samples
        fresh = confirm_seed_list(opts.seeds[0], confirm["confirm_seeds"])
        confirm_runs = [{**flat, "seed": s} for _ in range(confirm["confirm_top"]) for s in fresh]
        print_dry_run(search + confirm_runs, opts.base, opts.preset,
                      slots=slots(opts.num_cpus, opts.cpus_per_trial), warmup_fork=shared,
                      forked=len(search))
        print("(no pruning counted: the scheduler stops weak search trials early)")
        return 0
    return run_study(run_sweep, opts, a.variant, space, num_samples=num_samples,
                     scheduler=a.scheduler, metric=a.metric, grace_period=a.grace_period,
                     optuna_storage=a.optuna_storage, **confirm, argv=argv, prog=_prog(study))

# --smoke-test: a few iterations on a tiny synthetic set, every code path (warm-up fork,
# contrast on, checkpoints, evaluation) exercised in seconds.
SMOKE_OVERRIDES: dict[str, Any] = {
    "optim.iters": 6, "method.warmup_iters": 2, "run.eval_every": 3, "run.checkpoint_every": 3,
    "run.log_every": 1, "method.bank_size": 8, "method.bank_min_fill": 1, "method.tau_bank": 0.0,
    "model.width": 8, "data.batch_size": 2, "data.batch_size_u": 2,
}
# ... and on the generated synthetic set, evaluation on 16/32 images instead of the 200-image
# val/test splits (which would take most of a smoke trial's time). The numbers mean nothing.
SMOKE_SYNTHETIC_OVERRIDES: dict[str, Any] = {
    "data.val_split": "splits/16/labeled", "data.test_split": "splits/32/labeled",
}


def add_common_args(p: argparse.ArgumentParser, *, default_preset: str = "tiny",
                    default_seeds: str = "0,1,2") -> None:
    g = p.add_argument_group("common study options")
    g.add_argument("--preset", default=default_preset, choices=sorted(PRESETS))
    g.add_argument("--data-root", help="dataset root, read-only (tiny: default synthetic "
                   "data, generated once into ~/.cache/ctt)")
    g.add_argument("--split", help="labeled split name (data.labeled_split)")
    g.add_argument("--seeds", type=seed_list, default=None,
                   help=f"comma-separated distinct seeds (default {default_seeds})")
    g.add_argument("--iters", type=int_at_least(1),
                   help="total iterations per trial (optim.iters)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any flat config key (repeatable)")
    g.add_argument("--cpus-per-trial", type=float_at_least(0, strict=True),
                   default=_DEFAULTS.cpus_per_trial)
    g.add_argument("--gpus-per-trial", type=float_at_least(0), default=_DEFAULTS.gpus_per_trial,
                   help="fractional values pack several trials on one GPU")
    g.add_argument("--max-concurrent", type=int_at_least(0), default=_DEFAULTS.max_concurrent,
                   help="0 = as resources allow")
    g.add_argument("--max-failures", type=int_at_least(0), default=_DEFAULTS.max_failures,
                   help="restarts of a crashed trial from its last checkpoint")
    g.add_argument("--storage", default=_DEFAULTS.storage,
                   help="local directory, NFS path or URI (s3://bucket/prefix)")
    g.add_argument("--storage-shared", action="store_true",
                   help="the local --storage path is a mount shared by every node")
    g.add_argument("--sync-every", type=_SECONDS, default=_DEFAULTS.sync_every, metavar="SECONDS",
                   help="with a URI --storage: push the driver-side files (study.json, "
                   "trials/, tb/, tables, report) to it on every trial end and at least this "
                   "often (default 60; a head lost mid-study loses at most this much of them)")
    g.add_argument("--out", help="study name (directory under --storage)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted study")
    g.add_argument("--address", help="join a running Ray cluster (e.g. auto; default in "
                   "a `ray job submit` entrypoint: the job's cluster)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the trials and a compute estimate, launch nothing")
    g.add_argument("--smoke-test", type=float, metavar="SECONDS", nargs="?", const=60.0,
                   help="tiny, fast run of every code path (tests)")
    g.add_argument("--progress-every", type=_SECONDS, default=_DEFAULTS.progress_every,
                   metavar="SECONDS", help="seconds between two progress lines (default "
                   "%(default)s)")
    g.add_argument("--verbose", action="store_true", help="Ray's status table and the trials' "
                   "own output instead of the study's progress line")
    g.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    p.set_defaults(study_seeds=seed_list(default_seeds))


# Query parameters of a storage URI that carry a credential (pyarrow's S3 options).
SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token")
# Where a sweep's --optuna-storage URL may come from instead of the command line.
OPTUNA_STORAGE_ENV = "CTT_OPTUNA_STORAGE"


# Seconds a study waits for the Ray cluster named by --address to answer.
ADDRESS_TIMEOUT_S = 10.0


def check_address(address: str | None) -> None:
    """A ``HOST:PORT`` ``--address`` must answer within :data:`ADDRESS_TIMEOUT_S`: Ray itself
    retries a dead address for many minutes. ``auto`` and ``ray://`` addresses are Ray's to
    resolve (:func:`ctt.tune.ray_setup.init_ray` turns its failure into one line)."""
    import socket

    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address!r} is not HOST:PORT (or auto): pass the address "
                        "of a running Ray head, e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"--address {address}: no Ray head answers there within "
                        f"{ADDRESS_TIMEOUT_S:g} s ({e.strerror or e}); start the cluster "
                        "(ray up, or ray start --head) or check the address") from None


def check_storage_place(storage: str, name: str) -> None:
    """``--storage``: a URI needs a bucket and no spaces; a local path must be a directory
    this process can create the study in."""
    import urllib.parse

    from ctt.errors import check_writable

    if is_uri(storage):
        parts = urllib.parse.urlsplit(storage)
        if any(c.isspace() for c in storage):
            raise UserError(f"--storage {storage!r} contains white space: a storage URI has "
                            "none (quote nothing inside it; rename the prefix)")
        if not parts.netloc:
            raise UserError(f"--storage {storage!r} names no bucket: pass "
                            f"{parts.scheme or 's3'}://BUCKET/prefix")
        return
    check_writable(Path(storage).expanduser() / name, "--storage")


def check_no_secrets(storage: str, optuna_storage: str | None, given: list[str]) -> None:
    """Refuse a credential written on the command line (``given``: the arguments as typed),
    where every process listing (``ps``, ``ray job list``) shows it."""
    import urllib.parse

    from ctt.tune.optuna_storage import mask_url

    if is_uri(storage):
        keys = sorted(set(urllib.parse.parse_qs(urllib.parse.urlsplit(storage).query))
                      & set(SECRET_QUERY_KEYS))
        if keys:
            raise UserError(
                f"--storage carries a credential ({', '.join(keys)}) in its query string, which "
                "process listings (ps, ray job list) show: leave it out and give it to S3 the "
                "standard way (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in "
                "~/.aws with AWS_PROFILE, or the instance's role)")
    if optuna_storage and mask_url(optuna_storage) != optuna_storage and any(
            optuna_storage in arg for arg in given):
        raise UserError(
            f"--optuna-storage {mask_url(optuna_storage)!r} carries a password, which process "
            "listings (ps, ray job list) show: leave it out of the URL and let the database "
            f"client find it (PGPASSWORD or ~/.pgpass for PostgreSQL), or pass the whole URL in "
            f"${OPTUNA_STORAGE_ENV} instead of the flag")


def seed_list(text: str) -> list[int]:
    """``--seeds`` (argparse type): comma-separated distinct integers, at least one. A seed
    listed twice would train the same trial twice and count it as two paired samples."""
    words = [w.strip() for w in str(text).split(",")]
    if not any(words):
        raise argparse.ArgumentTypeError("no seed given: pass e.g. --seeds 0,1,2")
    try:
        seeds = [int(w) for w in words if w]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise argparse.ArgumentTypeError(
            f"seed {', '.join(map(str, twice))} listed twice in {text!r}: each seed is one "
            "paired sample, list it once")
    return seeds


def _name_list(text: str, what: str) -> list[str]:
    names = [w.strip() for w in str(text).split(",") if w.strip()]
    if not names:
        raise UserError(f"--{what} {text!r} names nothing: pass at least one")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--{what}: {', '.join(twice)} listed twice; list each once (a "
                        "repeated row would be counted as another result)")
    return names


def options_from_args(a: argparse.Namespace, default_name: str,
                      defaults: dict[str, Any] | None = None) -> StudyOptions:
    """StudyOptions from the common flags. Overrides, later winning: the study's ``defaults``,
    the smoke-test settings, ``--set``; an explicit ``--iters`` or ``--seeds`` beats the smoke
    test's."""
    overrides: dict[str, Any] = dict(defaults or {})
    sets = parse_set_args(a.overrides)
    if a.smoke_test:
        overrides.update(SMOKE_OVERRIDES)
        generated = not a.data_root and sets.get("data.root", "none") == "none"
        if generated and get_preset(a.preset).data.dataset == "synthetic":
            overrides.update(SMOKE_SYNTHETIC_OVERRIDES)
        if a.iters:  # an explicit --iters beats the smoke default
            overrides["optim.iters"] = a.iters
    overrides.update(sets)
    seeds = a.seeds
    if seeds is None:  # the study's default seeds; a smoke test keeps only the first
        seeds = a.study_seeds[:1] if a.smoke_test else a.study_seeds
    return StudyOptions(
        name=a.out or default_name, preset=a.preset, data_root=a.data_root, split=a.split,
        seeds=seeds, iters=a.iters, overrides=overrides, cpus_per_trial=a.cpus_per_trial,
        gpus_per_trial=a.gpus_per_trial, max_concurrent=a.max_concurrent,
        max_failures=a.max_failures, storage=a.storage, storage_shared=a.storage_shared,
        sync_every=a.sync_every, resume=a.resume, address=a.address or _job_address(),
        verbose=2 if a.verbose else 1, progress_every=a.progress_every,
        # only the default throwaway "<study>_smoke" directory is ever deleted
        replace_existing=bool(a.smoke_test) and not a.out)


def _job_address() -> str | None:
    """``auto`` in the entrypoint of ``ray job submit`` (Ray sets RAY_ADDRESS there to the
    cluster running the job), else None. Without it a study starts a Ray of its own: in a job,
    a second Ray instance on the head, running the trials there instead of on the cluster."""
    return "auto" if RAY_JOB_ENV in os.environ else None


def run_study(fn: Callable[..., Any], *args: Any, argv: list[str] | None = None,
              prog: list[str] | None = None, **kwargs: Any) -> int:
    """Run ``run_ablation``/``run_sweep``; exit 0 when done. SIGINT/SIGTERM exit 130/143 with
    one line: where the study stopped and the command that continues it (``argv`` after
    ``prog``, or the process's command line when ``argv`` is None, with ``--resume``). A
    refusal (a :class:`~ctt.errors.UserError`: bad config or data root, storage, existing or
    missing study, a directory in use, every trial failed) passes through to
    :func:`ctt.errors.guarded`, which prints it as one line.
    """
    from ctt.interrupts import Interrupted, continue_command

    try:
        fn(*args, **kwargs)
    except Interrupted as e:
        cmd = continue_command(argv, prog or ["python"], resume=e.resumable)
        how = "continue with" if e.resumable else "nothing was written; run again with"
        print(f"interrupted ({e.name}) {e.where or 'before the study started'}; {how}: {cmd}",
              file=sys.stderr, flush=True)
        return e.exit_code
    return 0
