"""Study storage without a server (ctt/tune/storage.py, the study's paths): URIs keep their
query string (an S3 endpoint), ``--sync-every``, and staged paths that travel relative to
$CTT_STAGING. The sync and whole studies against an S3 server on loopback:
tests/scenarios/test_s3_storage.py.
"""

from __future__ import annotations

import pickle

import pyarrow.fs as pyarrow_fs
import pytest


def test_join_uri_keeps_the_query_string():
    from ctt.tune.storage import join_uri

    q = "endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(f"s3://b/prefix?{q}", "name") == f"s3://b/prefix/name?{q}"
    assert join_uri(f"s3://b/prefix/?{q}", "name", "ray") == f"s3://b/prefix/name/ray?{q}"
    assert join_uri(f"s3://b?{q}", "warmup", "seed-0") == f"s3://b/warmup/seed-0?{q}"
    assert join_uri("s3://b/p", "/n/") == "s3://b/p/n"
    assert join_uri("gs://b/p/", "n") == "gs://b/p/n"
    assert join_uri("/data/studies/", "n", "ray") == "/data/studies/n/ray"
    assert join_uri("s3://b/p", "") == "s3://b/p"


def test_study_uris_keep_the_endpoint(tmp_path, monkeypatch):
    """Every URI the study derives from --storage keeps the query (a plain string join put the
    name after it), and pyarrow reads each as the path it names."""
    from ctt.tune import layout
    from ctt.tune.experiment import experiment_dir
    from ctt.tune.grid import warmup_dir
    from ctt.tune.runtime import StudyOptions, study_paths

    monkeypatch.setenv("CTT_STAGING", str(tmp_path))
    q = "endpoint_override=127.0.0.1:9000&scheme=http"
    opts = StudyOptions(name="abl", storage=f"s3://ctt/studies?{q}")
    local, storage_path = study_paths(opts)
    assert local == tmp_path / "abl"
    assert storage_path == f"s3://ctt/studies/abl?{q}"
    assert experiment_dir(storage_path, layout.EXPERIMENT) == f"s3://ctt/studies/abl/ray?{q}"
    warm = warmup_dir(storage_path, 3)
    assert warm == f"s3://ctt/studies/abl/warmup/seed-3?{q}"
    fs, path = pyarrow_fs.FileSystem.from_uri(warm)
    assert isinstance(fs, pyarrow_fs.S3FileSystem) and path == "ctt/studies/abl/warmup/seed-3"


def test_sync_every_flag():
    import argparse

    from ctt.tune.cli import add_common_args, options_from_args
    from ctt.tune.resume import RESUME_FREE_OPTIONS

    p = argparse.ArgumentParser()
    add_common_args(p)
    assert options_from_args(p.parse_args([]), "s").sync_every == 60.0
    assert options_from_args(p.parse_args(["--sync-every", "1.5"]), "s").sync_every == 1.5
    for bad in ("-1", "nan", "soon"):
        with pytest.raises(SystemExit):
            p.parse_args(["--sync-every", bad])
    assert "sync_every" in RESUME_FREE_OPTIONS  # how often to push is no study flag


def test_staged_paths_travel_relative_to_the_staging_root(tmp_path, monkeypatch):
    """Tune pickles the logger callback and the grid searcher with the experiment; a resume
    on a head whose $CTT_STAGING differs must write to its own staging directory."""
    from ctt.tune.callbacks import StudyLoggerCallback
    from ctt.tune.grid import GridSearcher
    from ctt.tune.storage import local_path, portable_path

    old, new = tmp_path / "old", tmp_path / "new"
    monkeypatch.setenv("CTT_STAGING", str(old))
    assert portable_path(str(old / "s" / "trials")) == "$CTT_STAGING/s/trials"
    assert portable_path("/elsewhere/s") == "/elsewhere/s"  # a local study stays where it is
    assert local_path("/elsewhere/s") == "/elsewhere/s"
    cb = pickle.dumps(StudyLoggerCallback(old.resolve() / "s"))
    searcher = GridSearcher([], record=str(old.resolve() / "s" / "warmup.json"),
                            failures=str(old.resolve() / "s" / "warmup-failed.json"))
    state = pickle.dumps(searcher.get_state())
    monkeypatch.setenv("CTT_STAGING", str(new))
    assert pickle.loads(cb).study_dir == str(new.resolve() / "s")
    restored = GridSearcher([])
    restored.set_state(pickle.loads(state))
    assert restored.record == str(new.resolve() / "s" / "warmup.json")
    assert restored.failures == str(new.resolve() / "s" / "warmup-failed.json")
