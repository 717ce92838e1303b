"""A sweep's Optuna history survives the loss of the head (ctt/tune/optuna_storage.py, the
searcher's reconcile in ctt/tune/optuna_search.py, run_sweep's storage in ctt/tune/sweep.py).

The journal file and its repair after a torn copy, ``--optuna-storage`` URLs, and
``PruningAwareOptunaSearch`` restored from a snapshot onto a storage that is behind it, ahead
of it, or empty. The head really lost, end to end: tests/scenarios/test_optuna_head_loss.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
from helpers import load_script, optuna_trials_by_tune_id, tune_snapshot
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from ctt.tune.layout import OPTUNA_JOURNAL
from ctt.tune.optuna_search import (
    ERROR_ATTR,
    ORPHAN_ERROR,
    TUNE_TRIAL_ID_ATTR,
    PruningAwareOptunaSearch,
)
from ctt.tune.optuna_storage import (
    OptunaStorageError,
    export_sqlite,
    mask_url,
    open_journal,
    open_url,
    repair_journal,
)
from ctt.tune.schedulers import make_pruner, make_scheduler

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- storage helpers -------------------------------------------------------------------------

def test_mask_url_hides_only_the_password():
    assert mask_url("postgresql://ann:s3cr:et@db.lan:5432/ctt") == \
        "postgresql://ann:***@db.lan:5432/ctt"
    assert mask_url("mysql+pymysql://ann:pw@host/db") == "mysql+pymysql://ann:***@host/db"
    assert mask_url("postgresql://ann@host/db") == "postgresql://ann@host/db"
    assert mask_url("sqlite:////tmp/a:b@c.db") == "sqlite:////tmp/a:b@c.db"


@pytest.mark.parametrize("url, expect", [
    ("studies_out/x.db", "is not a database URL"),
    ("redis://localhost", "is not a database URL"),
    ("sqlite:////nonexistent-dir/sub/x.db", "cannot be opened"),
    ("postgresql://ann:hunter2@127.0.0.1:1/ctt", "cannot be opened"),
])
def test_open_url_refuses_in_one_line_without_the_password(url, expect):
    with pytest.raises(OptunaStorageError) as e:
        open_url(url)
    text = str(e.value)
    assert expect in text and "\n" not in text and "hunter2" not in text, text
    assert text.startswith(f"--optuna-storage {mask_url(url)!r}")


def test_open_url_names_a_missing_postgresql_driver_and_its_package(monkeypatch):
    """SQLAlchemy opens postgresql:// with psycopg (3) from 2.1 on: without it the line says
    which module is missing and what to install, not only Optuna's generic import error."""
    import sys

    for module in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(OptunaStorageError) as e:
        open_url("postgresql://ann@127.0.0.1:1/ctt")
    text = str(e.value)
    assert "pip install 'psycopg[binary]' on the head" in text and "\n" not in text, text
    assert "psycopg" in text.split("pip install")[0]  # the module that failed to import


def test_open_url_sqlite(tmp_path):
    storage = open_url(f"sqlite:///{tmp_path / 'o.db'}")
    optuna.create_study(storage=storage, study_name="s")
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["s"]


def _journal_study(path: Path, n: int) -> optuna.Study:
    study = optuna.create_study(storage=open_journal(path), study_name="s",
                                direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        t = study.ask()
        x = t.suggest_float("x", 0.0, 1.0)
        t.report(x / 2, 1)
        t.set_user_attr(TUNE_TRIAL_ID_ATTR, f"t{t.number}")
        study.tell(t, x)
    return study


def _load(path: Path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=open_journal(path))


def test_journal_copy_torn_anywhere_loads_and_appends(tmp_path):
    """A copy of the journal cut at any byte of its last records (a sync racing an append)
    loads as a prefix of the study; after the repair, appends load again. Without the
    repair the next append would break every later load: shown first."""
    src = tmp_path / OPTUNA_JOURNAL
    full = _journal_study(src, 4)
    data = src.read_bytes()
    lines = data.splitlines(keepends=True)
    torn = tmp_path / "torn.journal"
    torn.write_bytes(data[:-5])
    backend = optuna.storages.journal.JournalFileBackend(str(torn))
    assert len(list(backend.read_logs(0))) == len(lines) - 1  # a torn last line is skipped
    backend.append_logs([{"op_code": 0}])  # but an append is glued onto it
    backend.append_logs([{"op_code": 0}])
    with pytest.raises(ValueError):
        list(optuna.storages.journal.JournalFileBackend(str(torn)).read_logs(0))

    last_two = len(data) - len(lines[-1]) - len(lines[-2])
    cuts = sorted(set(range(last_two, len(data) + 1)) | set(range(0, len(data), 97)))
    values = [t.value for t in full.trials]
    for cut in cuts:
        copy = tmp_path / f"cut-{cut}.journal"
        copy.write_bytes(data[:cut])
        whole = data[:cut].rfind(b"\n") + 1
        assert repair_journal(copy) == cut - whole
        assert copy.read_bytes() == data[:whole]
        if whole < len(lines[0]):
            continue  # the study itself was not created yet
        study = _load(copy)
        done = [t.value for t in study.trials if t.state == TrialState.COMPLETE]
        assert done == values[:len(done)]
        study.tell(study.ask(), 9.0)
        again = _load(copy).trials
        assert again[-1].value == 9.0 and len(again) == len(study.trials)


def test_journal_repair_cuts_after_a_bad_line_and_opening_drops_a_stale_lock(tmp_path):
    path = tmp_path / OPTUNA_JOURNAL
    _journal_study(path, 2)
    good = path.read_bytes()
    path.write_bytes(good + b'{"op_code": 5, "broken\n' + good.splitlines(keepends=True)[-1])
    Path(str(path) + ".lock").write_text("")  # left by a driver killed mid-append
    assert len(_load(path).trials) == 2  # opened within the lock's grace period, no wait
    assert path.read_bytes() == good and not Path(str(path) + ".lock").exists()


def test_export_sqlite_is_a_copy_the_results_read(tmp_path):
    study = _journal_study(tmp_path / OPTUNA_JOURNAL, 3)
    dest = export_sqlite(study._storage, "s", tmp_path / "optuna.db")
    copy = optuna.load_study(study_name="s", storage=f"sqlite:///{dest}")
    assert [(t.params, t.value, t.user_attrs, t.intermediate_values) for t in copy.trials] == \
        [(t.params, t.value, t.user_attrs, t.intermediate_values) for t in study.trials]
    export_sqlite(study._storage, "s", dest)  # replaced whole, not merged
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{dest}").trials) == 3


# --- the searcher restored onto a storage behind or ahead of its snapshot --------------------

SPACE = {"q": FloatDistribution(0.0, 1.0), "noise": FloatDistribution(0.0, 1.0)}
MAX_T = 10


def _searcher(storage) -> PruningAwareOptunaSearch:
    return PruningAwareOptunaSearch(
        space=dict(SPACE), metric="miou", mode="max", seed=0, storage=storage,
        study_name="s", max_t=MAX_T,
        pruner=make_pruner("optuna-median", max_t=MAX_T, grace_period=3, n_startup_trials=1))


def _scheduler(searcher):
    return make_scheduler("optuna-median", max_t=MAX_T, grace_period=3, searcher=searcher)


def _results(searcher, sched, tid, steps, value):
    """Report ``steps`` of a trial as Tune does (scheduler first); returns the last decision."""
    trial = type("T", (), {"trial_id": tid})()
    decision = None
    for step in steps:
        result = {"step": step, "miou": value, "training_iteration": step}
        decision = sched.on_trial_result(None, trial, result)
        if decision == "STOP":
            break
        searcher.on_trial_result(tid, result)
    return decision


def _finish(searcher, sched, tid, step, value=None, error=None):
    trial = type("T", (), {"trial_id": tid})()
    result = {"step": step, **({"miou": value} if value is not None else {}),
              **({"error": error} if error else {})}
    sched.on_trial_complete(None, trial, result)
    searcher.on_trial_complete(tid, result=result)


def _summary(study) -> dict[str, tuple]:
    held = optuna_trials_by_tune_id(study)
    assert all(len(v) == 1 for v in held.values()), {k: len(v) for k, v in held.items()}
    return {k: (v[0].state, v[0].value, dict(v[0].intermediate_values), v[0].params,
                v[0].user_attrs.get(ERROR_ATTR)) for k, v in held.items()}


def test_restore_onto_a_journal_copy_behind_the_snapshot_adds_what_it_lacks(tmp_path):
    """The journal synced before the last asks and tells; Tune's snapshot after them. The
    restored study holds each trial once, as the snapshot knew it, and the study goes on."""
    live = tmp_path / "head1" / OPTUNA_JOURNAL
    searcher = _searcher(open_journal(live))
    sched = _scheduler(searcher)
    searcher.suggest("good")
    _results(searcher, sched, "good", range(1, 11), 5.0)
    _finish(searcher, sched, "good", 10, 5.0)
    searcher.suggest("running")
    _results(searcher, sched, "running", (1, 2), 8.0)
    synced = live.read_bytes()  # the last sync before the head is lost
    _results(searcher, sched, "running", (3, 4), 8.5)  # values the copy lacks
    searcher.suggest("done")  # asked, run and told after the sync
    _results(searcher, sched, "done", range(1, 11), 6.0)
    _finish(searcher, sched, "done", 10, 6.0)
    searcher.suggest("bad")  # pruned after the sync
    assert _results(searcher, sched, "bad", range(1, 11), 1.0) == "STOP"
    _finish(searcher, sched, "bad", 3, 1.0)
    searcher.suggest("fail")
    _finish(searcher, sched, "fail", 2, error="non-finite loss at 2")
    searcher.suggest("late")  # asked, not yet reported
    restore = tune_snapshot(searcher, sched, tmp_path / "searcher.pkl")
    expected = _summary(searcher.study)

    new = tmp_path / "head2" / OPTUNA_JOURNAL  # a new head: the copy restored elsewhere, torn
    new.parent.mkdir()
    new.write_bytes(synced + b'{"op_code": 6, "worker_id"')
    s2, sched2 = restore(open_journal(new))
    study = s2.study
    assert Path(study._storage._backend._file_path) == new
    assert _summary(study) == expected
    assert s2.reconcile(open_journal(new)) == {"added": [], "told": [], "orphans": []}

    # the study goes on: trials resume from checkpoints, nothing is told twice
    assert _results(s2, sched2, "running", range(3, 11), 8.5) is not None
    _finish(s2, sched2, "running", 10, 8.5)
    _results(s2, sched2, "late", range(1, 11), 7.0)
    _finish(s2, sched2, "late", 10, 7.0)
    s2.suggest("next")
    _results(s2, sched2, "next", range(1, 11), 9.9)
    _finish(s2, sched2, "next", 10, 9.9)
    final = _summary(optuna.load_study(study_name="s", storage=open_journal(new)))
    assert {k: v[0] for k, v in final.items()} == {
        "good": TrialState.COMPLETE, "running": TrialState.COMPLETE, "done": TrialState.COMPLETE,
        "bad": TrialState.PRUNED, "fail": TrialState.FAIL, "late": TrialState.COMPLETE,
        "next": TrialState.COMPLETE}
    assert final["fail"][4] == "non-finite loss at 2" and final["done"][1] == 6.0
    assert final["running"][2] == {s: 8.0 if s <= 2 else 8.5 for s in range(1, 11)}
    assert final["late"][3] == expected["late"][3]  # the params Tune runs it with


def test_restore_onto_a_storage_ahead_of_the_snapshot_keeps_it(tmp_path):
    """The storage holds tells and an ask made after Tune's snapshot: kept as they are, the
    orphan ask is FAIL, the values the storage has are not reported again."""
    live = tmp_path / OPTUNA_JOURNAL
    searcher = _searcher(open_journal(live))
    sched = _scheduler(searcher)
    searcher.suggest("good")
    _results(searcher, sched, "good", range(1, 11), 9.0)
    _finish(searcher, sched, "good", 10, 9.0)
    searcher.suggest("a")
    searcher.suggest("b")
    _results(searcher, sched, "a", (1, 2), 9.5)
    restore = tune_snapshot(searcher, sched, tmp_path / "searcher.pkl")
    _results(searcher, sched, "a", range(3, 11), 9.5)
    _finish(searcher, sched, "a", 10, 9.5)
    _results(searcher, sched, "b", (1, 2, 3, 4), 9.6)
    searcher.suggest("orphan")
    before = _summary(searcher.study)

    s2, sched2 = restore(open_journal(live))
    after = _summary(s2.study)
    assert after.pop("orphan")[::4] == (TrialState.FAIL, ORPHAN_ERROR)
    before.pop("orphan")
    assert after == before
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "step already reported"
        _results(s2, sched2, "a", range(3, 11), 9.5)
        _finish(s2, sched2, "a", 10, 9.5)
        _results(s2, sched2, "b", range(3, 11), 9.6)
        _finish(s2, sched2, "b", 10, 9.6)
    final = _summary(s2.study)
    assert final["a"][:2] == (TrialState.COMPLETE, 9.5)
    assert final["b"][:3] == (TrialState.COMPLETE, 9.6, {s: 9.6 for s in range(1, 11)})


def test_restore_onto_an_empty_storage_rebuilds_the_study(tmp_path):
    """A storage without the study at all (the journal never reached the storage, or a
    database that was reset): every trial of the snapshot is added, with the study's
    attributes, and TPE's next trial sees them."""
    searcher = _searcher(open_journal(tmp_path / "old" / OPTUNA_JOURNAL))
    sched = _scheduler(searcher)
    for k, v in enumerate((9.0, 8.0, 7.0)):
        searcher.suggest(f"t{k}")
        _results(searcher, sched, f"t{k}", range(1, 11), v)
        _finish(searcher, sched, f"t{k}", 10, v)
    restore = tune_snapshot(searcher, sched, tmp_path / "searcher.pkl")
    expected = _summary(searcher.study)
    s2, _ = restore(open_url(f"sqlite:///{tmp_path / 'new.db'}"))
    assert _summary(s2.study) == expected
    assert sorted(t.number for t in s2.study.trials) == [0, 1, 2]
    s2.suggest("t3")
    assert optuna_trials_by_tune_id(s2.study)["t3"][0].state == TrialState.RUNNING


def test_a_database_password_never_reaches_tunes_snapshot(tmp_path):
    """Tune pickles the searcher (and its storage) into the experiment state in the study's
    storage; with a password in --optuna-storage that pickle holds it masked and a restore
    uses the storage the new driver opened."""
    from ctt.tune.optuna_storage import _MaskedRDBStorage

    url = f"sqlite:///{tmp_path / 'o.db'}"
    assert type(open_url(url)) is optuna.storages.RDBStorage  # no password: nothing to hide
    storage = _MaskedRDBStorage(url)
    storage.url = "postgresql://ann:hunter2@db.lan/ctt"  # as if opened with this URL
    searcher = _searcher(storage)
    sched = _scheduler(searcher)
    searcher.suggest("a")
    _results(searcher, sched, "a", range(1, 11), 5.0)
    _finish(searcher, sched, "a", 10, 5.0)
    restore = tune_snapshot(searcher, sched, tmp_path / "searcher.pkl")
    assert b"hunter2" not in (tmp_path / "searcher.pkl").read_bytes()
    assert b"hunter2" not in pickle.dumps((searcher, sched))
    assert pickle.loads(pickle.dumps(storage)).url == "postgresql://ann:***@db.lan/ctt"
    s2, _ = restore(open_url(url))
    assert _summary(s2.study) == _summary(searcher.study)


def test_sweep_optuna_storage_fresh_start_drops_the_old_record_and_resume_keeps_it(tmp_path):
    """run_sweep's choice: a fresh start drops an old journal (or the database's study of that
    name); a resume keeps it, so the restored searcher finds its trials."""
    from ctt.tune.sweep import _sweep_optuna_storage

    study_dir = tmp_path / "storage" / "s"
    study_dir.mkdir(parents=True)
    first = _sweep_optuna_storage(None, study_dir, "s", False)
    old = optuna.create_study(storage=first, study_name="s")
    old.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={TUNE_TRIAL_ID_ATTR: "a"}))
    kept = _sweep_optuna_storage(None, study_dir, "s", True)
    got = optuna.load_study(study_name="s", storage=kept).trials
    assert [(t.value, t.user_attrs) for t in got] == [(1.0, {TUNE_TRIAL_ID_ATTR: "a"})]
    fresh = _sweep_optuna_storage(None, study_dir, "s", False)
    assert optuna.get_all_study_summaries(fresh) == []
    db = open_url(f"sqlite:///{tmp_path / 'db.sqlite'}")
    optuna.create_study(storage=db, study_name="s")
    assert _sweep_optuna_storage(db, study_dir, "s", True) is db
    assert [s.study_name for s in optuna.get_all_study_summaries(db)] == ["s"]
    _sweep_optuna_storage(db, study_dir, "s", False)
    assert optuna.get_all_study_summaries(db) == []


def test_sweep_refuses_an_unusable_optuna_storage_before_ray(tmp_path, monkeypatch):
    """A database that cannot be opened is one line, before Ray starts; the URL, password
    included, comes from $CTT_OPTUNA_STORAGE (on the command line it would be refused) and the
    password is never printed."""
    mod = load_script("voc_sweep")
    import io
    from contextlib import redirect_stderr

    monkeypatch.setenv("CTT_OPTUNA_STORAGE", "postgresql://ann:hunter2@127.0.0.1:1/ctt")
    err = io.StringIO()
    with redirect_stderr(err):
        rc = mod.main(["--smoke-test", "--storage", str(tmp_path)])
    assert rc == 2
    line = err.getvalue().strip()
    assert line.startswith("error: --optuna-storage 'postgresql://ann:***@127.0.0.1:1/ctt' "
                           "cannot be opened"), line
    assert "\n" not in line and "hunter2" not in line
    assert not (tmp_path / "voc_sweep_smoke" / "ray").exists()


def test_optuna_dashboard_opens_the_journal_and_the_snapshot(tmp_path):
    """``optuna-dashboard <study>/optuna.journal`` (live) and ``optuna-dashboard
    sqlite:///<study>/optuna.db`` (the snapshot at the end) resolve to the same trials."""
    dashboard = pytest.importorskip("optuna_dashboard._storage_url")
    study = _journal_study(tmp_path / OPTUNA_JOURNAL, 3)
    export_sqlite(study._storage, "s", tmp_path / "optuna.db")
    for arg in (str(tmp_path / OPTUNA_JOURNAL), f"sqlite:///{tmp_path / 'optuna.db'}"):
        served = optuna.load_study(study_name="s", storage=dashboard.get_storage(arg))
        assert [(t.params, t.value) for t in served.trials] == \
            [(t.params, t.value) for t in study.trials], arg
